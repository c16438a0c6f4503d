"""Per-query facts about a `Mask` in O(length) memory, for the accelerator kernels.

Fused kernels (cuDNN, tokamax, splash) take masks in their own forms and do not promise flaxattn's
contract for a query that sees no key (zeros, zero gradient): some return the mean of the values, some
NaN. These helpers say, per query row and without a `[q_len, kv_len]` array, which keys a row may see,
so the wrappers can build the kernel's mask and zero the empty rows themselves
(`zero_rows_without_keys`). Also the two other pieces every kernel repeats: the max shift of a
softmax whose row may see no key (`max_shift`), padding along the length to whole blocks
(`pad_length`), and zero padding to one head_dim for kernels that take query, key and value of one
width (`pad_to_one_head_dim`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flaxattn.attention.mask import Mask


def max_shift(row_max):
  """What a max-subtracted softmax subtracts: `row_max`, or 0 where it is not finite (a row that
  sees no key has max -inf; shifting by 0 makes its `exp` 0, not NaN)."""
  return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def zero_rows_without_keys(out, sees_any):
  """`out` `[batch, q_len, heads, dim]` with the queries that see no key set to 0, and their
  gradient cut (`where`, not a product: a kernel's NaN in such a row does not survive).

  `sees_any`: bool `[batch, q_len]`, or `[batch|1, heads|1, q_len]` per head.
  """
  if sees_any.ndim == 2:
    sees_any = sees_any[:, None, :]
  return jnp.where(jnp.swapaxes(sees_any, 1, 2)[..., None], out, jnp.zeros((), out.dtype))


def pad_length(x, length: int, *, value=0):
  """`x` `[batch, len, ...]` padded with `value` at the end of its length axis (axis 1) to `length`
  (`x` itself when it is that long already)."""
  extra = length - x.shape[1]
  if not extra:
    return x
  return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def pad_to_one_head_dim(query, key, value):
  """`(query, key, value)` zero padded along their last axis to the wider of head_dim and
  value_dim, for kernels that take one width. Zeros change neither the logits (pass the scale
  explicitly) nor the first value_dim output columns: slice `[..., :value_dim]` after."""
  width = max(query.shape[-1], value.shape[-1])
  return tuple(jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),)) for x in (query, key, value))


def key_ranges(mask: Mask, batch: int, q_len: int, kv_len: int):
  """The key range `[start, end)` that causal, window and lengths leave to each query.

  Positions are end-aligned as in `Mask` (query `i` sits at `i + kv_len - q_len`). Segment ids and
  explicit arrays are not considered (see `segment_key_ranges`, `sees_any_key`).

  Returns:
    `(start, end)`, each `[batch, q_len]` int32, clipped to `[0, kv_len]`; a row with `start >= end`
    sees no key (padding queries beyond `q_lengths` get `end = 0`).
  """
  position = jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len)
  start = jnp.zeros((q_len,), jnp.int32)
  end = jnp.full((q_len,), kv_len, jnp.int32)
  if mask.window is not None:
    left, right = mask.window
    if left is not None:
      start = jnp.maximum(start, position - left)
    if right is not None:
      end = jnp.minimum(end, position + right + 1)
  if mask.causal:
    end = jnp.minimum(end, position + 1)
  start = jnp.broadcast_to(start, (batch, q_len))
  end = jnp.broadcast_to(end, (batch, q_len))
  if mask.kv_lengths is not None:
    end = jnp.minimum(end, jnp.asarray(mask.kv_lengths, jnp.int32)[:, None])
  if mask.q_lengths is not None:
    is_query = jnp.arange(q_len)[None, :] < jnp.asarray(mask.q_lengths)[:, None]
    end = jnp.where(is_query, end, 0)
  return jnp.clip(start, 0, kv_len), jnp.clip(end, 0, kv_len)


def _segment_positions(q_segment_ids, kv_segment_ids):
  """Per batch row: key positions sorted by (segment id, position), and each query's slice of them.

  Returns `(order [batch, kv_len], first [batch, q_len], stop [batch, q_len])`: the keys sharing query
  `i`'s segment id are `order[b, first[b, i]:stop[b, i]]`, in increasing position.
  """

  def one_row(q_ids, kv_ids):
    order = jnp.argsort(kv_ids, stable=True).astype(jnp.int32)
    sorted_ids = kv_ids[order]
    first = jnp.searchsorted(sorted_ids, q_ids, side="left").astype(jnp.int32)
    stop = jnp.searchsorted(sorted_ids, q_ids, side="right").astype(jnp.int32)
    return order, first, stop

  return jax.vmap(one_row)(jnp.asarray(q_segment_ids), jnp.asarray(kv_segment_ids))


def segment_key_ranges(q_segment_ids, kv_segment_ids):
  """The smallest key range holding every key of each query's segment, and whether it is exact.

  Args:
    q_segment_ids: `[batch, q_len]` ints.
    kv_segment_ids: `[batch, kv_len]` ints.

  Returns:
    `(start, end, contiguous)`, each `[batch, q_len]`: keys `[start, end)` span the query's segment
    (`start == end == 0` when no key has its id); `contiguous` is True where every key in that span
    has the id (a packed sequence's segments are contiguous runs), i.e. where the range is exact.
  """
  order, first, stop = _segment_positions(q_segment_ids, kv_segment_ids)
  kv_len = order.shape[1]
  found = stop > first
  take = jax.vmap(lambda row, index: row[index])
  start = jnp.where(found, take(order, jnp.minimum(first, kv_len - 1)), 0)
  end = jnp.where(found, take(order, jnp.maximum(stop - 1, 0)) + 1, 0)
  contiguous = (stop - first) == (end - start)
  return start, end, contiguous


def sees_any_key(mask: Mask, batch: int, q_len: int, kv_len: int):
  """`[batch, q_len]` bool: whether each query sees at least one key. Exact for any segment ids.

  Causal, window and lengths give a key range per query; with segment ids, a binary search over the
  query's segment's sorted key positions counts those inside the range (O(length log length)).
  Explicit mask arrays are not considered (callers decline them).
  """
  start, end = key_ranges(mask, batch, q_len, kv_len)
  if mask.q_segment_ids is None:
    return start < end
  order, first, stop = _segment_positions(mask.q_segment_ids, mask.kv_segment_ids)
  take = jax.vmap(lambda row, index: row[index])

  def count_before(limit):
    """Per query: how many keys of its segment sit at positions < limit."""
    low, high = first, stop
    for _ in range(math.ceil(math.log2(kv_len + 1)) + 1):
      middle = (low + high) // 2
      below = take(order, jnp.clip(middle, 0, kv_len - 1)) < limit
      searching = low < high
      low = jnp.where(searching & below, middle + 1, low)
      high = jnp.where(searching & ~below, middle, high)
    return low - first

  return (start < end) & (count_before(end) > count_before(start))
