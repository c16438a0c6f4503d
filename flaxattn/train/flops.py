"""Model FLOPs of a batch (matmuls on real tokens only) and the devices' matmul rate, for MFU.

What counts (a multiply-add is 2 FLOPs): every matmul of the forward pass on the batch's real
(non-padding) tokens: the attention projections (query, key, value, output), the MLP, the output
head (the LM head, tied or not; the classifier head once per example), the attention scores and
weighted values, and for an encoder-decoder the encoder, the decoder and the cross-attention (its
key/value projections act on the source tokens). A training step is 3 forward passes (backward =
2 x forward); rematerialisation is not counted (model FLOPs, not hardware FLOPs).

What does not: embedding lookups (token, position, token type: gathers, not matmuls), norms,
activations, softmax, biases, RoPE, ALiBi / relative biases, and every FLOP spent on padding.

Attention counts the (query, key) pairs the mask allows between real tokens: `4 * heads *
head_dim` FLOPs per pair and layer. So a causal row of `n` real tokens counts `n * (n + 1) / 2`
pairs (the lower triangle with its diagonal, not the full square a dense kernel computes), a
packed row counts each document's triangle, and a sliding window its band. The peak MFU divides by
(`measured_peak_flops`) is a dense matmul where every FLOP is useful, so both sides count useful
work only. Kernelized attention (`attention_kind='linear'` / `'performer'`) counts its recurrent
form: the feature maps and `4 * heads * features * head_dim` per token for the state.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.nn.config import TransformerConfig

KINDS = ("lm", "classification", "seq2seq")


def _projection_flops(config: TransformerConfig) -> int:
  """Forward FLOPs per token of one block's self-attention projections and MLP."""
  d, hd = config.d_model, config.features_per_head
  kv = config.kv_heads or config.num_heads
  attention = 2 * d * hd * (2 * config.num_heads + 2 * kv)
  mlp = 2 * d * config.mlp_dim * (3 if config.gated_mlp else 2)
  return attention + mlp


def _kernelized_flops(config: TransformerConfig) -> int:
  """Forward FLOPs per token and layer of kernelized attention, recurrent form (0 for softmax)."""
  if config.attention_kind == "softmax":
    return 0
  hd, heads = config.features_per_head, config.num_heads
  features = config.performer_features if config.attention_kind == "performer" else hd
  feature_map = 2 * 2 * hd * features * heads if config.attention_kind == "performer" else 0
  return feature_map + 4 * heads * features * hd


def attended_pairs(valid, *, causal: bool, window: int | None = None, positions=None):
  """Number of (query, key) pairs of real tokens that the self-attention mask allows, per row.

  Args:
    valid: `[batch, length]`, nonzero = real token (real tokens of a row assumed contiguous).
    causal: a query sees the keys up to itself (of its own document when `positions` restart).
    window: `TransformerConfig.window` (None = global).
    positions: int `[batch, length]` restarting at 0 in each packed document (causal only);
      default: real tokens counted from 0.

  Returns float32 `[batch]`.
  """
  valid = jnp.asarray(valid) != 0
  counted = jnp.cumsum(valid.astype(jnp.float32), axis=1) - 1.0  # Index among the real tokens.
  if causal:
    own = counted if positions is None else jnp.asarray(positions, jnp.float32)
    keys = own + 1.0 if window is None else jnp.minimum(own + 1.0, window)
  else:
    n = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
    if window is None:
      keys = jnp.broadcast_to(n, valid.shape)
    else:
      keys = (jnp.minimum(counted, window - 1) + jnp.minimum(n - 1.0 - counted, window - 1) + 1.0)
  return jnp.sum(jnp.where(valid, keys, 0.0), axis=1)


def _stack_flops(config: TransformerConfig, layers: int, valid, *, causal: bool, positions=None):
  """Forward FLOPs of `layers` self-attention blocks over the real tokens of `valid`."""
  tokens = jnp.sum(jnp.asarray(valid) != 0).astype(jnp.float32)
  per_token = _projection_flops(config) + _kernelized_flops(config)
  flops = tokens * per_token
  if config.attention_kind == "softmax":
    pairs = jnp.sum(attended_pairs(valid, causal=causal, window=config.window, positions=positions))
    flops = flops + pairs * 4 * config.num_heads * config.features_per_head
  return layers * flops


def forward_flops(config: TransformerConfig, kind: str, batch: dict, *, num_classes: int = 0,
                  pooling: str = "first") -> jax.Array:
  """Matmul FLOPs of one forward pass of the model of `kind` on `batch` (its real tokens only; see
  the module docstring), float32 `[]`. Works on NumPy arrays and inside `jax.jit`.

  `batch` follows `flaxattn.train.losses`: lm `inputs` (`mask`, `positions`, `segment_ids`
  optional), classification `inputs`, `mask`, seq2seq `source_mask`, `target_mask`.
  `num_classes` and `pooling` describe a classifier's head.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  d, hd, heads = config.d_model, config.features_per_head, config.num_heads
  kv = config.kv_heads or heads
  count = lambda valid: jnp.sum(jnp.asarray(valid) != 0).astype(jnp.float32)
  if kind == "lm":
    inputs = jnp.asarray(batch["inputs"])
    valid = batch.get("mask")
    if valid is None:
      valid = (jnp.ones(inputs.shape, bool) if batch.get("segment_ids") is None
               else jnp.asarray(batch["segment_ids"]) > 0)
    flops = _stack_flops(config, config.num_layers, valid, causal=True,
                         positions=batch.get("positions"))
    return flops + count(valid) * 2 * d * config.vocab_size
  if kind == "classification":
    valid = jnp.asarray(batch["mask"])
    examples = jnp.sum(jnp.any(valid != 0, axis=1)).astype(jnp.float32)
    flops = _stack_flops(config, config.num_layers, valid, causal=False)
    if pooling == "attention":
      flops = flops + count(valid) * 2 * d  # The pooling score `[embed] -> 1` per token.
    return flops + examples * 2 * d * num_classes
  source, target = jnp.asarray(batch["source_mask"]), jnp.asarray(batch["target_mask"])
  layers = config.decoder_layers
  flops = _stack_flops(config, config.num_layers, source, causal=False)
  flops = flops + _stack_flops(config, layers, target, causal=True)
  # Cross-attention: query and output per target token, key and value per source token, and every
  # real (target, source) pair of a row.
  pairs = jnp.sum(jnp.sum(target != 0, axis=1).astype(jnp.float32) *
                  jnp.sum(source != 0, axis=1).astype(jnp.float32))
  flops = flops + layers * (count(target) * 2 * d * hd * 2 * heads
                            + count(source) * 2 * d * hd * 2 * kv + pairs * 4 * heads * hd)
  return flops + count(target) * 2 * d * config.vocab_size


def train_flops(config: TransformerConfig, kind: str, batch: dict, **head) -> jax.Array:
  """Model FLOPs of one training step on `batch`: 3 forward passes (`forward_flops`)."""
  return 3.0 * forward_flops(config, kind, batch, **head)


def real_tokens(kind: str, batch: dict) -> jax.Array:
  """Real (non-padding) input tokens of `batch`, float32 `[]`: the model's inputs (source and target
  for seq2seq), what `tokens_per_s` counts."""
  if kind == "seq2seq":
    return sum(jnp.sum(jnp.asarray(batch[name]) != 0).astype(jnp.float32)
               for name in ("source_mask", "target_mask"))
  if batch.get("mask") is not None:
    return jnp.sum(jnp.asarray(batch["mask"]) != 0).astype(jnp.float32)
  if batch.get("segment_ids") is not None:
    return jnp.sum(jnp.asarray(batch["segment_ids"]) > 0).astype(jnp.float32)
  return jnp.asarray(np.prod(jnp.shape(batch["inputs"])), jnp.float32)


def forward_flops_per_token(config: TransformerConfig, kind: str, seq_len: int, *,
                            target_len: int | None = None, num_classes: int = 0,
                            pooling: str = "first") -> float:
  """`forward_flops` per input token of one unpadded sequence of `seq_len` tokens (seq2seq: a source
  of `seq_len` and a target of `target_len`, default `seq_len`): the model summary's FLOPs per
  token."""
  full = np.ones((1, seq_len), np.int32)
  batch = ({"source_mask": full, "target_mask": np.ones((1, target_len or seq_len), np.int32)}
           if kind == "seq2seq" else {"inputs": full, "mask": full})
  return float(forward_flops(config, kind, batch, num_classes=num_classes, pooling=pooling) /
               real_tokens(kind, batch))


def measured_peak_flops(mesh: jax.sharding.Mesh, size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 `[size, size] @ [size, size]` matmul on every device of `mesh` at once
  (the best of `repeats`): the reference for MFU on CPUs, which publish no peak. Simulated CPU
  devices share the host's cores, so their combined rate is the host's."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  devices = mesh.devices.size
  # Built per device (`make_array_from_callback`), so it also works when other processes own some.
  a = jax.make_array_from_callback((devices, size, size), sharding,
                                   lambda index: np.ones((1, size, size), np.float32))
  matmul = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x), out_shardings=sharding)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * devices * size**3 / best
