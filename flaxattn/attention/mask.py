"""The structured attention mask shared by every implementation.

A `Mask` says which keys each query may see without materialising a `[q_len, kv_len]` array. Each
implementation turns it into what it needs: the reference materialises it whole, the blockwise kernel
asks for one tile at a time and skips tiles that `kv_bounds` proves invisible.

Positions. Query `i` sits at position `i + (kv_len - q_len)`: when `q_len != kv_len` the last query aligns
with the last key (the decoding convention: a query block appended after a KV cache). Causal and window
masks compare these positions with key positions `j`. Lengths and segment ids index the arrays directly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = Any

MASK_KINDS = ("causal", "window", "segment_ids", "lengths", "array")


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
  """Which keys each query sees. All parts combine with logical and.

  Attributes:
    causal: query position `p` sees keys `j <= p` (positions aligned at the end, see module doc).
    window: `(left, right)`: query position `p` sees keys `p - left <= j <= p + right`; `None` on a side
      means unbounded on that side. `(left, 0)` with `causal=True` is sliding-window causal attention.
      The models' `window=w` (`TransformerConfig`, `MultiHeadAttention`) counts keys, the query's own
      included, so it is `Mask(window=(w - 1, w - 1))` here: distances, not counts.
    q_segment_ids: `[batch, q_len]` ints; a query sees only keys with the same segment id (packing).
    kv_segment_ids: `[batch, kv_len]` ints; defaults to `q_segment_ids` when `q_len == kv_len`.
    q_lengths: `[batch]` ints; queries at index `>= q_lengths[b]` are padding and see nothing.
    kv_lengths: `[batch]` ints; keys at index `>= kv_lengths[b]` are padding and are never seen.
    array: optional explicit boolean array broadcastable to `[batch, heads, q_len, kv_len]`.
  """

  causal: bool = _static(default=False)
  window: tuple[int | None, int | None] | None = _static(default=None)
  q_segment_ids: Array | None = None
  kv_segment_ids: Array | None = None
  q_lengths: Array | None = None
  kv_lengths: Array | None = None
  array: Array | None = None

  def __post_init__(self):
    if not isinstance(self.causal, (bool, np.bool_)):
      raise ValueError(f"Mask.causal must be a Python bool, got {self.causal!r}")
    if self.window is not None:
      window = tuple(self.window) if isinstance(self.window, (tuple, list)) else (self.window,)
      if len(window) != 2 or not all(
          side is None or (isinstance(side, (int, np.integer)) and not isinstance(side, bool)
                           and side >= 0) for side in window):
        raise ValueError(
            f"Mask.window must be (left, right) with non-negative ints or None, got {self.window!r}")
      object.__setattr__(self, "window", tuple(None if s is None else int(s) for s in window))
    if self.kv_segment_ids is None and self.q_segment_ids is not None:
      object.__setattr__(self, "kv_segment_ids", self.q_segment_ids)
    if self.q_segment_ids is None and self.kv_segment_ids is not None:
      object.__setattr__(self, "q_segment_ids", self.kv_segment_ids)

  # ----------------------------------------------------------------------------------------------
  @property
  def kinds(self) -> frozenset[str]:
    """The mask kinds present, from `MASK_KINDS`."""
    present = set()
    if self.causal:
      present.add("causal")
    if self.window is not None and self.window != (None, None):
      present.add("window")
    if self.q_segment_ids is not None:
      present.add("segment_ids")
    if self.q_lengths is not None or self.kv_lengths is not None:
      present.add("lengths")
    if self.array is not None:
      present.add("array")
    return frozenset(present)

  def validate(self, batch: int, heads: int, q_len: int, kv_len: int) -> None:
    """Raises `ValueError` naming the field whose shape or dtype does not fit the call."""

    def check(name, value, shape, kind):
      if value is None:
        return
      value_shape = tuple(np.shape(value))
      dtype = jnp.result_type(value)
      if kind == "int" and not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"Mask.{name} must be integer, got dtype {dtype}")
      if value_shape != shape:
        raise ValueError(f"Mask.{name} must have shape {shape} (from query/key), got {value_shape}")

    check("q_segment_ids", self.q_segment_ids, (batch, q_len), "int")
    if q_len != kv_len and np.shape(self.kv_segment_ids) == (batch, q_len):
      raise ValueError(
          f"Mask.kv_segment_ids must have shape {(batch, kv_len)} (from key), got {(batch, q_len)}: "
          f"it defaults to q_segment_ids, so pass it explicitly when q_len != kv_len")
    check("kv_segment_ids", self.kv_segment_ids, (batch, kv_len), "int")
    check("q_lengths", self.q_lengths, (batch,), "int")
    check("kv_lengths", self.kv_lengths, (batch,), "int")
    if self.array is not None:
      shape = tuple(np.shape(self.array))
      if jnp.result_type(self.array) != jnp.bool_:
        raise ValueError(f"Mask.array must be boolean, got dtype {jnp.result_type(self.array)}")
      target = (batch, heads, q_len, kv_len)
      if len(shape) > 4 or any(
          size not in (1, want) for size, want in zip(shape[::-1], target[::-1])):
        raise ValueError(
            f"Mask.array of shape {shape} does not broadcast to [batch, heads, q_len, kv_len] = {target}")

  # ----------------------------------------------------------------------------------------------
  def tile(self, q_start, q_size: int, kv_start, kv_size: int, *, offset: int) -> Array | None:
    """Visibility of one tile: `[batch|1, heads|1, q_size, kv_size]` bool, or None for no mask.

    `q_start`/`kv_start` may be traced. `offset` is `kv_len - q_len` of the unpadded call (query `i` sits
    at position `i + offset`). Indices past the end of the segment-id/explicit arrays must not be asked
    for: pad those arrays first (the blockwise kernel does).
    """
    q_index = q_start + jnp.arange(q_size)
    kv_index = kv_start + jnp.arange(kv_size)
    q_pos = (q_index + offset)[:, None]
    kv_pos = kv_index[None, :]
    visible = None

    def both(a, b):
      return b if a is None else jnp.logical_and(a, b)

    if self.causal:
      visible = both(visible, (kv_pos <= q_pos)[None, None])
    if self.window is not None:
      left, right = self.window
      if left is not None:
        visible = both(visible, (kv_pos >= q_pos - left)[None, None])
      if right is not None:
        visible = both(visible, (kv_pos <= q_pos + right)[None, None])
    if self.q_lengths is not None:
      visible = both(visible, (q_index[None, :] < self.q_lengths[:, None])[:, None, :, None])
    if self.kv_lengths is not None:
      visible = both(visible, (kv_index[None, :] < self.kv_lengths[:, None])[:, None, None, :])
    if self.q_segment_ids is not None:
      q_seg = jax.lax.dynamic_slice_in_dim(self.q_segment_ids, q_start, q_size, axis=1)
      kv_seg = jax.lax.dynamic_slice_in_dim(self.kv_segment_ids, kv_start, kv_size, axis=1)
      visible = both(visible, (q_seg[:, :, None] == kv_seg[:, None, :])[:, None])
    if self.array is not None:
      array = jnp.asarray(self.array)
      array = array.reshape((1,) * (4 - array.ndim) + array.shape)
      if array.shape[2] != 1:
        array = jax.lax.dynamic_slice_in_dim(array, q_start, q_size, axis=2)
      if array.shape[3] != 1:
        array = jax.lax.dynamic_slice_in_dim(array, kv_start, kv_size, axis=3)
      visible = both(visible, array)
    return visible

  def materialize(self, q_len: int, kv_len: int) -> Array | None:
    """The whole mask, `[batch|1, heads|1, q_len, kv_len]` bool, or None when nothing is masked."""
    return self.tile(0, q_len, 0, kv_len, offset=kv_len - q_len)

  def mask_mod(self, offset: int = 0):
    """This mask as a `flex_attention` mask_mod `(batch, head, q_idx, kv_idx) -> bool` (int32
    scalars), query `q_idx` at position `q_idx + offset` (pass `kv_len - q_len` for the alignment of
    `tile`; 0 is flex's convention, indices compared as they are). It captures the mask's arrays."""
    as_jax = lambda x: None if x is None else jnp.asarray(x)  # NumPy arrays take no traced index.
    q_ids, kv_ids, q_lengths, kv_lengths, array = map(as_jax, (
        self.q_segment_ids, self.kv_segment_ids, self.q_lengths, self.kv_lengths, self.array))
    if array is not None:
      array = array.reshape((1,) * (4 - array.ndim) + array.shape)

    def mask_mod(b, h, q, kv):
      seen = jnp.bool_(True)
      pos = q + offset
      if self.causal:
        seen &= kv <= pos
      if self.window is not None:
        left, right = self.window
        if left is not None:
          seen &= kv >= pos - left
        if right is not None:
          seen &= kv <= pos + right
      if q_lengths is not None:
        seen &= q < q_lengths[b]
      if kv_lengths is not None:
        seen &= kv < kv_lengths[b]
      if q_ids is not None:
        seen &= q_ids[b, q] == kv_ids[b, kv]
      if array is not None:
        index = [i if size > 1 else 0 for i, size in zip((b, h, q, kv), array.shape)]
        seen &= array[tuple(index)]
      return seen

    return mask_mod

  def kv_bounds(self, q_lo, q_hi, *, offset: int, kv_len: int):
    """Key index range `[lo, hi)` that causal/window masks leave visible to queries `[q_lo, q_hi)`.

    Works on Python ints (static block skipping) and traced ints. Segment ids, lengths and explicit
    arrays are not considered here: they can only shrink the range further.
    """
    lo, hi = 0, kv_len
    right = None
    if self.window is not None:
      left, right = self.window
      if left is not None:
        lo = q_lo + offset - left
    if self.causal:
      right = 0 if right is None else min(right, 0)
    if right is not None:
      hi = q_hi - 1 + offset + right + 1
    clip = (lambda x, a, b: max(a, min(b, x))) if all(
        isinstance(x, (int, np.integer)) for x in (lo, hi)) else jnp.clip
    return clip(lo, 0, kv_len), clip(hi, 0, kv_len)


def as_mask(mask) -> Mask | None:
  """Accepts a `Mask`, None, or a boolean array (taken as `Mask(array=...)`)."""
  if mask is None or isinstance(mask, Mask):
    return mask
  if hasattr(mask, "dtype") and jnp.result_type(mask) == jnp.bool_:
    return Mask(array=mask)
  dtype = f" of dtype {mask.dtype}" if hasattr(mask, "dtype") else ""
  raise ValueError(f"mask must be a flaxattn.attention.Mask, a boolean array or None, got "
                   f"{type(mask).__name__}{dtype}")
