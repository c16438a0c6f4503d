"""`jax.nn.dot_product_attention(implementation='xla')` behind the flaxattn contract.

The flaxattn mask is materialised into the explicit boolean mask (the XLA path materialises the scores
anyway, so this costs a quarter of what it already spends); rows that see no key are zeroed afterwards,
because jax spreads such rows uniformly over the masked keys.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxattn.attention import rows
from flaxattn.attention.mask import Mask
from flaxattn.attention.spec import Implementation


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool):
  """Arguments as `flaxattn.attention.dot_product_attention`, already validated."""
  del softcap, dropout_rate, dropout_rng, return_weights  # Not supported: the dispatcher never passes them.
  q_len, kv_len = query.shape[1], key.shape[1]
  value_dim = value.shape[-1]
  # jax.nn.dot_product_attention wants one head_dim for query, key and value.
  query, key, value = rows.pad_to_one_head_dim(query, key, value)
  visible = None if mask is None else mask.materialize(q_len, kv_len)
  if bias is not None:
    bias = bias.astype(jnp.promote_types(query.dtype, jnp.float32))
  out = jax.nn.dot_product_attention(
      query, key, value, bias=bias, mask=visible, scale=scale, implementation="xla")[..., :value_dim]
  if visible is not None:
    out = rows.zero_rows_without_keys(out, jnp.any(visible, axis=-1))
  return out


IMPLEMENTATION = Implementation(
    name="xla",
    fn=attention,
    masks=frozenset({"causal", "window", "segment_ids", "lengths", "array"}),
    bias=True,
    softcap=False,
    dropout=False,
    weights=False,
    dtypes=frozenset({"float32", "bfloat16", "float16"}),
    platforms=frozenset({"cpu", "gpu", "tpu"}),
    memory="O(length^2)",
    notes="jax.nn.dot_product_attention(implementation='xla'); dense scores.",
)
