"""Input handling shared by the models: padding masks, positions, and the self-attention `Mask`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import Mask
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.layers import concrete
from flaxattn.nn.transformer import positions_from_mask


def cache_length(config: TransformerConfig, max_length: int | None) -> int:
  """The length of a new cache (default `config.max_length`), checked against the position table."""
  length = config.max_length if max_length is None else max_length
  if not isinstance(length, (int, np.integer)) or length < 1:
    raise ValueError(f"max_length must be a positive int, got {length!r}")
  if config.positions == "learned" and length > config.max_length:
    raise ValueError(
        f"max_length={length} of the cache exceeds config.max_length={config.max_length}, the "
        "size of the learned position table: later tokens would have no position embedding")
  return int(length)


def check_ids(name: str, ids: jax.Array) -> None:
  """Raises ValueError unless `ids` is an integer `[batch, length]` array."""
  if jnp.ndim(ids) != 2 or not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise ValueError(
        f"{name} must be integer [batch, length], got shape {tuple(jnp.shape(ids))} "
        f"dtype {jnp.result_type(ids)}")


def valid_tokens(name: str, ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array | None:
  """`attention_mask` (1/True = real token, 0 = padding, `[batch, length]`) as bool, or None.

  Values other than 0/1 (e.g. an additive 0/-inf mask, which would read inverted) raise ValueError
  when known (eager calls).
  """
  if attention_mask is None:
    return None
  if tuple(jnp.shape(attention_mask)) != tuple(ids.shape):
    raise ValueError(
        f"{name} must match the ids' shape {tuple(ids.shape)}, got {tuple(jnp.shape(attention_mask))}")
  values = concrete(attention_mask)
  if values is not None and not np.isin(values, (0, 1)).all():
    raise ValueError(
        f"{name} must hold 1/True (real token) and 0/False (padding), got values "
        f"{np.unique(values)[:5].tolist()}")
  return jnp.asarray(attention_mask).astype(bool)


def token_positions(ids: jax.Array, valid: jax.Array | None, start=0) -> jax.Array:
  """Positions `[batch, length]` of the tokens (counting only real ones from `start`), -1 for padding."""
  return positions_from_mask(jnp.ones(ids.shape, bool) if valid is None else valid, start)


def padding_segments(valid: jax.Array) -> jax.Array:
  """Segment ids `[batch, length]` int32 of a padding mask (`valid` bool, True = real token).

  Real tokens get id 1; each run of padding its own id (0, -1, -2, ... left to right), so padding at
  both ends of a row (a left-padded prompt; a right-padded target) still gives segments that are
  contiguous runs: the form range-based kernels (tokamax) need, where one id split into two runs
  would give NaN. Real tokens see exactly the real tokens either way; padding sees only its run.
  """
  valid = jnp.asarray(valid, bool)
  after_real = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid[:, :-1]], axis=1)
  runs = jnp.cumsum(~valid & after_real, axis=1, dtype=jnp.int32)  # padding run count so far
  return jnp.where(valid, 1, 1 - runs).astype(jnp.int32)


def self_attention_mask(valid: jax.Array | None, *, causal: bool) -> Mask | None:
  """Padding (as segment ids, `padding_segments`: real tokens see only real tokens) and optionally
  causal."""
  segments = None if valid is None else padding_segments(valid)
  if segments is None and not causal:
    return None
  return Mask(causal=causal, q_segment_ids=segments, kv_segment_ids=segments)


def context_mask(valid: jax.Array | None) -> Mask | None:
  """Cross-attention mask hiding padded source tokens (`valid` bool `[batch, src_len]`)."""
  return None if valid is None else Mask(array=valid[:, None, None, :])

