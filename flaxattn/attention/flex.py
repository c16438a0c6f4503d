"""flex_attention: attention with user-defined score and mask functions, in O(length) memory.

A `score_mod(score, batch, head, q_idx, kv_idx) -> score` edits each logit (after the scale) and a
`mask_mod(batch, head, q_idx, kv_idx) -> bool` says which keys a query sees. Both are written on
scalars, as in PyTorch's FlexAttention, and are evaluated one tile at a time inside the blockwise
kernel (`flaxattn.attention.blockwise`'s tiling, online softmax and recomputing backward), so no
`[q_len, kv_len]` array is ever formed.

Captured arrays. A mod may close over arrays (document ids, prefix lengths, a learned bias table).
Each mod is traced once per call into a jaxpr whose captured values are hoisted into explicit inputs
of the kernel's `custom_vjp` (`_hoist`): under `jit` they stay traced, so new values never
recompile, and the floating ones get exact gradients (each tile's `vjp` of the score_mod, summed).

Evaluating a scalar mod on a tile. The mod is `vmap`ped over the tile's four axes (batch, heads,
query rows, keys) with each index mapped only over its own axes; an axis the result does not depend
on stays size 1 (a causal mask is one `[rows, keys]` tile, a document mask `[batch, 1, rows, keys]`).

Block sparsity. `create_block_mask` classifies every (query tile, key tile) as empty, partial or full
per batch row and head; the kernel skips empty tiles (it walks a gathered list of the non-empty key
tiles of each query tile) and does not evaluate the mask on full ones. The heads of a tile run in one
batched product, so a tile is visited if non-empty for any head and full only if full for all; so are
batch rows when the mask does not depend on the row, else each row runs with its own tile lists
(`lax.map` over rows). Measured on 2 CPU cores (causal + documents, 4k and 8k tokens, forward): the
gathered list and a `lax.switch` per tile over every key tile were within noise of each other; the
list never touches an empty tile at all.

Fully masked rows. A query that sees no key gets output 0, log-sum-exp -inf and zero gradients.

The dispatcher. `dot_product_attention(score_mod=, mask_mod=, block_mask=)` runs the same kernel
(`FlexMods`, for the implementations that declare `mods`), with its `Mask` and-ed in and its
softcap and bias folded into the score_mod. The other way round, mods that a `Mask` also states
(`StructuredMask`: `causal_mask`, `sliding_window`, `document_mask`, `padding_mask`, and_masks of
them; `soft_cap`) go from `flex_attention` to `dot_product_attention` when its choice is a fused
accelerator kernel (`api.fused_choice`); on CPU blockwise is that choice, and flex tiles them here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from flaxattn.attention import blockwise
from flaxattn.attention.mask import Mask, _static
from flaxattn.attention.rows import max_shift
from flaxattn.attention.spec import check_operands, is_number

Array = Any

EMPTY, PARTIAL, FULL = 0, 1, 2
IMPLEMENTATIONS = (None, "blockwise", "reference")

# Elements of mask evaluated per step of `create_block_mask`'s loop over tiles (bounds its memory).
_MASK_CHUNK = 1 << 22


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Which (query tile, key tile) pairs `mask_mod` leaves empty, partial or full.

  Attributes:
    kinds: `[batch|1, heads|1, q_blocks, kv_blocks]` int8: `EMPTY` (no visible key), `PARTIAL`
      (evaluate the mask there) or `FULL` (every key visible). Traced: built under `jit` from traced
      captured arrays.
    q_len, kv_len: the lengths it was built for.
    block_q, block_kv: the tile sizes; the kernel tiles with these.
    mask_mod: the mask it classifies (used when `flex_attention` gets no `mask_mod`).

  Build it inside the jitted function that uses it, where its mask_mod's captured arrays are traced.
  Crossing a `jit` boundary (as an argument or a result), `mask_mod` is static metadata: a new closure
  means a new compile, and one made inside another trace holds dead tracers; pass `mask_mod` to
  `flex_attention` explicitly then.
  """

  kinds: Array
  q_len: int = _static()
  kv_len: int = _static()
  block_q: int = _static()
  block_kv: int = _static()
  mask_mod: Callable | None = _static(default=None)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return tuple(self.kinds.shape)


# ------------------------------------------------------------------------------------------------
# Mods: checking, hoisting captured arrays, evaluating on a tile.

_MOD_ARGS = {"score_mod": ("score", "batch", "head", "q_idx", "kv_idx"),
             "mask_mod": ("batch", "head", "q_idx", "kv_idx")}


def _check_arity(name: str, fn) -> None:
  if not callable(fn):
    raise ValueError(f"{name} must be a function {_signature_text(name)} or None, got {fn!r}")
  try:
    inspect.signature(fn).bind(*_MOD_ARGS[name])
  except TypeError:
    raise ValueError(f"{name} must take {len(_MOD_ARGS[name])} positional arguments "
                     f"{_signature_text(name)}, got {fn!r} with signature "
                     f"{inspect.signature(fn)}") from None
  except ValueError:  # No signature to inspect (some builtins): the trace below checks it.
    pass


def _signature_text(name: str) -> str:
  out = "score" if name == "score_mod" else "bool"
  return f"({', '.join(_MOD_ARGS[name])}) -> {out}"


def _hoist(name: str, fn):
  """`(converted, consts)`: `converted(*scalars, *consts)` computes `fn(*scalars)`, with every array
  `fn` captures (traced or not) passed in `consts` instead of closed over.

  `jax.closure_convert` hoists only differentiable values; the kernel's `custom_vjp` may not close
  over traced integers (document ids) either, so all captured values are hoisted here.
  """
  _check_arity(name, fn)
  index = jax.ShapeDtypeStruct((), jnp.int32)
  examples = ((jax.ShapeDtypeStruct((), jnp.float32),) if name == "score_mod" else ()) + (index,) * 4
  closed = jax.make_jaxpr(fn)(*examples)
  outs = closed.out_avals
  want = "floating" if name == "score_mod" else "bool"
  if len(outs) != 1 or outs[0].shape != () or not (
      jnp.issubdtype(outs[0].dtype, jnp.floating) if name == "score_mod"
      else outs[0].dtype == jnp.bool_):
    got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in outs)
    raise ValueError(f"{name} must return one {want} scalar {_signature_text(name)}, got {got}")
  jaxpr, arity = closed.jaxpr, len(examples)

  def converted(*args):
    run = jax_core.jaxpr_as_fun(jax_core.ClosedJaxpr(jaxpr, list(args[arity:])))
    return jnp.asarray(run(*args[:arity])[0])  # A constant mod returns a Python literal.

  return converted, tuple(closed.consts)


# The tile axes ("levels") each mod argument varies over. Query heads are folded into the rows as in
# blockwise (row = position * group + g), so the head index varies over both kv heads and rows.
_LEVELS = ("batch", "heads", "rows", "keys")
_VARIES = {"score": frozenset(_LEVELS), "batch": frozenset({"batch"}),
           "head": frozenset({"heads", "rows"}), "q": frozenset({"rows"}),
           "kv": frozenset({"keys"})}


def _evaluate(fn, consts, score, batch_idx, head_idx, q_idx, kv_idx, *, transposed=False):
  """`fn(*scalars, *consts)` on every entry of a tile.

  Args:
    fn: a converted mod from `_hoist`.
    consts: its captured arrays.
    score: `[batch, heads, rows, keys]` float32 (`[batch, heads, keys, rows]` if `transposed`) for a
      score_mod; None for a mask_mod.
    batch_idx: `[batch]`, head_idx: `[heads, rows]`, q_idx: `[rows]`, kv_idx: `[keys]` int32.

  Returns:
    The result, `[batch|1, heads|1, rows|1, keys|1]` (or `[..., keys|1, rows|1]`): an axis the mod
    does not depend on stays 1 (each vmap level first tries to leave its axis unmapped).
  """
  levels = ("batch", "heads", "keys", "rows") if transposed else _LEVELS
  names = (("score",) if score is not None else ()) + ("batch", "head", "q", "kv")
  args = ((score,) if score is not None else ()) + (batch_idx, head_idx, q_idx, kv_idx)
  abstract = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
  level_args = [tuple(map(abstract, args))]
  for level in levels[:-1]:
    level_args.append(tuple(
        jax.ShapeDtypeStruct(a.shape[1:], a.dtype) if level in _VARIES[n] else a
        for n, a in zip(names, level_args[-1])))
  const_avals = tuple(map(abstract, consts))
  fun, mapped = fn, [False] * len(levels)
  for depth in reversed(range(len(levels))):
    in_axes = tuple(0 if levels[depth] in _VARIES[n] else None for n in names)
    in_axes += (None,) * len(consts)
    try:
      candidate = jax.vmap(fun, in_axes=in_axes, out_axes=None)
      jax.eval_shape(candidate, *level_args[depth], *const_avals)
    except (ValueError, TypeError):  # The result varies over this axis (a user error reraises below).
      candidate, mapped[depth] = jax.vmap(fun, in_axes=in_axes), True
    fun = candidate
  out = fun(*args, *consts)
  sizes = {"batch": batch_idx.shape[0], "heads": head_idx.shape[0], "rows": q_idx.shape[0],
           "keys": kv_idx.shape[0]}
  return out.reshape([sizes[level] if m else 1 for level, m in zip(levels, mapped)])


def _combine(mask_mods, combine, empty: bool):
  for mod in mask_mods:
    _check_arity("mask_mod", mod)

  def mask_mod(batch, head, q_idx, kv_idx):
    result = jnp.bool_(empty)
    for mod in mask_mods:
      result = combine(result, mod(batch, head, q_idx, kv_idx))
    return result

  return mask_mod


def and_masks(*mask_mods):
  """A mask_mod that is True where every one of `mask_mods` is (True for none).

  Of structured masks (`causal_mask`, `sliding_window`, `document_mask`, `padding_mask`) it is a
  structured mask again, when one `Mask` states them all (at most one of them has document ids, one
  has lengths)."""
  if mask_mods and all(isinstance(mod, StructuredMask) for mod in mask_mods):
    merged = _merge([mod.mask for mod in mask_mods])
    if merged is not None:
      return StructuredMask(merged)
  return _combine(mask_mods, jnp.logical_and, True)


def or_masks(*mask_mods):
  """A mask_mod that is True where any one of `mask_mods` is (False for none)."""
  return _combine(mask_mods, jnp.logical_or, False)


# ------------------------------------------------------------------------------------------------
# Mods the fused kernels also run: structured masks and soft-capping.

@dataclasses.dataclass(frozen=True, eq=False)
class StructuredMask:
  """A mask_mod that a `Mask` also states, so that `flex_attention` can hand it to the accelerator
  kernels (cuDNN, splash, tokamax) as that `Mask`. Made by `causal_mask`, `sliding_window`,
  `document_mask`, `padding_mask` and `and_masks` of those; called, it is the Mask's mask_mod in
  flex's indices (query `q_idx` compared with key `kv_idx` as they are, i.e. `Mask` positions with
  `q_len == kv_len`)."""

  mask: Mask

  def __call__(self, batch, head, q_idx, kv_idx):
    return self.mask.mask_mod(offset=0)(batch, head, q_idx, kv_idx)


@dataclasses.dataclass(frozen=True)
class SoftCap:
  """The score_mod `cap * tanh(score / cap)`; `flex_attention` passes it on as `softcap=cap`."""

  cap: float

  def __call__(self, score, batch, head, q_idx, kv_idx):
    return self.cap * jnp.tanh(score / self.cap)


def causal_mask() -> StructuredMask:
  """Query `q_idx` sees keys `kv_idx <= q_idx` (`Mask(causal=True)`)."""
  return StructuredMask(Mask(causal=True))


def sliding_window(window: int, causal: bool = True) -> StructuredMask:
  """The last `window` keys up to the query, its own included (`causal`), or every key within
  `window - 1` positions on either side: the models' `window=` convention."""
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window <= 0:
    raise ValueError(f"sliding_window's window must be a positive int, got {window!r}")
  band = int(window) - 1
  return StructuredMask(Mask(causal=bool(causal), window=(band, 0 if causal else band)))


def document_mask(q_ids, kv_ids=None) -> StructuredMask:
  """A query sees only keys of its own document: `q_ids[b, q_idx] == kv_ids[b, kv_idx]`, ids
  `[batch, q_len]` / `[batch, kv_len]` ints (`kv_ids` defaults to `q_ids`), captured and traced."""
  return StructuredMask(Mask(q_segment_ids=q_ids, kv_segment_ids=kv_ids))


def padding_mask(kv_lengths, q_lengths=None) -> StructuredMask:
  """Keys `kv_idx >= kv_lengths[b]` are never seen (and queries `q_idx >= q_lengths[b]` see nothing),
  lengths `[batch]` ints."""
  return StructuredMask(Mask(q_lengths=q_lengths, kv_lengths=kv_lengths))


def soft_cap(cap: float) -> SoftCap:
  """The soft-capping score_mod `cap * tanh(score / cap)` (Gemma 2, Grok); the same numbers as
  `dot_product_attention(softcap=cap)`."""
  if not (is_number(cap) and cap > 0):
    raise ValueError(f"soft_cap's cap must be a positive number, got {cap!r}")
  return SoftCap(float(cap))


def _merge(masks) -> Mask | None:
  """One `Mask` seeing what every one of `masks` sees, or None when two give the same array field."""
  arrays = {}
  for field in ("q_segment_ids", "kv_segment_ids", "q_lengths", "kv_lengths", "array"):
    given = [getattr(m, field) for m in masks if getattr(m, field) is not None]
    if len(given) > 1:
      return None
    arrays[field] = given[0] if given else None
  windows = [m.window for m in masks if m.window is not None]

  def side(index):
    bounds = [w[index] for w in windows if w[index] is not None]
    return min(bounds) if bounds else None

  window = (side(0), side(1)) if windows else None
  return Mask(causal=any(m.causal for m in masks), window=window, **arrays)


def _fused_arguments(query, key, score_mod, mask_mod):
  """`(mask, softcap)` that `dot_product_attention` takes for these mods, or None when a mod is not
  structured (or a causal/window mask meets unequal lengths, where `Mask` aligns positions at the
  end and flex counts both from 0)."""
  if not (mask_mod is None or isinstance(mask_mod, StructuredMask)) or not (
      score_mod is None or isinstance(score_mod, SoftCap)):
    return None
  mask = None if mask_mod is None else mask_mod.mask
  if mask is not None and mask.kinds & {"causal", "window"} and query.shape[1] != key.shape[1]:
    return None
  return mask, None if score_mod is None else score_mod.cap


# ------------------------------------------------------------------------------------------------
# Block masks.

def _block_sizes(block_size, q_len: int, kv_len: int) -> tuple[int, int]:
  if block_size is None:
    block_size = blockwise.DEFAULT_BLOCKS.get(jax.default_backend(), blockwise.DEFAULT_BLOCKS["cpu"])
  sizes = (block_size, block_size) if isinstance(block_size, (int, np.integer)) else block_size
  if not (isinstance(sizes, (tuple, list)) and len(sizes) == 2 and all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0 for s in sizes)):
    raise ValueError(f"block_size must be a positive int, (block_q, block_kv) or None, "
                     f"got {block_size!r}")
  return min(int(sizes[0]), q_len), min(int(sizes[1]), kv_len)


def _check_size(name: str, value, allow_none: bool) -> int:
  if value is None and allow_none:
    return 1
  if not (isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0):
    allowed = "a positive int or None (broadcast)" if allow_none else "a positive int"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return int(value)


def create_block_mask(mask_mod, batch, heads, q_len, kv_len, block_size=None) -> BlockMask:
  """Classifies every (query tile, key tile) of `mask_mod` as empty, partial or full.

  Runs under `jit` with traced captured arrays. The mask is evaluated densely one tile at a time (a
  `lax.map` over tiles, a few million entries per step), so memory is O(tile^2), not O(q_len *
  kv_len); time is O(q_len * kv_len) mask evaluations, once per call, shared by every layer that
  reuses the block mask.

  Args:
    mask_mod: `(batch, head, q_idx, kv_idx) -> bool` on int32 scalars.
    batch: the batch size to evaluate over, or None to evaluate at index 0 and broadcast (for a
      mask that does not depend on the batch row).
    heads: the query heads to evaluate over, or None (as `batch`, for a mask the same in all heads).
    q_len: the query length of the attention call.
    kv_len: its key length.
    block_size: `(block_q, block_kv)`, one int for both, or None for the platform's blockwise default;
      clipped to the lengths.

  Returns:
    A `BlockMask` with `kinds` `[batch|1, heads|1, q_blocks, kv_blocks]`: batch (heads) 1 when the
    mask does not depend on the batch row (head). A key tile that runs past `kv_len` is never full
    (its padding must be masked).
  """
  fn, consts = _hoist("mask_mod", mask_mod)
  batch = _check_size("batch", batch, allow_none=True)
  heads = _check_size("heads", heads, allow_none=True)
  q_len = _check_size("q_len", q_len, allow_none=False)
  kv_len = _check_size("kv_len", kv_len, allow_none=False)
  block_q, block_kv = _block_sizes(block_size, q_len, kv_len)
  q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)

  def classify(pair):
    q_block, kv_block = pair // kv_blocks, pair % kv_blocks
    q_pos = q_block * block_q + jnp.arange(block_q)
    kv_pos = kv_block * block_kv + jnp.arange(block_kv)
    q_valid, kv_valid = q_pos < q_len, kv_pos < kv_len
    head_idx = jnp.broadcast_to(jnp.arange(heads)[:, None], (heads, block_q))
    visible = _evaluate(fn, consts, None, jnp.arange(batch), head_idx,
                        jnp.minimum(q_pos, q_len - 1), jnp.minimum(kv_pos, kv_len - 1))
    valid = q_valid[:, None] & kv_valid[None, :]
    any_visible = jnp.any(visible & valid, axis=(2, 3))
    all_visible = jnp.all(visible | ~valid, axis=(2, 3)) & jnp.all(kv_valid)
    return jnp.where(all_visible, FULL, jnp.where(any_visible, PARTIAL, EMPTY)).astype(jnp.int8)

  chunk = max(1, _MASK_CHUNK // (batch * heads * block_q * block_kv))
  with jax.named_scope("create_block_mask"):  # Names the classification in jaxprs and profiles.
    kinds = jax.lax.map(classify, jnp.arange(q_blocks * kv_blocks), batch_size=chunk)
  kinds = kinds.reshape(q_blocks, kv_blocks, *kinds.shape[1:]).transpose(2, 3, 0, 1)
  return BlockMask(kinds=kinds, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv,
                   mask_mod=mask_mod)


def _dense_block_mask(q_len: int, kv_len: int, block_size) -> BlockMask:
  """The block mask of no mask: every tile full, except a key tile that runs past `kv_len`."""
  block_q, block_kv = _block_sizes(block_size, q_len, kv_len)
  kinds = np.full((1, 1, -(-q_len // block_q), -(-kv_len // block_kv)), FULL, np.int8)
  if kv_len % block_kv:
    kinds[..., -1] = PARTIAL
  return BlockMask(kinds=jnp.asarray(kinds), q_len=q_len, kv_len=kv_len, block_q=block_q,
                   block_kv=block_kv)


def _schedule(kinds, batch_start, plan: blockwise._Plan):
  """Per query tile, the key tiles to visit: `(batch_start, full_counts, full_tiles, partial_counts,
  partial_tiles)`, counts `[q_blocks]`, tiles `[q_blocks, kv_blocks]` (the first `count` entries, in
  increasing order); `batch_start` is the batch index of the first row in the call. Batch rows and
  heads share a tile: visited if non-empty for any, full if full for all."""
  full = jnp.all(kinds == FULL, axis=(0, 1))
  if plan.kv_len % plan.block_kv:  # Padding keys must be masked, whatever the block mask says.
    full = full.at[:, -1].set(False)
  partial = jnp.any(kinds != EMPTY, axis=(0, 1)) & ~full

  def listed(chosen):
    order = jnp.argsort(jnp.logical_not(chosen).astype(jnp.int8), axis=-1, stable=True)
    return chosen.sum(-1).astype(jnp.int32), order.astype(jnp.int32)

  return (jnp.asarray(batch_start, jnp.int32), *listed(full), *listed(partial))


# ------------------------------------------------------------------------------------------------
# The kernel.

@dataclasses.dataclass(frozen=True)
class _Mods:
  """Static parts of a call: the tiling plan and the converted mods (`_hoist`)."""

  plan: blockwise._Plan
  score: Callable | None
  mask: Callable | None


def _tile_indices(plan: blockwise._Plan, batch_start, batch: int, kv_heads: int, q_block, kv_block):
  """Mod arguments of one tile in the folded row layout, clamped inside the lengths (padded rows and
  keys repeat the last one; the kernel masks padded keys and drops padded rows), and which keys are
  real. Returns `(batch_idx [batch], head_idx [kv_heads, rows], q_idx [rows], kv_idx [block_kv],
  kv_valid [block_kv])`."""
  rows = jnp.arange(plan.block_q * plan.group)
  q_idx = jnp.minimum(q_block * plan.block_q + rows // plan.group, plan.q_len - 1)
  head_idx = jnp.arange(kv_heads)[:, None] * plan.group + (rows % plan.group)[None, :]
  kv_pos = kv_block * plan.block_kv + jnp.arange(plan.block_kv)
  return (batch_start + jnp.arange(batch), head_idx, q_idx, jnp.minimum(kv_pos, plan.kv_len - 1),
          kv_pos < plan.kv_len)


def _tile_scores(mods: _Mods, s, score_consts, mask_consts, batch_start, q_block, kv_block, *,
                 masked: bool, transposed: bool):
  """A tile's logits after the score_mod, and its visibility (None on a full tile).

  `s` is the raw (scaled) tile `[batch, kv_heads, rows, block_kv]`, or `[..., block_kv, rows]` if
  `transposed`. Returns `(scores, visible)`; `scores` is -inf where not visible.
  """
  batch, kv_heads = s.shape[:2]
  batch_idx, head_idx, q_idx, kv_idx, kv_valid = _tile_indices(
      mods.plan, batch_start, batch, kv_heads, q_block, kv_block)
  if mods.score is not None:
    s = _evaluate(mods.score, score_consts, s, batch_idx, head_idx, q_idx, kv_idx,
                  transposed=transposed).astype(jnp.float32)
  if not masked:
    return s, None
  visible = kv_valid[:, None] if transposed else kv_valid[None, :]
  if mods.mask is not None:
    visible = visible & _evaluate(mods.mask, mask_consts, None, batch_idx, head_idx, q_idx, kv_idx,
                                  transposed=transposed)
  return jnp.where(visible, s, -jnp.inf), visible


def _raw_logits(q_i, k_j, *, transposed: bool):
  if transposed:
    return jnp.einsum("bhkd,bhrd->bhkr", k_j, q_i, preferred_element_type=jnp.float32)
  return jnp.einsum("bhrd,bhkd->bhrk", q_i, k_j, preferred_element_type=jnp.float32)


def _visit_tiles(mods: _Mods, schedule, q_block, q_i, k, score_consts, mask_consts, fold, carry):
  """Folds the non-empty key tiles of query tile `q_block` into `carry` (the full ones first):
  `carry = fold(carry, scores, kv_block)` with `scores` `[batch, kv_heads, rows, block_kv]` float32,
  the scaled logits after the score_mod, -inf where hidden. Shared by the forward and the probes."""
  plan = mods.plan
  batch_start, full_counts, full_tiles, partial_counts, partial_tiles = schedule

  def visit(tiles, masked):
    def step(i, carry):
      kv_block = tiles[q_block, i]
      s = _raw_logits(q_i, blockwise._kv_tile(k, kv_block, plan), transposed=False)
      s, _ = _tile_scores(mods, s, score_consts, mask_consts, batch_start, q_block, kv_block,
                          masked=masked, transposed=False)
      return fold(carry, s, kv_block)
    return step

  carry = jax.lax.fori_loop(0, full_counts[q_block], visit(full_tiles, False), carry)
  return jax.lax.fori_loop(0, partial_counts[q_block], visit(partial_tiles, True), carry)


def _forward(mods: _Mods, q, k, v, score_consts, mask_consts, schedule):
  """Output `[q_blocks, batch, kv_heads, rows, value_dim]` float32 and log-sum-exp `[..., rows]`
  (+inf for a row that sees no key, whose output is 0), as `blockwise._forward`."""
  plan = mods.plan

  def fold(carry, s, kv_block):
    return blockwise.softmax_step(carry, s, blockwise._kv_tile(v, kv_block, plan))

  def query_block(q_block, q_i):
    carry = _visit_tiles(mods, schedule, q_block, q_i, k, score_consts, mask_consts, fold,
                         blockwise.softmax_init(q_i, v, zero))
    return blockwise.softmax_finish(carry)

  zero = blockwise._varying_zero(q, k, v, score_consts, mask_consts)
  return jax.lax.map(lambda xs: query_block(*xs), (jnp.arange(plan.q_blocks), q))


def _differentiable(consts) -> tuple[bool, ...]:
  return tuple(jnp.issubdtype(jnp.result_type(c), jnp.inexact) for c in consts)


def _backward(mods: _Mods, residuals, d_out, d_lse):
  """FlashAttention-2 backward as `blockwise._backward` (transposed tiles), with the score_mod's
  `vjp` per tile: its floating captured arrays' gradients are summed in the loop carry.

  Returns float32 `(dq [tile layout], dk, dv, d_score_consts)`; integer consts get None.
  """
  plan = mods.plan
  q, k, v, score_consts, mask_consts, schedule, out, lse = residuals
  batch_start, full_counts, full_tiles, partial_counts, partial_tiles = schedule
  floats = _differentiable(score_consts)
  delta = jnp.einsum("nbhrd,nbhrd->nbhr", d_out, out) - d_lse
  d_out = d_out.astype(v.dtype)

  def merged(diff):
    diff = iter(diff)
    return tuple(next(diff) if f else c for c, f in zip(score_consts, floats))

  def query_block(carry, xs):
    q_block, q_i, d_out_i, lse_i, delta_i = xs

    def visit(tiles, masked):
      def step(i, inner):
        dq_t, dk, dv, d_consts = inner
        kv_block = tiles[q_block, i]
        k_j, v_j = blockwise._kv_tile(k, kv_block, plan), blockwise._kv_tile(v, kv_block, plan)
        s_raw = _raw_logits(q_i, k_j, transposed=True)
        diff = tuple(c for c, f in zip(score_consts, floats) if f)
        scores = lambda s_raw, diff: _tile_scores(
            mods, s_raw, merged(diff), mask_consts, batch_start, q_block, kv_block,
            masked=masked, transposed=True)
        if mods.score is not None:
          s_t, score_vjp, visible = jax.vjp(scores, s_raw, diff, has_aux=True)
        else:
          s_t, visible = scores(s_raw, diff)
        dv, ds_t = blockwise.tile_dv_ds(s_t, v_j, d_out_i, lse_i, delta_i, dv, kv_block, plan)
        if mods.score is not None:
          ds_t, d_diff = score_vjp(ds_t)
          d_consts = tuple(a + b for a, b in zip(d_consts, d_diff))
          if visible is not None:  # A mod's non-finite slope where hidden must not leak in.
            ds_t = jnp.where(visible, ds_t, 0.0)
        dq_t, dk = blockwise.tile_dq_dk(ds_t, q_i, k_j, dq_t, dk, kv_block, plan)
        return dq_t, dk, dv, d_consts
      return step

    dq_t = jnp.zeros(jnp.swapaxes(q_i, -1, -2).shape) + zero
    inner = jax.lax.fori_loop(0, full_counts[q_block], visit(full_tiles, False), (dq_t, *carry))
    dq_t, *carry = jax.lax.fori_loop(0, partial_counts[q_block], visit(partial_tiles, True), inner)
    return tuple(carry), dq_t

  zero = blockwise._varying_zero(q, k, v, score_consts, mask_consts, d_out, lse)
  d_consts = tuple(jnp.zeros(jnp.shape(c), jnp.result_type(c)) + zero.astype(jnp.result_type(c))
                   for c, f in zip(score_consts, floats) if f)
  (dk, dv, d_consts), dq_t = jax.lax.scan(
      query_block, (jnp.zeros(k.shape) + zero, jnp.zeros(v.shape) + zero, d_consts),
      (jnp.arange(plan.q_blocks), q, d_out, lse, delta))
  d_consts = iter(d_consts)
  d_score_consts = tuple(next(d_consts) if f else None for f in floats)
  return jnp.swapaxes(dq_t, -1, -2), dk, dv, d_score_consts


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _kernel(mods: _Mods, q, k, v, score_consts, mask_consts, schedule):
  return _forward(mods, q, k, v, score_consts, mask_consts, schedule)


def _kernel_fwd(mods: _Mods, q, k, v, score_consts, mask_consts, schedule):
  out, lse = _forward(mods, q, k, v, score_consts, mask_consts, schedule)
  return (out, lse), (q, k, v, score_consts, mask_consts, schedule, out, lse)


def _kernel_bwd(mods: _Mods, residuals, cotangents):
  q, k, v = residuals[:3]
  d_out, d_lse = cotangents
  dq, dk, dv, d_score_consts = _backward(mods, residuals, d_out, d_lse)
  d_score_consts = tuple(None if d is None else d.astype(jnp.result_type(c))
                         for d, c in zip(d_score_consts, residuals[3]))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_score_consts,
          tuple(None for _ in residuals[4]), None)


_kernel.defvjp(_kernel_fwd, _kernel_bwd)


def _blockwise(query, key, value, score_fn, score_consts, mask_fn, mask_consts,
               block_mask: BlockMask, scale: float):
  """`(out [batch, q_len, heads, value_dim], lse [batch, heads, q_len])` from the tiled kernel.

  A block mask that differs between batch rows (documents packed differently in each) runs one row
  at a time (`lax.map`), so each row skips its own empty tiles; otherwise all rows share one pass.
  """
  if block_mask.kinds.shape[0] > 1 and query.shape[0] > 1:
    def row(xs):
      b, q, k, v, kinds = xs
      return _tiled_call(q[None], k[None], v[None], score_fn, score_consts, mask_fn, mask_consts,
                         kinds[None], b, block_mask, scale)
    rows = (jnp.arange(query.shape[0]), query, key, value, block_mask.kinds)
    out, lse = jax.lax.map(row, rows)
    return out[:, 0], lse[:, 0]
  return _tiled_call(query, key, value, score_fn, score_consts, mask_fn, mask_consts,
                     block_mask.kinds, 0, block_mask, scale)


def _tiled_call(query, key, value, score_fn, score_consts, mask_fn, mask_consts, kinds,
                batch_start, block_mask: BlockMask, scale: float):
  """`_blockwise` on the batch rows `batch_start, ...` given (`kinds` their tile kinds)."""
  batch, q_len, heads, _ = query.shape
  kv_heads = key.shape[2]
  plan = blockwise._Plan(q_len=q_len, kv_len=key.shape[1], block_q=block_mask.block_q,
                         block_kv=block_mask.block_kv, group=heads // kv_heads, softcap=None)
  kv_pad = plan.kv_blocks * plan.block_kv - plan.kv_len
  q = blockwise._tile_rows((query * scale).astype(query.dtype), plan=plan)
  k, v = (blockwise._kv_blocks(x, plan, kv_pad) for x in (key, value))
  mods = _Mods(plan=plan, score=score_fn, mask=mask_fn)
  out, lse = _kernel(mods, q, k, v, score_consts, mask_consts, _schedule(kinds, batch_start, plan))
  out = blockwise._untile_rows(out, plan, heads)
  lse = blockwise._untile_rows(lse[..., None], plan, heads)[..., 0]
  # Internally +inf marks a row without keys (so the backward's exp(s - lse) is 0); callers get -inf.
  lse = jnp.where(jnp.isposinf(lse), -jnp.inf, lse)
  return out.astype(query.dtype), jnp.swapaxes(lse, 1, 2)


def _reference(query, key, value, score_fn, score_consts, mask_fn, mask_consts, scale: float):
  """Dense attention: materialises the `[batch, heads, q_len, kv_len]` scores (for checking)."""
  batch, q_len, heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  acc = jnp.promote_types(query.dtype, jnp.float32)
  group = heads // kv_heads
  key = jnp.repeat(key.astype(acc), group, axis=2)
  value = jnp.repeat(value.astype(acc), group, axis=2)
  scores = jnp.einsum("bthd,bshd->bhts", query.astype(acc), key) * scale
  indices = (jnp.arange(batch), jnp.broadcast_to(jnp.arange(heads)[:, None], (heads, q_len)),
             jnp.arange(q_len), jnp.arange(kv_len))
  if score_fn is not None:
    scores = _evaluate(score_fn, score_consts, scores, *indices).astype(acc)
  if mask_fn is not None:
    scores = jnp.where(_evaluate(mask_fn, mask_consts, None, *indices), scores, -jnp.inf)
  row_max = max_shift(jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
  unnormalized = jnp.exp(scores - row_max)
  total = unnormalized.sum(-1, keepdims=True)
  seen = total > 0.0
  weights = unnormalized / jnp.where(seen, total, 1.0)
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)[..., 0]
  out = jnp.einsum("bhts,bshd->bthd", weights, value)
  return out.astype(query.dtype), lse.astype(jnp.float32)


def _check_inputs(query, key, value, scale, implementation) -> None:
  check_operands(query, key, value)
  if query.shape[1] == 0 or key.shape[1] == 0:
    raise ValueError(f"query and key lengths must be > 0, got query {query.shape}, key {key.shape}")
  if scale is not None and not is_number(scale):
    raise ValueError(f"scale must be a Python number or None, got {scale!r}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flex_attention implementation={implementation!r} is not supported; choose "
                     f"one of {IMPLEMENTATIONS}")


def _check_block_mask(block_mask, batch: int, heads: int, q_len: int, kv_len: int) -> None:
  if not isinstance(block_mask, BlockMask):
    raise ValueError(f"block_mask must come from create_block_mask, got {type(block_mask).__name__}")
  b, h = block_mask.shape[:2]
  built = [b, h, block_mask.q_len, block_mask.kv_len]
  if (block_mask.q_len, block_mask.kv_len) != (q_len, kv_len) or b not in (1, batch) or h not in (
      1, heads):
    raise ValueError(
        f"block_mask was built for [batch, heads, q_len, kv_len] = {built}, "
        f"the call has {[batch, heads, q_len, kv_len]}: build it with create_block_mask(mask_mod, "
        f"{batch}, {heads}, {q_len}, {kv_len}) (batch/heads may be None)")


def flex_attention(query, key, value, score_mod=None, mask_mod=None, block_mask=None, scale=None,
                   implementation=None, return_lse=False):
  """Attention with a user-defined score_mod and mask_mod, in O(length) memory.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]`, `heads % kv_heads == 0` (query head `h` reads key
      head `h // (heads // kv_heads)`).
    value: `[batch, kv_len, kv_heads, value_dim]`.
    score_mod: `(score, batch, head, q_idx, kv_idx) -> score` on scalars (float32 score, int32
      indices), applied to each scaled logit; None for plain attention. Captured floating arrays are
      differentiable.
    mask_mod: `(batch, head, q_idx, kv_idx) -> bool`: True where query `q_idx` sees key `kv_idx`.
      None: `block_mask.mask_mod` if a block mask is given, else every key is seen.
    block_mask: from `create_block_mask` for these sizes (built once, reused across layers); None
      builds one from `mask_mod` with the default block sizes. Its block sizes are the kernel's tiles.
    scale: logit scale; default `head_dim ** -0.5`.
    implementation: None or 'blockwise' (the tiled kernel) or 'reference' (dense, materialises the
      scores; for checking). None also hands a call whose mods are all structured (`causal_mask`,
      `sliding_window`, `document_mask`, `padding_mask`, `and_masks` of them; `soft_cap`) to
      `dot_product_attention(mask=Mask(...), softcap=...)` where that picks a fused kernel (cuDNN,
      splash, tokamax on GPU/TPU; `api.fused_choice`); on CPU, and with `return_lse`, it tiles here.
    return_lse: also return the log-sum-exp of each row's modified scores.

  Returns:
    `out` `[batch, q_len, heads, value_dim]` in the query dtype, or `(out, lse)` with `lse` `[batch,
    heads, q_len]` float32 (natural log). A query that sees no key gets `out` 0 and `lse` -inf, and
    passes no gradient. The lse is differentiable too.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  _check_inputs(query, key, value, scale, implementation)
  batch, q_len, heads, head_dim = query.shape
  if block_mask is not None:
    _check_block_mask(block_mask, batch, heads, q_len, key.shape[1])
    if mask_mod is None:
      mask_mod = block_mask.mask_mod
  if isinstance(mask_mod, StructuredMask):
    mask_mod.mask.validate(batch, heads, q_len, key.shape[1])
  fused = None if implementation is not None or return_lse else _fused_arguments(
      query, key, score_mod, mask_mod)
  if fused is not None:
    from flaxattn.attention import api  # pylint: disable=import-outside-toplevel  (api imports flex)
    mask, softcap = fused
    name = api.fused_choice(query, key, value, mask=mask, softcap=softcap)
    if name is not None:
      return api.dot_product_attention(query, key, value, mask=mask, softcap=softcap, scale=scale,
                                       implementation=name)
  scale = float(head_dim ** -0.5 if scale is None else scale)
  out, lse = _attend(query, key, value, score_mod, mask_mod, block_mask, scale,
                     dense=implementation == "reference")
  return (out, lse) if return_lse else out


def _attend(query, key, value, score_mod, mask_mod, block_mask: BlockMask | None, scale: float, *,
            dense: bool, block_size=None):
  """`(out, lse)` of checked inputs: tiled (a block mask built from `mask_mod` with `block_size`
  when none is given) or `dense` (`_reference`)."""
  batch, q_len, heads, _ = query.shape
  kv_len = key.shape[1]
  score_fn, score_consts = (None, ()) if score_mod is None else _hoist("score_mod", score_mod)
  mask_fn, mask_consts = (None, ()) if mask_mod is None else _hoist("mask_mod", mask_mod)
  if dense:
    return _reference(query, key, value, score_fn, score_consts, mask_fn, mask_consts, scale)
  if block_mask is None:
    block_mask = (_dense_block_mask(q_len, kv_len, block_size) if mask_mod is None else
                  create_block_mask(mask_mod, batch, heads, q_len, kv_len, block_size))
  return _blockwise(query, key, value, score_fn, score_consts, mask_fn, mask_consts, block_mask,
                    scale)


@dataclasses.dataclass(frozen=True, eq=False)
class FlexMods:
  """The mods of a `dot_product_attention` call (`score_mod=`, `mask_mod=`, `block_mask=`), which the
  dispatcher passes as `mods=` to implementations that declare `mods` (blockwise, reference)."""

  score_mod: Callable | None = None
  mask_mod: Callable | None = None
  block_mask: BlockMask | None = None

  def run(self, query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dense: bool,
          block_size=None):
    """`[batch, q_len, heads, value_dim]`: the mods with the call's `mask` (and), `softcap` (applied
    first) and `bias` (added last) folded in, as `dot_product_attention` orders them.

    The call's `Mask` keeps its own alignment (query `i` at position `i + kv_len - q_len`). A given
    block mask classified the mask_mod alone, so with a `Mask` its full tiles become partial (the
    Mask is evaluated there; empty tiles stay skipped).
    """
    q_len, kv_len = query.shape[1], key.shape[1]
    mask_mod, block_mask = self.mask_mod, self.block_mask
    if mask_mod is None and block_mask is not None:
      mask_mod = block_mask.mask_mod
    if mask is not None:
      visible = mask.mask_mod(offset=kv_len - q_len)
      mask_mod = visible if mask_mod is None else and_masks(mask_mod, visible)
      if block_mask is not None:
        kinds = jnp.where(block_mask.kinds == FULL, PARTIAL, block_mask.kinds).astype(jnp.int8)
        block_mask = dataclasses.replace(block_mask, kinds=kinds, mask_mod=mask_mod)
    score_mod = _capped_and_biased(self.score_mod, softcap, bias)
    return _attend(query, key, value, score_mod, mask_mod, block_mask, scale, dense=dense,
                   block_size=block_size)[0]


def _capped_and_biased(score_mod, softcap, bias):
  """`score_mod` after `soft_cap(softcap)` and before adding `bias` (`[batch|1, heads|1, q_len|1,
  kv_len|1]`, captured: differentiable)."""
  if softcap is None and bias is None:
    return score_mod
  cap = None if softcap is None else soft_cap(softcap)

  def combined(score, b, h, q_idx, kv_idx):
    if cap is not None:
      score = cap(score, b, h, q_idx, kv_idx)
    if score_mod is not None:
      score = score_mod(score, b, h, q_idx, kv_idx)
    if bias is not None:
      index = tuple(i if size > 1 else 0 for i, size in zip((b, h, q_idx, kv_idx), bias.shape))
      score = score + bias[index].astype(jnp.float32)
    return score

  return combined
