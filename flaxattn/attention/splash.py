"""Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), TPU only.

Splash attention takes a static mask (here `CausalMask` / `LocalMask` / `FullMask`, one per head in a
`MultiHeadMask`) from which it precomputes, per block, whether to skip, compute unmasked or compute
masked, plus optional dynamic `SegmentIds`. flaxattn's `Mask` maps onto it as follows:

* causal and window: the static mask, with `offset = kv_len - q_len` (flaxattn end-aligns positions;
  splash shifts query `i` to `i + offset`). A window under `causal=True` has its right side set to 0.
* segment ids, query/key lengths and block padding: dynamic segment ids. Padding keys and keys past
  `kv_lengths` get one id below every real id, padding queries and queries past `q_lengths` another,
  so they match nothing. (An id equal to the int32 minimum would collide; no packer produces one.)
* lengths that are not multiples of the block are zero-padded at the end; keys are padded at least
  as far as queries, so every padding query still sees a (masked) key block and stays finite.
* GQA/MQA: the MQA kernel per key/value head, over that head's group of query heads (`lax.map`
  over batch and key/value heads); plain multi-head attention uses the MHA kernel per batch element.
* soft-cap: the kernel's `attn_logits_soft_cap`; the scale is folded into the query beforehand.

Queries that see no key get zeros (the kernel would average the masked keys); `rows.sees_any_key`
finds them exactly. Kernels are cached (`functools.lru_cache`) on their static parameters, so the
mask metadata is computed once per shape. Bias and explicit mask arrays are declined, as are
causal/window masks with `q_len > kv_len` (queries before the first key, which splash cannot
represent without a fully masked row). On a CPU, run it inside `pltpu.force_tpu_interpret_mode()`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxattn.attention import placement, rows
from flaxattn.attention.mask import Mask
from flaxattn.attention.spec import Call, Implementation

# Lanes of a TPU vreg: splash's key blocks must be multiples of it; query blocks are kept so too.
LANES = 128
# Largest block (positions) along queries and keys; shorter sequences use one block, rounded up to
# LANES. 512 is splash's usual tuned size on v4/v5 TPUs for head_dim 128.
MAX_BLOCK = 512


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _constraints(call: Call) -> str | None:
  if call.masks & {"causal", "window"} and call.q_len > call.kv_len:
    return (f"causal/window masks with q_len > kv_len ({call.q_len} > {call.kv_len}): the first "
            f"queries sit before every key, a fully masked row splash cannot run")
  return None


def block_plan(q_len: int, kv_len: int) -> tuple[int, int, int, int]:
  """`(block_q, block_kv, padded_q_len, padded_kv_len)` for a call.

  Blocks are multiples of LANES up to MAX_BLOCK; lengths are padded to whole blocks, and keys by at
  least as much as queries so that each padding query's own (end-aligned) position is a key index.
  """
  block_q = min(MAX_BLOCK, _round_up(q_len, LANES))
  padded_q = _round_up(q_len, block_q)
  block_kv = min(MAX_BLOCK, _round_up(kv_len + padded_q - q_len, LANES))
  padded_kv = _round_up(kv_len + padded_q - q_len, block_kv)
  return block_q, block_kv, padded_q, padded_kv


@functools.lru_cache(maxsize=64)
def make_kernel(*, mqa: bool, heads: int, padded_q: int, padded_kv: int, offset: int, causal: bool,
                window: tuple[int | None, int | None] | None, block_q: int, block_kv: int,
                softcap: float | None, mesh=None):
  """The splash kernel for these static parameters (cached: building the mask metadata costs
  O(blocks) NumPy work at trace time).

  Args:
    mqa: one key/value head shared by `heads` query heads (else `heads` of each).
    heads: query heads the kernel sees.
    padded_q, padded_kv: the padded lengths (multiples of the blocks).
    offset: `kv_len - q_len` of the unpadded call (query `i` sits at key position `i + offset`).
    causal, window: as `Mask`.
    block_q, block_kv: block sizes, forward and backward.
    softcap: the logit soft-cap or None.
    mesh: the calling context's abstract mesh (`jax.sharding.get_abstract_mesh()`), a cache key
      only: the metadata arrays take that context's mesh (inside a shard_map, its manual axes),
      and calls under another mesh reject them.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  shape = (padded_q, padded_kv)
  if window is not None:
    left, right = window
    if causal:
      right = 0 if right is None else min(right, 0)
    head_mask = splash.LocalMask(shape, window_size=(left, right), offset=offset)
  elif causal:
    head_mask = splash.CausalMask(shape, offset=offset)
  else:
    head_mask = splash.FullMask(shape)
  block_sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      use_fused_bwd_kernel=True)
  maker = splash.make_splash_mqa_single_device if mqa else splash.make_splash_mha_single_device
  del mesh  # Only a cache key.
  # The kernel holds its mask metadata as arrays: make them concrete even when first asked for
  # inside a trace (a shard_map would otherwise make them tracers, which the cache would leak).
  with jax.ensure_compile_time_eval():
    return maker(splash.MultiHeadMask([head_mask] * heads), block_sizes=block_sizes,
                 attn_logits_soft_cap=softcap)


def _segment_ids(mask: Mask, batch: int, q_len: int, kv_len: int, padded_q: int, padded_kv: int):
  """`(q_ids [batch, padded_q], kv_ids [batch, padded_kv])` int32, or None when nothing needs them.

  Real segment ids where given (else 0); keys beyond `kv_lengths` or the true length get one id
  below every real id, queries beyond `q_lengths` or the true length another one below that.
  """
  padded = padded_q != q_len or padded_kv != kv_len
  if mask.q_segment_ids is None and mask.q_lengths is None and mask.kv_lengths is None and not padded:
    return None
  if mask.q_segment_ids is None:
    q_ids = jnp.zeros((batch, q_len), jnp.int32)
    kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
  else:
    q_ids = jnp.asarray(mask.q_segment_ids, jnp.int32)
    kv_ids = jnp.asarray(mask.kv_segment_ids, jnp.int32)
  lowest = jnp.minimum(q_ids.min(), kv_ids.min())
  no_key, no_query = lowest - 1, lowest - 2
  q_ids = jnp.pad(q_ids, ((0, 0), (0, padded_q - q_len)), constant_values=0)
  kv_ids = jnp.pad(kv_ids, ((0, 0), (0, padded_kv - kv_len)), constant_values=0)
  q_valid = jnp.broadcast_to(jnp.arange(padded_q)[None, :] < q_len, (batch, padded_q))
  kv_valid = jnp.broadcast_to(jnp.arange(padded_kv)[None, :] < kv_len, (batch, padded_kv))
  if mask.q_lengths is not None:
    q_valid = q_valid & (jnp.arange(padded_q)[None, :] < jnp.asarray(mask.q_lengths)[:, None])
  if mask.kv_lengths is not None:
    kv_valid = kv_valid & (jnp.arange(padded_kv)[None, :] < jnp.asarray(mask.kv_lengths)[:, None])
  return jnp.where(q_valid, q_ids, no_query), jnp.where(kv_valid, kv_ids, no_key)


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool):
  """Arguments as `flaxattn.attention.dot_product_attention`, already validated.

  Under a multi-device mesh the kernel runs per device inside `jax.shard_map`
  (`placement.run_per_device`); batch and heads may be sharded, lengths and head_dim may not.

  Returns `[batch, q_len, heads, value_dim]` in the query dtype.
  """
  del bias, dropout_rate, dropout_rng, return_weights  # Declined: the dispatcher never passes them.
  run = functools.partial(_attention_on_device, scale=scale, softcap=softcap)
  return placement.run_per_device(run, query, key, value, mask if mask is not None else Mask(),
                                  None, name="splash")


def _attention_on_device(query, key, value, mask: Mask, bias, *, scale: float, softcap):
  """`attention` on one device's (or the whole) arrays; `bias` is always None here."""
  del bias
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=import-outside-toplevel

  batch, q_len, heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  group = heads // kv_heads
  block_q, block_kv, padded_q, padded_kv = block_plan(q_len, kv_len)
  kernel = make_kernel(
      mqa=group > 1, heads=group if group > 1 else heads, padded_q=padded_q, padded_kv=padded_kv,
      offset=kv_len - q_len, causal=mask.causal, window=mask.window, block_q=block_q,
      block_kv=block_kv, softcap=softcap, mesh=jax.sharding.get_abstract_mesh())

  # Scale folded into the query (splash has no scale argument), in float32 before rounding back.
  query = (query.astype(jnp.float32) * scale).astype(query.dtype)
  query = rows.pad_length(query, padded_q)
  key, value = rows.pad_length(key, padded_kv), rows.pad_length(value, padded_kv)
  ids = _segment_ids(mask, batch, q_len, kv_len, padded_q, padded_kv)
  segment_ids = None if ids is None else splash.SegmentIds(q=ids[0], kv=ids[1])

  # One kernel call per batch element (MHA) or per (batch element, key/value head) (GQA/MQA), looped
  # with `lax.map`: Pallas' TPU interpret mode (the CPU test path) cannot `vmap` a splash kernel in
  # jax 0.10.2, and each call's grid (heads x query blocks x key blocks) is large at long lengths.
  if group == 1:
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)  # [batch, heads, length, dim]
    out = jax.lax.map(lambda args: kernel(*args[:3], segment_ids=args[3]),
                      (heads_major(query), heads_major(key), heads_major(value), segment_ids))
    out = jnp.swapaxes(out, 1, 2)  # [batch, padded_q, heads, value_dim]
  else:
    # [batch * kv_heads, group, length, dim] queries; [batch * kv_heads, length, dim] keys/values.
    grouped_query = query.reshape(batch, padded_q, kv_heads, group, -1).transpose(0, 2, 3, 1, 4)
    grouped_query = grouped_query.reshape(batch * kv_heads, group, padded_q, -1)
    per_kv_head = lambda x: jnp.swapaxes(x, 1, 2).reshape(batch * kv_heads, padded_kv, -1)
    if segment_ids is not None:
      segment_ids = jax.tree.map(lambda ids: jnp.repeat(ids, kv_heads, axis=0), segment_ids)
    out = jax.lax.map(lambda args: kernel(*args[:3], segment_ids=args[3]),
                      (grouped_query, per_kv_head(key), per_kv_head(value), segment_ids))
    out = out.reshape(batch, kv_heads, group, padded_q, -1).transpose(0, 3, 1, 2, 4)
    out = out.reshape(batch, padded_q, heads, -1)
  out = out[:, :q_len].astype(query.dtype)
  sees_any = rows.sees_any_key(mask, batch, q_len, kv_len)
  return rows.zero_rows_without_keys(out, sees_any)


IMPLEMENTATION = Implementation(
    name="splash",
    fn=attention,
    masks=frozenset({"causal", "window", "segment_ids", "lengths"}),
    bias=False,
    softcap=True,
    dropout=False,
    weights=False,
    dtypes=frozenset({"float32", "bfloat16"}),
    platforms=frozenset({"tpu"}),
    memory="O(length)",
    notes=("Pallas TPU splash attention; static causal/window mask + segment ids (lengths and "
           "padding as segment ids); GQA by the MQA kernel per key/value head; softcap; no bias."),
    constraints=_constraints,
)
