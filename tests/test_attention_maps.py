"""Attention maps: per-layer weights against a float64 NumPy softmax of the layers' own queries and
keys, padding removal, rollout on a hand-computed case, heatmap / alignment PNGs, the report."""

import dataclasses
import os

import jax
import matplotlib.image
import numpy as np
import pytest
from flax import nnx
from matplotlib.figure import Figure

from flaxattn.attention import Mask
from flaxattn.models import DecoderLM, EncoderClassifier, EncoderDecoder
from flaxattn.models.attention_maps import (attention_report, attention_weights, plot_alignment,
                                            plot_attention, rollout)
from flaxattn.nn import TransformerConfig, capture_attention_weights
from flaxattn.train.report import figure_array, png_to_array

# GQA + partial RoPE; the configured kernel ('xla') returns no weights: the override is exercised.
LLAMA = TransformerConfig(
    vocab_size=40, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32, num_layers=2,
    activation="silu", gated_mlp=True, norm="rmsnorm", use_bias=False, positions="rope",
    rotary_dim=2, max_length=32, attention_impl="xla")
BERT = TransformerConfig(
    vocab_size=40, d_model=16, num_heads=2, mlp_dim=32, num_layers=2, pre_norm=False,
    final_norm=False, positions="learned", embedding_norm=True, max_length=32, scan_layers=True)
IDS = np.array([1, 7, 8, 9, 10, 11, 2])
TOL = dict(atol=2e-6, rtol=1e-5)  # float32 model vs float64 NumPy


class CharTokenizer:
  """A tiny tokenizer under the contract of `flaxattn.data.tokenizers`: 0 pad, 1 bos, 2 eos."""

  alphabet = "abcdefghijklmnopqrstuvwxyz .,$"
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text, *, add_special_tokens=False):
    ids = [3 + self.alphabet.index(char) for char in text]
    return [self.bos_id, *ids, self.eos_id] if add_special_tokens else ids

  def pieces(self, ids):
    return [{0: "<pad>", 1: "<s>", 2: "</s>"}.get(i) or self.alphabet[i - 3] for i in ids]


def rope_numpy(x, positions, rotary_dim, base=10000.0):
  """Half-layout rotary embedding in float64: `x` [length, heads, head_dim]."""
  half = rotary_dim // 2
  angles = positions[:, None, None] * base ** (-np.arange(half) * 2.0 / rotary_dim)
  x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
  return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                         x2 * np.cos(angles) + x1 * np.sin(angles), rest], axis=-1)


def test_decoder_weights_match_numpy_softmax_of_the_layers_queries_and_keys():
  model = DecoderLM(LLAMA, rngs=nnx.Rngs(0))
  weights = attention_weights(model, input_ids=IDS)["self"]
  assert model.decoder.layers[0].attention.attention_impl == "xla"  # the model is left as it was
  length, positions = len(IDS), np.arange(len(IDS))
  graphdef, state = nnx.split(model)

  @jax.jit
  def queries_and_keys(state):
    """Each layer's projected (not yet rotated) queries and keys, from its own input."""
    model = nnx.merge(graphdef, state)
    x = model.embedder(IDS[None], positions[None])
    projected = []
    for block in model.decoder.layers:
      hidden = block.attention_norm(x)
      projected.append((block.attention.query(hidden)[0], block.attention.key(hidden)[0]))
      x = block(x, positions=positions[None], mask=Mask(causal=True))[0]
    return projected

  causal = np.tril(np.ones((length, length), bool))
  for index, (query, key) in enumerate(jax.device_get(queries_and_keys(state))):
    query = rope_numpy(np.asarray(query, np.float64), positions, LLAMA.rotary_dim)
    key = rope_numpy(np.asarray(key, np.float64), positions, LLAMA.rotary_dim)
    key = np.repeat(key, 2, axis=1)  # 2 query heads per key/value head
    logits = np.einsum("thd,shd->hts", query, key) / np.sqrt(query.shape[-1])
    logits = np.where(causal, logits, -np.inf)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert weights[index].dtype == np.float32 and weights[index].shape == (4, length, length)
    np.testing.assert_allclose(weights[index], expected, **TOL)

  # Left padding is removed: the same weights as the unpadded sequence.
  padded = attention_weights(model, input_ids=np.concatenate([[0, 0], IDS])[None],
                             attention_mask=np.r_[0, 0, np.ones(length, int)][None])["self"]
  for alone, stripped in zip(weights, padded):
    np.testing.assert_allclose(stripped, alone, atol=1e-6)


def test_classifier_weights_scanned_with_padding():
  model = EncoderClassifier(BERT, num_classes=3, rngs=nnx.Rngs(1))
  ids = np.r_[IDS, 0, 0, 0]
  mask = (ids > 0).astype(np.int32)
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  logits = forward(state, ids[None], mask[None])
  captured = jax.jit(lambda state, *args: capture_attention_weights(nnx.merge(graphdef, state), *args))
  with_weights, layers = captured(state, ids[None], mask[None])
  layers = layers["encoder/encoder/layers/attention"]
  # Logits unchanged by asking for weights (up to the kernels' summation order: with weights the
  # 'reference' kernel runs, without them the dispatcher's choice).
  np.testing.assert_allclose(with_weights, logits, atol=1e-6, rtol=1e-6)
  assert len(layers) == 2 and layers[0].shape == (1, 2, 10, 10)
  np.testing.assert_array_equal(np.asarray(layers[1])[0, :, :7, 7:], 0.0)  # padding columns zero
  weights = attention_weights(model, input_ids=ids, attention_mask=mask)["self"]
  for full, stripped in zip(layers, weights):
    assert stripped.shape == (2, 7, 7)
    np.testing.assert_allclose(stripped.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(stripped, np.asarray(full)[0, :, :7, :7], atol=1e-6)


def test_encoder_decoder_weights():
  model = EncoderDecoder(dataclasses.replace(LLAMA, num_decoder_layers=1), rngs=nnx.Rngs(2))
  source, target = IDS, np.array([1, 12, 13, 14])
  weights = attention_weights(model, source_ids=source, target_ids=target)
  assert {key: [w.shape for w in layers] for key, layers in weights.items()} == {
      "encoder": [(4, 7, 7)] * 2, "decoder": [(4, 4, 4)], "cross": [(4, 4, 7)]}
  for layers in weights.values():
    np.testing.assert_allclose(np.stack(layers).sum(-1), 1.0, atol=1e-6)
  assert np.all(np.triu(weights["decoder"][0], k=1) == 0)  # causal
  assert np.ptp(weights["encoder"][0][:, 0]) > 0  # bidirectional: the first query sees them all
  padded = attention_weights(model, source_ids=np.r_[source, 0, 0][None],
                             source_mask=np.r_[np.ones(7, int), 0, 0], target_ids=target)
  for key in weights:
    for alone, stripped in zip(weights[key], padded[key]):
      np.testing.assert_allclose(stripped, alone, atol=1e-6)


def test_attention_weights_rejects_bad_inputs():
  model = DecoderLM(LLAMA, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"unexpected \['source_ids'\]"):
    attention_weights(model, input_ids=IDS, source_ids=IDS)
  with pytest.raises(ValueError, match=r"one example.*shape \(2, 7\)"):
    attention_weights(model, input_ids=np.stack([IDS, IDS]))
  with pytest.raises(ValueError, match=r"needs \['input_ids'\]"):
    attention_weights(model, attention_mask=np.ones(7))
  with pytest.raises(ValueError, match="attention_mask must match"):
    attention_weights(model, input_ids=IDS, attention_mask=np.ones(6, int))
  with pytest.raises(ValueError, match=r"got values \[0, 2\]"):
    attention_weights(model, input_ids=IDS, attention_mask=np.r_[2, np.zeros(6, int)])
  with pytest.raises(ValueError, match="more than config.max_length=32"):
    attention_weights(EncoderClassifier(BERT, 2, rngs=nnx.Rngs(0)), input_ids=np.ones(33, int))
  with pytest.raises(ValueError, match=r"input_ids must be in \[0, 40\), got values in \[1, 40\]"):
    attention_weights(model, input_ids=np.r_[IDS, 40])
  with pytest.raises(ValueError, match="got Figure"):
    attention_weights(Figure(), input_ids=IDS)


def test_rollout_hand_computed():
  # Head mean [[1, 0], [.3, .7]].
  first = np.array([[[1.0, 0.0], [0.5, 0.5]], [[1.0, 0.0], [0.1, 0.9]]])
  second = np.array([[[0.6, 0.4], [0.2, 0.8]]] * 2)
  # Residual: A1 = ([[1, 0], [.3, .7]] + I) / rows = [[1, 0], [.15, .85]],
  # A2 = [[.8, .2], [.1, .9]]; rollout = A2 @ A1.
  np.testing.assert_allclose(rollout([first, second]), [[0.83, 0.17], [0.235, 0.765]], atol=1e-7)
  np.testing.assert_allclose(rollout([first, second], residual=False), [[0.72, 0.28], [0.44, 0.56]],
                             atol=1e-7)
  np.testing.assert_allclose(rollout([first], residual=False), first.mean(0), atol=1e-7)
  with pytest.raises(ValueError, match=r"layers\[1\] must be \[heads, 2, 2\]"):
    rollout([first, np.ones((2, 3, 3))])
  with pytest.raises(ValueError, match="non-empty list"):
    rollout([])


def test_plots_write_readable_pngs(tmp_path):
  rng = np.random.default_rng(0)
  weights = rng.random((10, 5, 5)).astype(np.float32)
  labels = ["<s>", "$a", "\n", "b", "</s>"]  # mathtext and control characters in labels
  path = plot_attention(weights, labels, labels, str(tmp_path / "deep" / "layer.png"), title="t")
  image = matplotlib.image.imread(path)
  # 8 of 10 heads + the mean: a 3 x 3 grid of 2.5-inch panels at 100 dpi.
  assert image.shape[0] >= 750 and image.shape[1] >= 750 and image[..., :3].std() > 0.05
  assert os.listdir(tmp_path / "deep") == ["layer.png"]
  long_labels = [f"t{i}" for i in range(150)]  # ticks subsampled to 1 in 3
  one = plot_attention(rng.random((150, 150)), long_labels, long_labels, str(tmp_path / "long.png"),
                       title="long")
  assert png_to_array(one).shape[2] == 3
  alignment = plot_alignment([rng.random((4, 3, 6))] * 2, list("abcdef"), list("xyz"),
                             str(tmp_path / "alignment.png"))
  array = png_to_array(alignment)
  assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
  with pytest.raises(ValueError, match="row_labels and col_labels must have 5 and 5 entries"):
    plot_attention(weights, labels[:4], labels, str(tmp_path / "x.png"), title="t")
  with pytest.raises(ValueError, match=r"heads must be .* in \[0, 10\), got \[10\]"):
    plot_attention(weights, labels, labels, str(tmp_path / "x.png"), title="t", heads=[10])
  figure = Figure(figsize=(3, 2), dpi=50)
  figure.add_subplot().plot([0, 1], [1, 0])
  pixels = figure_array(figure)
  assert pixels.shape == (100, 150, 3) and pixels.dtype == np.uint8


def test_long_title_on_a_small_figure_is_wrapped_not_cut(tmp_path):
  # Three tokens make the narrowest figure; a rollout's title is wider than it on one line.
  labels = ["<s>", "hi", "</s>"]
  weights = np.random.default_rng(0).dirichlet(np.ones(3), size=3)
  image = png_to_array(plot_attention(
      weights, labels, labels, str(tmp_path / "rollout.png"),
      title="example0: self-attention rollout over 6 layers", row_name="output token (last layer)",
      col_name="input token"))
  title_band = image[: image.shape[0] // 6]
  assert title_band.min() < 100  # The title is drawn ...
  edges = np.concatenate([title_band[:, :3], title_band[:, -3:]], axis=1)
  assert edges.min() > 250  # ... and no glyph touches the left or right edge (cut text would).


def test_attention_report_decoder(tmp_path):
  model = DecoderLM(LLAMA, rngs=nnx.Rngs(0))
  paths = attention_report(model, CharTokenizer(), "a cat", str(tmp_path), prefix="lm")
  assert [os.path.basename(p) for p in paths] == [
      "lm_self_layer0.png", "lm_self_layer1.png", "lm_self_rollout.png"]
  for path in paths:
    assert matplotlib.image.imread(path).shape[0] > 200


def test_attention_report_frames_text_as_the_task_did(tmp_path, monkeypatch):
  """A stream LM (PTB) saw every text after an eos and never a bos: `Task.encode` frames it so, and
  `attention_report(encode=...)` draws exactly those tokens."""
  from flaxattn.data.tasks import Task
  from flaxattn.models import attention_maps

  tokenizer = CharTokenizer()
  common = dict(kind="lm", tokenizer=tokenizer, vocab_size=40, class_names=(), raw={}, examples={},
                lengths={"tokens": 16}, options={})
  assert Task(**common).encode("ab") == [1, 3, 4, 2]
  stream = Task(**common, stream=True)
  assert stream.encode("ab") == [2, 3, 4, 2]
  drawn = []
  monkeypatch.setattr(attention_maps, "plot_attention",
                      lambda weights, rows, cols, path, **kw: drawn.append((rows, weights.shape)))
  attention_report(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), tokenizer, "ab", str(tmp_path),
                   encode=stream.encode)
  assert drawn and all(rows == ["</s>", "a", "b", "</s>"] and shape[-1] == 4
                       for rows, shape in drawn)


@pytest.mark.slow
def test_attention_report_translation_given_and_generated(tmp_path):
  model = EncoderDecoder(dataclasses.replace(LLAMA, num_decoder_layers=1), rngs=nnx.Rngs(2))
  given = attention_report(model, CharTokenizer(), ("the cat", "le chat"), str(tmp_path / "given"),
                           prefix="mt")
  assert [os.path.basename(p) for p in given] == [
      "mt_encoder_layer0.png", "mt_encoder_layer1.png", "mt_decoder_layer0.png",
      "mt_cross_layer0.png", "mt_encoder_rollout.png", "mt_decoder_rollout.png", "mt_alignment.png"]
  generated = attention_report(model, CharTokenizer(), "the cat", str(tmp_path / "generated"),
                               prefix="mt", max_new_tokens=5)
  assert len(generated) == 7 and all(os.path.getsize(path) > 1000 for path in generated)


def _drawn_rows(monkeypatch) -> list:
  """Replaces `plot_attention` by a recorder of each heatmap's row labels."""
  from flaxattn.models import attention_maps
  drawn = []
  monkeypatch.setattr(attention_maps, "plot_attention",
                      lambda weights, rows, cols, path, **kw: drawn.append(rows) or path)
  return drawn


def test_attention_report_takes_a_task_tokenizer(tmp_path, monkeypatch):
  from flaxattn.data.tokenizers import WordTokenizer
  tokenizer = WordTokenizer.build(["the cat sat", "a dog ran"])
  drawn = _drawn_rows(monkeypatch)
  attention_report(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), tokenizer, "the cat sat", str(tmp_path))
  assert drawn == [["<bos>", "the", "cat", "sat", "<eos>"]] * 3  # 2 layers and the rollout


def test_attention_report_rejects_what_is_not_a_tokenizer(tmp_path):
  class Backend:  # e.g. a raw Hugging Face tokenizer: no special ids of the contract.
    def encode(self, text):
      return [3]
  with pytest.raises(ValueError, match=r"tokenizer Backend lacks \['pieces', 'pad_id', 'bos_id', "
                                       r"'eos_id'\]: attention_report takes a"):
    attention_report(DecoderLM(LLAMA, rngs=nnx.Rngs(0)), Backend(), "a", str(tmp_path))


# ------------------------------------------------------------------------------------------------
# Probes: the weights recomputed from the lse of the kernel the config names.

def test_probe_weights_of_blockwise_alibi_equal_the_reference_kernels():
  """The flex path (the kernel's own lse), scanned; 'xla' + RoPE (an lse from one flex pass) is
  `test_decoder_weights_match_numpy_softmax_of_the_layers_queries_and_keys`."""
  from flaxattn.nn import capture_attention_probes
  config = dataclasses.replace(LLAMA, attention_impl="blockwise", positions="alibi", softcap=5.0,
                               window=3, scan_layers=True)
  graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))

  @jax.jit
  def both(state):
    model = nnx.merge(graphdef, state)
    _, expected = capture_attention_weights(model, IDS[None])  # The dense 'reference' kernel.
    _, probes = capture_attention_probes(model, IDS[None])
    return expected, {name: [probe.weights() for probe in layers] for name, layers in probes.items()}

  expected, recomputed = both(state)
  assert list(recomputed) == list(expected) == ["decoder/layers/attention"]
  for got, weights in zip(recomputed["decoder/layers/attention"],
                          expected["decoder/layers/attention"]):
    np.testing.assert_allclose(got, weights, atol=1e-6)  # float32 vs float32


def test_probe_weights_with_sinks_match_numpy():
  from flaxattn.nn import alibi_slopes, capture_attention_probes
  config = dataclasses.replace(LLAMA, attention_impl="blockwise", positions="alibi",
                               attention_sinks=True)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  sinks = np.array([[0.5, -1.0, 2.0, 0.0], [1.5, 0.3, -0.2, 3.0]], np.float32)
  for layer, values in zip(model.decoder.layers, sinks):
    layer.attention.sinks[...] = values
  graphdef, state = nnx.split(model)
  probes = jax.jit(lambda state: capture_attention_probes(nnx.merge(graphdef, state), IDS[None])[1])(
      state)
  length = len(IDS)
  distance = np.abs(np.arange(length)[:, None] - np.arange(length)[None])
  causal = np.tril(np.ones((length, length), bool))
  for probe, sink in zip(probes["decoder/layers/attention"], sinks):
    query = np.asarray(probe.query[0], np.float64)
    key = np.repeat(np.asarray(probe.key[0], np.float64), 2, axis=1)
    logits = np.einsum("thd,shd->hts", query, key) / np.sqrt(query.shape[-1])
    logits = logits - alibi_slopes(4)[:, None, None] * distance
    logits = np.where(causal, logits, -np.inf)
    exp = np.exp(logits)
    expected = exp / (exp.sum(-1, keepdims=True) + np.exp(sink.astype(np.float64))[:, None, None])
    np.testing.assert_allclose(probe.weights()[0], expected, atol=2e-6, rtol=1e-5)


def test_long_input_summary_equals_the_reference_map_pooled_in_numpy_and_is_drawn(tmp_path,
                                                                                 monkeypatch):
  from flaxattn.models import attention_maps
  config = dataclasses.replace(LLAMA, attention_impl="blockwise", positions="alibi")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  tokenizer = CharTokenizer()
  ids = np.asarray(tokenizer.encode("attention at length, pooled.", add_special_tokens=True))
  assert len(ids) == 30
  summaries = attention_maps.attention_summary(model, input_ids=ids, bins=4)  # Bins of 8, last 6.
  graphdef, state = nnx.split(model)  # The dense 'reference' kernel, ALiBi as a bias array.
  full = jax.jit(lambda s: capture_attention_weights(nnx.merge(graphdef, s), ids[None])[1])(state)
  for layer, summary in zip(full["decoder/layers/attention"], summaries):
    weights = np.asarray(layer[0], np.float64)  # [heads, 30, 30]
    binned = np.pad(weights, [(0, 0), (0, 2), (0, 2)]).reshape(4, 4, 8, 4, 8).sum(axis=(2, 4))
    np.testing.assert_allclose(summary["pooled"], binned / np.array([8, 8, 8, 6])[:, None],
                               atol=2e-6)
    np.testing.assert_allclose(summary["last_row"], weights[:, -1], atol=2e-6)
    np.testing.assert_allclose(summary["sink_mass"], weights[..., 0], atol=2e-6)
    np.testing.assert_allclose(summary["max_weight"], weights.max(-1), atol=2e-6)
    np.testing.assert_allclose(summary["learned_sink"], 0.0, atol=2e-6)
    logs = np.log(np.where(weights > 0, weights, 1.0))
    np.testing.assert_allclose(summary["entropy"], -(weights * logs).sum(-1), atol=2e-5)

  # The report draws it (the same compiled summary): pooled maps and curves, no rollout.
  monkeypatch.setattr(attention_maps, "FULL_MAP_TOKENS", 8)
  monkeypatch.setattr(attention_maps, "SUMMARY_BINS", 4)
  paths = attention_report(model, tokenizer, "attention at length, pooled.", str(tmp_path),
                           prefix="long")
  assert [os.path.basename(path) for path in paths] == [
      "long_self_layer0.png", "long_self_layer1.png", "long_self_curves.png"]
  for path in paths:
    image = png_to_array(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 300 and image.std() > 10, path


def test_summary_of_16k_tokens_holds_no_map_in_memory():
  """The jitted summary of a 16k-token input, traced (not run): its largest intermediate is one
  query bin's weights `[heads, 16384 / bins, 16384]` (heads / bins = 1/16 of one head's `[q, kv]`
  map)."""
  from attention_support import largest_intermediate
  from flaxattn.models import attention_maps
  for changes in (dict(), dict(positions="alibi", attention_sinks=True)):  # Dense / flex path.
    config = dataclasses.replace(LLAMA, attention_impl="blockwise", **changes)
    graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(0)))
    length, bins = 16384, attention_maps.SUMMARY_BINS
    inputs = {"input_ids": np.zeros((1, length), np.int32)}
    jaxpr = jax.make_jaxpr(
        lambda s: attention_maps._forward_summary(graphdef, s, inputs, bins))(state)
    largest, nested = largest_intermediate(jaxpr.jaxpr)
    assert nested > 0 and largest <= 4 * (length // bins) * length < length * length // 8, largest
