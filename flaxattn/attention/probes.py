"""Probes: attention weights and per-query statistics recomputed from a kernel's log-sum-exp.

A fast kernel (`flex_attention(..., return_lse=True)`, `blockwise.forward_with_lse`) never forms the
`[q_len, kv_len]` weights, but its log-sum-exp fixes them: the weight of key `j` for query `i` is
`p_ij = exp(s_ij - lse_i)`, `s_ij` the scaled logit after the score_mod, and 0 where the key is
masked. From the same query, key, mods and lse:

- `attention_rows` recomputes the weights of a few chosen query rows, `[batch, heads, rows,
  kv_len]`, in O(rows x kv_len) memory.
- `attention_statistics` streams over key tiles (the tiling and block skipping of `flex_attention`)
  and returns per-query entropy, mass on the first `sink_keys` keys, the largest weight and the
  top-k keys, never holding more than one `[query tile, key tile]` block.

Mods are evaluated exactly as inside `flex_attention` (its `_hoist` and `_evaluate`), so the weights
match the kernel's softmax to float32 rounding. A `Mask` (`flaxattn.attention.Mask`) may be passed
as `mask=` instead of a mask_mod: it is converted to the same mask_mod (`mask_to_mask_mod`).

The lse is taken in flex_attention's layout `[batch, heads, q_len]`; `blockwise.forward_with_lse`
returns `[batch, q_len, heads]`: pass `jnp.swapaxes(lse, 1, 2)`. A non-finite lse (flex gives -inf,
blockwise +inf) marks a query that sees no key: all its weights are 0.

Entropy. With `p_j = exp(s_j - lse)` over the visible keys, `log p_j = s_j - lse`, so
`H = -sum_j p_j log p_j = -sum_j p_j (s_j - lse) = lse * sum_j p_j - sum_j p_j s_j = lse - sum_j p_j
s_j` (as `sum_j p_j = 1`). It is accumulated per tile as `-sum_j p_j (s_j - lse)`, which avoids the
cancellation of the last form when `lse` is large; masked keys (p = 0) add nothing. A query that
sees no key has entropy 0 by definition (and sink mass, max weight, total weight 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import blockwise, flex
from flaxattn.attention.mask import Mask

Array = Any

_STREAMED = ("entropy", "max_weight", "total_weight")  # Folded over the key tiles.


# ------------------------------------------------------------------------------------------------
# Inputs.

def mask_to_mask_mod(mask: Mask, q_len: int, kv_len: int):
  """The mask_mod `(batch, head, q_idx, kv_idx) -> bool` that sees what `mask` sees for a call of
  these lengths (query `i` at position `i + kv_len - q_len`, as `Mask` aligns them)."""
  if not isinstance(mask, Mask):
    raise ValueError(f"mask must be a flaxattn.attention.Mask or None, got {type(mask).__name__}")
  return mask.mask_mod(offset=kv_len - q_len)


def _inputs(query, key, lse, scale, mask_mod, mask):
  """Checked `(query, key, lse, scale, mask_mod)`; `mask` folded into `mask_mod`."""
  query, key, lse = jnp.asarray(query), jnp.asarray(key), jnp.asarray(lse)
  flex._check_inputs(query, key, key, scale, None)
  batch, q_len, heads, head_dim = query.shape
  if lse.shape != (batch, heads, q_len):
    raise ValueError(f"lse must have shape [batch, heads, q_len] = {[batch, heads, q_len]} (as "
                     f"flex_attention returns it; swap axes 1 and 2 of blockwise's), "
                     f"got {lse.shape}")
  if mask is not None:
    if mask_mod is not None:
      raise ValueError("pass mask_mod or mask, not both: combine them with and_masks(mask_mod, "
                       "mask_to_mask_mod(mask, q_len, kv_len))")
    mask.validate(batch, heads, q_len, key.shape[1])
    mask_mod = mask_to_mask_mod(mask, q_len, key.shape[1])
  scale = float(head_dim ** -0.5 if scale is None else scale)
  # +inf marks a row without keys (exp(s - lse) = 0 there), as inside the kernels.
  lse = jnp.where(jnp.isfinite(lse), lse.astype(jnp.float32), jnp.inf)
  return query, key, lse, scale, mask_mod


def _rows_index(rows, q_len: int):
  """`rows` as an int32 `[rows]` array; static rows are range-checked, traced ones clipped."""
  try:
    index = np.asarray(rows)
  except jax.errors.TracerArrayConversionError:
    if rows.ndim != 1 or not jnp.issubdtype(rows.dtype, jnp.integer):
      raise ValueError(f"rows must be a 1-d integer array, got {rows.dtype}{list(rows.shape)}")
    return jnp.clip(rows.astype(jnp.int32), 0, q_len - 1)
  if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer) or (
      index.min() < 0 or index.max() >= q_len):
    raise ValueError(f"rows must be a non-empty 1-d sequence of query indices in [0, {q_len}), "
                     f"got {rows!r}")
  return jnp.asarray(index, jnp.int32)


# ------------------------------------------------------------------------------------------------
# Rows.

def attention_rows(query, key, lse, rows, *, score_mod=None, mask_mod=None, mask=None, scale=None):
  """The attention weights of chosen query rows, recomputed exactly from the log-sum-exp.

  Args:
    query: `[batch, q_len, heads, head_dim]`, as given to `flex_attention`.
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0`.
    lse: `[batch, heads, q_len]`, the log-sum-exp `flex_attention(..., return_lse=True)` returned
      for the same inputs and mods (non-finite: the row sees no key).
    rows: query indices, a static sequence (checked to lie in `[0, q_len)`) or a traced int array
      (clipped into range).
    score_mod: as given to `flex_attention`.
    mask_mod: as given to `flex_attention`.
    mask: a `Mask` instead of `mask_mod` (as given to `dot_product_attention`).
    scale: as given to `flex_attention` (default `head_dim ** -0.5`).

  Returns:
    `[batch, heads, len(rows), kv_len]` float32: `exp(score - lse)` where the key is visible, 0
    elsewhere and on rows without keys. Memory O(batch * heads * rows * kv_len).
  """
  query, key, lse, scale, mask_mod = _inputs(query, key, lse, scale, mask_mod, mask)
  index = _rows_index(rows, query.shape[1])
  return _weights(query, key, lse, index, key.shape[1], score_mod, mask_mod, scale)


def _weights(query, key, lse, q_index, kv_count: int, score_mod, mask_mod, scale: float):
  """`[batch, heads, rows, kv_count]` float32 weights of the query rows `q_index` (`[rows]` int32,
  or None for all) on the first `kv_count` keys; `lse` +inf on rows without keys (`_inputs`)."""
  batch, q_len, heads, _ = query.shape
  kv_heads = key.shape[2]
  if q_index is None:
    q_index = jnp.arange(q_len)
  else:
    query, lse = jnp.take(query, q_index, axis=1), jnp.take(lse, q_index, axis=2)
  key = key[:, :kv_count]
  count = q_index.shape[0]
  q = (query * scale).astype(query.dtype)  # As the kernel scales it.
  q = q.reshape(batch, count, kv_heads, heads // kv_heads, -1)
  s = jnp.einsum("brkgd,bskd->bkgrs", q, key, preferred_element_type=jnp.float32)
  s = s.reshape(batch, heads, count, kv_count)
  indices = (jnp.arange(batch), jnp.broadcast_to(jnp.arange(heads)[:, None], (heads, count)),
             q_index, jnp.arange(kv_count))
  if score_mod is not None:
    fn, consts = flex._hoist("score_mod", score_mod)
    s = flex._evaluate(fn, consts, s, *indices).astype(jnp.float32)
  if mask_mod is not None:
    fn, consts = flex._hoist("mask_mod", mask_mod)
    s = jnp.where(flex._evaluate(fn, consts, None, *indices), s, -jnp.inf)
  return jnp.exp(s - lse[..., None])


# ------------------------------------------------------------------------------------------------
# Streaming statistics.

def _statistics_init(shape, top_k: int, zero):
  """Carry of one query tile (`shape` = `[batch, kv_heads, rows]`): entropy, max weight, total
  weight, and the running top-k `(weights, keys)` (weight -1 and key -1: no key yet)."""
  sums = tuple(jnp.zeros(shape) + zero for _ in _STREAMED)
  if not top_k:
    return sums, ()
  return sums, (jnp.full(shape + (top_k,), -1.0) + zero, jnp.full(shape + (top_k,), -1, jnp.int32))


def _statistics_step(carry, s, lse_i, kv_pos):
  """Folds a tile's scores `s` `[batch, kv_heads, rows, block_kv]` (-inf where hidden) in."""
  (entropy, largest, total), top = carry
  log_p = s - lse_i[..., None]
  p = jnp.exp(log_p)
  entropy = entropy - jnp.sum(jnp.where(p > 0.0, p * log_p, 0.0), axis=-1)
  largest = jnp.maximum(largest, jnp.exp(jnp.max(log_p, axis=-1)))  # One exp per row, not per key.
  total = total + jnp.sum(p, axis=-1)
  if top:
    weights, keys = top
    candidates = jnp.concatenate([weights, jnp.where(s > -jnp.inf, p, -1.0)], axis=-1)
    tile_keys = jnp.broadcast_to(kv_pos.astype(jnp.int32), s.shape)
    weights, chosen = jax.lax.top_k(candidates, weights.shape[-1])
    keys = jnp.take_along_axis(jnp.concatenate([keys, tile_keys], axis=-1), chosen, axis=-1)
    top = (weights, keys)
  return (entropy, largest, total), top


def attention_statistics(query, key, lse, *, score_mod=None, mask_mod=None, mask=None,
                         block_mask=None, scale=None, top_k: int = 0, sink_keys: int = 1,
                         block_size=None):
  """Per-query statistics of the attention distribution, streamed over key tiles from the lse.

  Runs the tiling of `flex_attention` (a `lax.map` over query tiles, loops over each one's non-empty
  key tiles from the block mask), so memory is O(tile^2 + q_len * (top_k + sink_keys)), no
  `[q_len, kv_len]` array (building the block mask, when none is given, evaluates the mask a chunk
  of tiles at a time: see `create_block_mask`). The sink mass is computed apart, from the weights
  of every query on the first `sink_keys` keys. Not differentiable (the loops run a traced number
  of tiles); `attention_rows` is.

  Cost (2 shared CPU cores, causal 4k, 8 heads, head_dim 64, one run): 81-96 ms without top-k,
  about the forward's 108-135 ms; `top_k=8` adds 250-470 ms (a `lax.top_k` over every tile).

  Args:
    query: `[batch, q_len, heads, head_dim]`, as `attention_rows`.
    key: `[batch, kv_len, kv_heads, head_dim]`.
    lse: `[batch, heads, q_len]`, as `attention_rows`.
    score_mod: as given to `flex_attention`.
    mask_mod: as given to `flex_attention`; None: `block_mask.mask_mod` if a block mask is given.
    mask: a `Mask` instead of `mask_mod`.
    scale: as given to `flex_attention`.
    block_mask: from `create_block_mask` for these sizes (its empty tiles are skipped, its tile
      sizes used); None builds one from the mask (with `block_size`).
    top_k: also return the `top_k` largest weights per query and their key indices (0: none).
    sink_keys: `sink_mass` is the weight on keys `0 .. sink_keys - 1` (the attention sink).
    block_size: `(block_q, block_kv)` or one int, when no `block_mask` is given (default:
      blockwise's).

  Returns:
    A dict of float32 `[batch, heads, q_len]`: `entropy` (nats), `sink_mass`, `max_weight`,
    `total_weight` (the sum of the weights: 1 up to rounding when `lse` belongs to these inputs and
    mods, so a check that it does). With `top_k`: `top_k_weights` float32 and `top_k_keys` int32
    `[batch, heads, q_len, top_k]`, by decreasing weight; a query that sees fewer than `top_k` keys
    gets weight 0 and key -1 in the slots left. A query that sees no key gets 0 everywhere.
  """
  query, key, lse, scale, mask_mod = _inputs(query, key, lse, scale, mask_mod, mask)
  batch, q_len, heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  if not (isinstance(top_k, (int, np.integer)) and not isinstance(top_k, bool)
          and 0 <= top_k <= kv_len):
    raise ValueError(f"top_k must be an int in [0, kv_len={kv_len}], got {top_k!r}")
  if not (isinstance(sink_keys, (int, np.integer)) and not isinstance(sink_keys, bool)
          and sink_keys >= 0):
    raise ValueError(f"sink_keys must be a non-negative int, got {sink_keys!r}")
  if block_mask is not None:
    if block_size is not None:
      raise ValueError("block_size applies only without block_mask (which fixes the tiles)")
    flex._check_block_mask(block_mask, batch, heads, q_len, kv_len)
    if mask_mod is None:
      mask_mod = block_mask.mask_mod
  elif mask_mod is None:
    block_mask = flex._dense_block_mask(q_len, kv_len, block_size)
  else:
    block_mask = flex.create_block_mask(mask_mod, batch, heads, q_len, kv_len, block_size)
  score = (None, ()) if score_mod is None else flex._hoist("score_mod", score_mod)
  masking = (None, ()) if mask_mod is None else flex._hoist("mask_mod", mask_mod)
  plan = blockwise._Plan(q_len=q_len, kv_len=kv_len, block_q=block_mask.block_q,
                         block_kv=block_mask.block_kv, group=heads // kv_heads, softcap=None)
  mods = flex._Mods(plan=plan, score=score[0], mask=masking[0])
  q = blockwise._tile_rows((query * scale).astype(query.dtype), plan=plan)
  k = blockwise._kv_blocks(key, plan, plan.kv_blocks * plan.block_kv - kv_len)
  lse_t = blockwise._tile_rows(jnp.swapaxes(lse, 1, 2)[..., None], plan=plan, pad_value=jnp.inf)
  schedule = flex._schedule(block_mask.kinds, 0, plan)  # Batch rows share one pass (tile union).
  zero = blockwise._varying_zero(q, k, lse_t, score[1], masking[1])

  def query_block(q_block, q_i, lse_i):
    def fold(carry, s, kv_block):
      kv_pos = kv_block * plan.block_kv + jnp.arange(plan.block_kv)
      return _statistics_step(carry, s, lse_i, kv_pos)

    return flex._visit_tiles(mods, schedule, q_block, q_i, k, score[1], masking[1], fold,
                             _statistics_init(q_i.shape[:-1], top_k, zero))

  sums, top = jax.lax.map(lambda xs: query_block(*xs),
                          (jnp.arange(plan.q_blocks), q, lse_t[..., 0]))
  per_query = lambda x: jnp.moveaxis(blockwise._untile_rows(x, plan, heads), 1, 2)
  out = {name: per_query(x[..., None])[..., 0] for name, x in zip(_STREAMED, sums)}
  # The sink keys' weights for every query, [batch, heads, q_len, sink_keys]: O(q_len) memory.
  sinks = _weights(query, key, lse, None, min(sink_keys, kv_len), score_mod, mask_mod, scale)
  out["sink_mass"] = sinks.sum(-1)
  if top_k:
    weights, keys = top
    out["top_k_weights"] = per_query(jnp.maximum(weights, 0.0))
    out["top_k_keys"] = per_query(jnp.where(weights < 0.0, -1, keys))
  return out
