"""Reference attention: scores, softmax, weighted sum, written plainly.

The oracle the other implementations are tested against, and the one that returns weights and applies
dropout. It materialises the `[batch, heads, q_len, kv_len]` scores: O(length^2) memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxattn.attention.mask import Mask
from flaxattn.attention.rows import max_shift
from flaxattn.attention.spec import Call, Implementation


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool, mods=None):
  """Arguments as `flaxattn.attention.dot_product_attention`, already validated; `mods` a
  `flex.FlexMods` (score_mod/mask_mod), evaluated densely by flex's reference."""
  if mods is not None:
    return mods.run(query, key, value, mask=mask, bias=bias, scale=scale, softcap=softcap,
                    dense=True)
  q_len, heads = query.shape[1], query.shape[2]
  kv_len, kv_heads = key.shape[1], key.shape[2]
  acc = jnp.promote_types(query.dtype, jnp.float32)
  group = heads // kv_heads
  # Query head h reads key/value head h // group (as jax.nn.dot_product_attention).
  key = jnp.repeat(key.astype(acc), group, axis=2)
  value = jnp.repeat(value.astype(acc), group, axis=2)

  logits = jnp.einsum("bthd,bshd->bhts", query.astype(acc), key) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + bias.astype(acc)
  visible = None if mask is None else mask.materialize(q_len, kv_len)
  if visible is not None:
    logits = jnp.where(visible, logits, -jnp.inf)

  # Max-subtracted softmax; a row that sees no key gets all-zero weights (not NaN, zero gradient).
  row_max = max_shift(jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  unnormalized = jnp.exp(logits - row_max)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  weights = unnormalized / jnp.where(total == 0.0, 1.0, total)

  mixed = weights
  if dropout_rate > 0.0:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    mixed = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhts,bshd->bthd", mixed, value).astype(query.dtype)
  return (out, weights) if return_weights else out


def _constraints(call: Call) -> str | None:
  if call.mods and (call.weights or call.dropout):
    return "return_weights/dropout together with score_mod/mask_mod"
  return None


IMPLEMENTATION = Implementation(
    name="reference",
    fn=attention,
    masks=frozenset({"causal", "window", "segment_ids", "lengths", "array"}),
    bias=True,
    softcap=True,
    dropout=True,
    weights=True,
    dtypes=frozenset({"float32", "bfloat16", "float16", "float64"}),
    platforms=frozenset({"cpu", "gpu", "tpu"}),
    memory="O(length^2)",
    notes="The oracle: materialises scores in float32. Only implementation with dropout and weights "
          "(not with flex mods).",
    constraints=_constraints,
    mods=True,
)
