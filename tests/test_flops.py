"""Model FLOPs (`flaxattn.train.flops`) against a hand count from the models' own kernel shapes and
explicit (query, key) pair loops, and against XLA's cost analysis of the jitted forward pass."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.models import DecoderLM, EncoderClassifier, EncoderDecoder
from flaxattn.nn import TransformerConfig
from flaxattn.train import flops

SMALL = TransformerConfig(vocab_size=50, d_model=16, num_heads=4, kv_heads=2, head_dim=8,
                          mlp_dim=24, num_layers=2, num_decoder_layers=3, gated_mlp=True,
                          max_length=16, tie_embeddings=False)


def kernels(model) -> dict[str, int]:
  """'/'-joined parameter path -> size, of every matmul kernel (no embeddings, norms or biases)."""
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {"/".join(map(str, path)): int(np.prod(value.shape)) for path, value in params
          if path[-1] == "kernel"}


def pairs(lengths, causal, window=None) -> int:
  """(query, key) pairs a mask allows, counted one by one, over rows of `lengths` real tokens."""
  total = 0
  for n in lengths:
    for q, k in itertools.product(range(n), repeat=2):
      near = window is None or abs(q - k) < window
      total += (k <= q or not causal) and near
  return total


def valid(lengths, width):
  return np.array([[1] * n + [0] * (width - n) for n in lengths], np.int32)


def head_flops(config):
  return 4 * config.num_heads * config.features_per_head  # Scores and values: 2 matmuls x 2 FLOPs.


@pytest.mark.parametrize("window", [None, 3])
def test_decoder_lm_hand_count(window):
  config = TransformerConfig(**{**SMALL.__dict__, "window": window})
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  sizes = kernels(model)
  lengths = [5, 8, 1]
  tokens = sum(lengths)
  # Every kernel of the blocks and the LM head multiplies each real token once.
  expected = 2 * tokens * sum(sizes.values())
  expected += config.num_layers * pairs(lengths, causal=True, window=window) * head_flops(config)
  batch = {"inputs": np.zeros((3, 8), np.int32), "mask": valid(lengths, 8)}
  assert float(flops.forward_flops(config, "lm", batch)) == expected
  assert float(flops.train_flops(config, "lm", batch)) == 3 * expected
  assert float(flops.real_tokens("lm", batch)) == tokens


def test_packed_lm_counts_each_document():
  config = SMALL
  sizes = kernels(DecoderLM(config, rngs=nnx.Rngs(0)))
  # Row 0: documents of 3 and 2 tokens, then 1 padding; row 1: one document of 6.
  segments = np.array([[1, 1, 1, 2, 2, 0], [1] * 6], np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 0], list(range(6))], np.int32)
  batch = {"inputs": np.zeros((2, 6), np.int32), "segment_ids": segments, "positions": positions}
  expected = (2 * 11 * sum(sizes.values())
              + config.num_layers * pairs([3, 2, 6], causal=True) * head_flops(config))
  assert float(flops.forward_flops(config, "lm", batch)) == expected
  assert float(flops.real_tokens("lm", batch)) == 11


@pytest.mark.parametrize("pooling", ["first", "attention"])
def test_encoder_classifier_hand_count(pooling):
  config = TransformerConfig(**{**SMALL.__dict__, "tie_embeddings": True})
  model = EncoderClassifier(config, 3, pooling=pooling, rngs=nnx.Rngs(0))
  sizes = kernels(model)
  block = sum(size for path, size in sizes.items() if "/layers/" in path)
  lengths, examples = [7, 2, 0], 2  # The last row is a padding example: no tokens, no head.
  tokens = sum(lengths)
  expected = (2 * tokens * block
              + config.num_layers * pairs(lengths, causal=False) * head_flops(config))
  expected += 2 * examples * sizes["head/kernel"]
  if pooling == "attention":
    expected += 2 * tokens * sizes["attention_pooling/score/kernel"]
  batch = {"inputs": np.zeros((3, 7), np.int32), "mask": valid(lengths, 7)}
  assert len(sizes) == config.num_layers * 7 + 1 + (pooling == "attention")  # All kernels seen.
  assert float(flops.forward_flops(config, "classification", batch, num_classes=3,
                                   pooling=pooling)) == expected


def test_encoder_decoder_hand_count():
  config = SMALL
  sizes = kernels(EncoderDecoder(config, share_embeddings=True, rngs=nnx.Rngs(0)))
  source, target = [6, 3], [4, 5]
  source_tokens, target_tokens = sum(source), sum(target)
  on_source = sum(size for path, size in sizes.items() if path.startswith("encoder/")
                  or "cross_attention/key" in path or "cross_attention/value" in path)
  on_target = sum(sizes.values()) - on_source  # Decoder blocks (queries, outputs, MLP) and LM head.
  expected = 2 * source_tokens * on_source + 2 * target_tokens * on_target
  expected += config.num_layers * pairs(source, causal=False) * head_flops(config)
  expected += config.decoder_layers * pairs(target, causal=True) * head_flops(config)
  cross = sum(s * t for s, t in zip(source, target))
  expected += config.decoder_layers * cross * head_flops(config)
  batch = {"source_mask": valid(source, 6), "target_mask": valid(target, 5)}
  assert float(flops.forward_flops(config, "seq2seq", batch)) == expected
  assert float(flops.real_tokens("seq2seq", batch)) == source_tokens + target_tokens


def test_jitted_counts_match_numpy():
  batch = {"inputs": np.zeros((2, 8), np.int32), "mask": valid([8, 3], 8)}
  jitted = jax.jit(lambda b: flops.forward_flops(SMALL, "lm", b))(batch)
  assert float(jitted) == float(flops.forward_flops(SMALL, "lm", batch))


# Wide enough that matmuls dominate XLA's count, which also has the element-wise work (norms,
# activations, softmax: 1-3% here with ReLU; erf-GELU alone adds 8%); XLA computes a causal mask's
# full square, which the test adds.
XLA = TransformerConfig(vocab_size=256, d_model=128, num_heads=4, head_dim=32, mlp_dim=512,
                        num_layers=2, max_length=32, activation="relu", attention_impl="reference")


def xla_flops(function, *args) -> float:
  analysis = jax.jit(function).lower(*args).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


@pytest.mark.parametrize("kind", ["lm", "classification", "seq2seq"])
def test_forward_flops_near_xla_cost_analysis(kind):
  batch_size, length = 2, 32
  ones = jnp.ones((batch_size, length), jnp.int32)
  rngs = nnx.Rngs(0)
  masked_half = 0  # Pairs above a causal diagonal: XLA's dense kernel computes them, we do not.
  if kind == "lm":
    model = DecoderLM(XLA, rngs=rngs)
    run = lambda m: m(ones, ones)[0]
    batch = {"inputs": ones, "mask": ones}
    masked_half = XLA.num_layers
  elif kind == "classification":
    model = EncoderClassifier(XLA, 5, rngs=rngs)
    run = lambda m: m(ones, ones)
    batch = {"inputs": ones, "mask": ones}
  else:
    model = EncoderDecoder(XLA, rngs=rngs)
    run = lambda m: m(ones, ones, ones, ones)
    batch = {"source_mask": ones, "target_mask": ones}
    masked_half = XLA.decoder_layers
  graphdef, state = nnx.split(model)
  measured = xla_flops(lambda s: run(nnx.merge(graphdef, s)), state)
  ours = float(flops.forward_flops(XLA, kind, batch, num_classes=5))
  ours += masked_half * batch_size * length * (length - 1) / 2 * head_flops(XLA)
  assert 1.0 <= measured / ours < 1.04, (measured, ours)


def test_per_token_flops():
  # One unpadded causal sequence: per token, the kernels plus on average (n + 1) / 2 keys.
  sizes = kernels(DecoderLM(SMALL, rngs=nnx.Rngs(0)))
  n = 8
  expected = 2 * sum(sizes.values()) + SMALL.num_layers * (n + 1) / 2 * head_flops(SMALL)
  assert flops.forward_flops_per_token(SMALL, "lm", n) == pytest.approx(expected, rel=1e-6)


def test_log_line_rates_from_step_counts():
  from flaxattn.train.loop import _rates
  steps = [{"loss": 3.0, "tokens": 4.0, "model_flops": 100.0, "real_tokens": 3.0,
            "padded_tokens": 4.0},
           {"loss": 2.0, "tokens": 4.0, "model_flops": 300.0, "real_tokens": 5.0,
            "padded_tokens": 8.0}]
  record = _rates(steps, elapsed=2.0, peak_flops=10.0)
  assert record == {"loss": 2.0, "tokens_per_s": 4.0, "padded_tokens_per_s": 6.0,
                    "steps_per_s": 1.0, "mfu": 20.0}  # Counts become rates; the last loss.
