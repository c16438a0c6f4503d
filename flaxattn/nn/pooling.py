"""Sequence pooling `[batch, length, features] -> [batch, features]`: first token, mean, attention."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.nn.layers import Dense

POOLINGS = ("first", "mean", "attention")


def _valid(x: jax.Array, valid: jax.Array | None) -> jax.Array:
  if valid is None:
    return jnp.ones(x.shape[:2], bool)
  if tuple(valid.shape) != tuple(x.shape[:2]):
    raise ValueError(f"valid must be [batch, length] = {x.shape[:2]}, got shape {valid.shape}")
  return valid.astype(bool)


def mean_pool(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Mean over the real tokens (`valid` bool `[batch, length]`, True = real; None = all), in float32
  then cast back (sentence-transformers' mean pooling). A row with no real token gives zeros.
  """
  weights = _valid(x, valid).astype(jnp.float32)[..., None]
  total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
  return (total / jnp.maximum(jnp.sum(weights, axis=1), 1.0)).astype(x.dtype)


class AttentionPooling(nnx.Module):
  """Learned attention pooling: `sum_t softmax_t(score(x_t)) x_t` over real tokens, with
  `score = x . w + b` (`score.kernel [embed, 1]`). Returns `[batch, features]`; with
  `sow_weights` set (`nnx.with_attributes(model, only=AttentionPooling, sow_weights=True)`, then
  `nnx.capture(..., nnx.Intermediate)`), the pooling weights `[batch, length]` (float32) are sown
  as 'pooling_weights'.
  """

  def __init__(self, features: int, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    self.score = Dense(features, 1, in_axes=("embed",), out_axes=(None,), dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.sow_weights = False  # Static, as `MultiHeadAttention.sow_weights`.

  def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """`x`: `[batch, length, features]`; `valid`: bool `[batch, length]` or None."""
    valid = _valid(x, valid)
    scores = jnp.where(valid, self.score(x)[..., 0].astype(jnp.float32), -jnp.inf)
    # A row with no real token would be all -inf: give it zero weights instead of NaN.
    weights = jnp.where(valid.any(axis=1, keepdims=True), jax.nn.softmax(scores, axis=1), 0.0)
    pooled = jnp.einsum("bt,btd->bd", weights, x.astype(jnp.float32)).astype(x.dtype)
    if self.sow_weights:
      self.sow(nnx.Intermediate, "pooling_weights", weights)
    return pooled


def pool(kind: str, x: jax.Array, valid: jax.Array | None = None,
         attention: AttentionPooling | None = None) -> jax.Array:
  """Pools by `kind` in `POOLINGS` ('first' takes position 0, as BERT's [CLS])."""
  if kind == "first":
    return x[:, 0]
  if kind == "mean":
    return mean_pool(x, valid)
  if kind == "attention":
    return attention(x, valid)
  raise ValueError(f"pooling must be one of {POOLINGS}, got {kind!r}")
