"""Position information: sinusoidal and learned embeddings, RoPE, ALiBi, T5 relative position bias.

Everything takes integer `positions` `[batch, length]` (not an implied `arange`), so one code path
serves padded batches and incremental decoding with a KV cache, where each row has its own positions.

The logit biases (ALiBi, T5 buckets) travel as a `PositionBias` value: the attention layer either
materialises it (`dense`, `[batch, heads, q_len, kv_len]`, for kernels that take a bias array) or
turns it into a `flex_attention` score_mod (`score_mod`, evaluated per tile: O(length) memory).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.nn.sharding import param


def sinusoidal(positions: jax.Array, features: int, *, base: float = 10000.0,
               dtype: Any = jnp.float32) -> jax.Array:
  """Fixed embeddings of Vaswani et al.: `[batch, length]` ints -> `[batch, length, features]`.

  Interleaved as in the paper: `pe[..., 2i] = sin(p / base^(2i/features))`, `pe[..., 2i+1] = cos(...)`.
  """
  if features % 2:
    raise ValueError(f"sinusoidal positions need an even number of features, got {features}")
  inv_freq = base ** (-jnp.arange(0, features, 2, dtype=jnp.float32) / features)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(positions.shape + (features,)).astype(dtype)


class LearnedPositions(nnx.Module):
  """A learned table `embedding [max_length, embed]` looked up by position (BERT, GPT-2)."""

  def __init__(self, max_length: int, features: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.max_length, self.dtype = max_length, dtype
    self.embedding = param(rngs, nnx.initializers.normal(stddev=0.02), (max_length, features),
                           (None, "embed"), param_dtype)

  def __call__(self, positions: jax.Array) -> jax.Array:
    """`positions`: int `[batch, length]` in `[0, max_length)` -> `[batch, length, features]`.

    A `length` over `max_length` raises ValueError. The values themselves may be traced, so they are
    clipped into the table: padding's -1 reads row 0 (harmless, padding is masked), and a position
    past the table would read the last row. The models rule that out for decoding: their
    `init_cache` refuses a cache longer than the table, and positions count only the tokens a
    cache holds.
    """
    if jnp.ndim(positions) != 2 or not jnp.issubdtype(jnp.result_type(positions), jnp.integer):
      raise ValueError(
          f"positions must be integer [batch, length], got shape {tuple(jnp.shape(positions))} "
          f"dtype {jnp.result_type(positions)}")
    if positions.shape[1] > self.max_length:
      raise ValueError(
          f"sequence length {positions.shape[1]} exceeds max_length={self.max_length} of the learned "
          "position table")
    return jnp.take(self.embedding[...], jnp.clip(positions, 0, self.max_length - 1),
                    axis=0).astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0,
               rotary_dim: int | None = None) -> jax.Array:
  """Rotary position embedding in the Hugging Face Llama "half" layout.

  Args:
    x: `[batch, length, heads, head_dim]` queries or keys.
    positions: int `[batch, length]`.
    base: wavelength base; frequency `i` is `base^(-2i / rotary_dim)`.
    rotary_dim: leading dims of each head to rotate (even, default all: partial rotation otherwise);
      the remaining dims pass through unchanged.

  Returns:
    `x` rotated, same shape and dtype. With `x1, x2` the two halves of the rotated part,
    `[x1, x2] -> [x1 cos - x2 sin, x2 cos + x1 sin]` (`x * cos + rotate_half(x) * sin`), so
    `rope(q, m) . rope(k, n)` depends on positions only through `m - n`.
  """
  head_dim = x.shape[-1]
  rotary_dim = head_dim if rotary_dim is None else rotary_dim
  if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
    raise ValueError(f"rotary_dim must be even and in (0, head_dim={head_dim}], got {rotary_dim}")
  half = rotary_dim // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rotary_dim)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [batch, length, 1, half]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2, rest = x32[..., :half], x32[..., half:rotary_dim], x32[..., rotary_dim:]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
  return rotated.astype(x.dtype)


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi head slopes (Press et al.): the geometric sequence `2^(-8/n), 2^(-16/n), ...` for `n`
  a power of two; otherwise those of the closest lower power of two followed by every other slope of
  twice that many heads. float32 `[num_heads]`.
  """
  def power_of_two(n):
    start = 2.0 ** (-8.0 / n)
    return [start ** (i + 1) for i in range(n)]

  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][:num_heads - closest]
  return np.asarray(slopes, dtype=np.float32)


def alibi_bias(num_heads: int, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """ALiBi logit bias `-slope_h * |q_pos - kv_pos|`: float32 `[batch, heads, q_len, kv_len]`.

  On the keys a causal query sees this is Press et al.'s `slope * (kv_pos - q_pos)`; the absolute value
  extends it symmetrically to bidirectional attention.
  """
  return PositionBias.alibi(num_heads).dense(q_positions, kv_positions)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
  """T5's bucket of each `kv_pos - q_pos` offset (int array, same shape).

  Bidirectional: half the buckets for positive offsets, half for the rest. Of a side's buckets, the first
  half hold exact offsets `0 .. n/2 - 1`; the others cover `n/2 .. max_distance` logarithmically, and
  farther offsets share the last bucket. Causal: only `offset <= 0` is distinguished (others are bucket 0).
  """
  bucket = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    bucket = bucket + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  # Clamped below so the log never sees 0; those entries take the exact branch anyway.
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
      max_distance / max_exact)
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return bucket + jnp.where(distance < max_exact, distance, large)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PositionBias:
  """A logit bias that is a function of query and key positions, kept as its ingredients.

  Attributes:
    kind: 'alibi' (`-slope_h * |q_pos - kv_pos|`) or 'relative' (T5: `table[bucket(kv_pos - q_pos),
      h]`).
    table: float32 'alibi': the slopes `[heads]`; 'relative': the learned `[num_buckets, heads]`
      table (traced, so its gradient flows through either form).
    bidirectional, num_buckets, max_distance: T5 bucketing (`relative_position_bucket`).
  """

  table: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True), default="alibi")
  bidirectional: bool = dataclasses.field(metadata=dict(static=True), default=True)
  num_buckets: int = dataclasses.field(metadata=dict(static=True), default=32)
  max_distance: int = dataclasses.field(metadata=dict(static=True), default=128)

  @classmethod
  def alibi(cls, num_heads: int) -> "PositionBias":
    return cls(table=jnp.asarray(alibi_slopes(num_heads)), kind="alibi")

  def _bucket(self, relative):
    return relative_position_bucket(relative, bidirectional=self.bidirectional,
                                    num_buckets=self.num_buckets, max_distance=self.max_distance)

  def dense(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """Positions `[batch, q_len]`, `[batch, kv_len]` -> float32 bias `[batch, heads, q_len, kv_len]`."""
    if self.kind == "alibi":
      distance = jnp.abs(q_positions[:, :, None] - kv_positions[:, None, :]).astype(jnp.float32)
      return -self.table[None, :, None, None] * distance[:, None]
    buckets = self._bucket(kv_positions[:, None, :] - q_positions[:, :, None])
    bias = jnp.take(self.table.astype(jnp.float32), buckets, axis=0)  # [b, q, kv, heads]
    return jnp.transpose(bias, (0, 3, 1, 2))

  def score_mod(self, q_positions: jax.Array, kv_positions: jax.Array):
    """The same bias as a `flex_attention` score_mod `(score, batch, head, q_idx, kv_idx)`: the
    indices map to positions through the captured `q_positions` `[batch, q_len]` and `kv_positions`
    `[batch, kv_len]`, so queries decoded at an offset against a cache take their own positions."""
    table = self.table.astype(jnp.float32)

    def score_mod(score, b, h, q_idx, kv_idx):
      q_pos, kv_pos = q_positions[b, q_idx], kv_positions[b, kv_idx]
      if self.kind == "alibi":
        return score - table[h] * jnp.abs(q_pos - kv_pos).astype(jnp.float32)
      return score + table[self._bucket(kv_pos - q_pos), h]

    return score_mod


def capped(score: jax.Array, softcap: float | None) -> jax.Array:
  """`softcap * tanh(score / softcap)`, or `score` when `softcap` is None."""
  return score if softcap is None else softcap * jnp.tanh(score / softcap)


class RelativePositionBias(nnx.Module):
  """T5 relative position bias: a learned `[num_buckets, heads]` table indexed by offset bucket."""

  def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128,
               bidirectional: bool = True, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
    self.embedding = param(rngs, nnx.initializers.normal(stddev=1.0), (num_buckets, num_heads),
                           (None, "heads"), param_dtype)

  def as_bias(self) -> PositionBias:
    """The table and its bucketing as a `PositionBias` (a plain pytree, passed to every layer)."""
    return PositionBias(table=self.embedding[...], kind="relative",
                        bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                        max_distance=self.max_distance)

  def __call__(self, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
    """Positions `[batch, q_len]`, `[batch, kv_len]` -> float32 bias `[batch, heads, q_len, kv_len]`."""
    return self.as_bias().dense(q_positions, kv_positions)
