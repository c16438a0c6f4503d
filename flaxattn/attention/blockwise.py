"""Blockwise attention: exact attention by online softmax over query and key blocks (FlashAttention-2).

Pure JAX. The forward pass walks key blocks for each query block, keeping a running row maximum, row sum
and weighted sum; it saves only the output and the per-row log-sum-exp. The backward pass (a
`jax.custom_vjp`) recomputes each tile's weights from the log-sum-exp instead of storing them, so forward
and gradient both need O(length) memory.

Layout. Queries are transposed once to `[batch, kv_heads, rows, dim]`, where the query rows of one key
head are its `group = heads // kv_heads` query heads folded in (`row = position * group + g`): GQA/MQA
then needs no repeated keys, and every tile product is one large batched matmul, which is what XLA:CPU
runs well. Keys and values stay `[batch, kv_len, kv_heads, dim]` and each visited key block is sliced
and transposed in the loop: a call that visits few blocks (a decoding step over a large KV cache)
then never touches the others. Queries and keys are padded to whole blocks; padded keys are masked
out through `Mask.kv_lengths`, padded queries are sliced off.

Block skipping. A query block only visits the key blocks in the range that causal/window masks
(`Mask.kv_bounds`), key lengths, query lengths and segment ids can leave visible; the range is a dynamic
loop bound, so causal attention costs about half of full attention and a fixed window is linear in
length. Inside a visited tile, `Mask.tile` gives the exact visibility.

Block sizes are keyword arguments of `attention` (defaults in `DEFAULT_BLOCKS`); to route the dispatcher
to other sizes, register a variant, e.g. `api.register(dataclasses.replace(IMPLEMENTATION,
name="blockwise_128", fn=functools.partial(attention, block_q=128, block_kv=128)))`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention.mask import Mask
from flaxattn.attention.rows import max_shift, pad_length
from flaxattn.attention.spec import Implementation

# (block_q, block_kv) per platform. CPU: from benchmarks/tune_blockwise.py on 2 cores, head_dim 64, 8
# heads: 256x256 to 512x1024 were within noise of each other at 4k tokens; 256 query positions keep
# causal skipping fine-grained and a tile (8 x 256 x 512 float32, 4 MiB) inside the L3 cache.
# GPU/TPU: untuned. XLA runs every tile as a few separate kernels there, so tiles must be large for the
# launch cost to amortise; a fused Pallas/cuDNN kernel is the better choice on those platforms.
DEFAULT_BLOCKS = {"cpu": (256, 512), "gpu": (512, 1024), "tpu": (512, 1024)}


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts about one call: lengths, block sizes, query heads per key head, softcap."""

  q_len: int
  kv_len: int
  block_q: int
  block_kv: int
  group: int
  softcap: float | None

  @property
  def q_blocks(self) -> int:
    return -(-self.q_len // self.block_q)

  @property
  def kv_blocks(self) -> int:
    return -(-self.kv_len // self.block_kv)


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool, block_q: int | None = None,
              block_kv: int | None = None, mods=None):
  """Exact attention in O(length) memory, forward and backward.

  Args:
    query: `[batch, q_len, heads, head_dim]`, float32/bfloat16/float16.
    key: `[batch, kv_len, kv_heads, head_dim]`, same dtype.
    value: `[batch, kv_len, kv_heads, value_dim]`, same dtype.
    mask, bias, scale, softcap: as `flaxattn.attention.dot_product_attention`, already validated (bias
      rank 4, broadcastable to `[batch, heads, q_len, kv_len]`).
    dropout_rate, dropout_rng, return_weights: unsupported (declared so); the dispatcher never sets them.
    block_q: query positions per block (default: `DEFAULT_BLOCKS` of the platform); GQA tiles hold
      `block_q * heads // kv_heads` rows.
    block_kv: key positions per block (default: `DEFAULT_BLOCKS`).
    mods: a `flex.FlexMods` (the call's score_mod/mask_mod/block_mask) or None: it then runs on
      `flex_attention`'s tiles (these block sizes unless its block mask has its own).

  Returns:
    `[batch, q_len, heads, value_dim]` in the query dtype; float32 accumulation inside.
  """
  del dropout_rate, dropout_rng, return_weights  # Unsupported: the dispatcher rejects them first.
  if mods is not None:
    default_q, default_kv = DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS["cpu"])
    _check_block("block_q", block_q)
    _check_block("block_kv", block_kv)
    return mods.run(query, key, value, mask=mask, bias=bias, scale=scale, softcap=softcap,
                    dense=False, block_size=(block_q or default_q, block_kv or default_kv))
  batch, q_len, heads, _ = query.shape
  if q_len == 0 or key.shape[1] == 0:  # Nothing to attend: a query that sees no key gets zeros.
    return jnp.zeros((batch, q_len, heads, value.shape[-1]), query.dtype)
  plan, q, k, v, bias, mask = _tiled(query, key, value, bias, mask, scale, softcap, block_q, block_kv)
  out = _attention(q, k, v, bias, mask, plan)
  return _untile_rows(out, plan, heads).astype(query.dtype)


def forward_with_lse(query, key, value, *, mask: Mask | None, scale: float, softcap=None,
                     block_q: int | None = None, block_kv: int | None = None):
  """The forward pass alone, with each row's log-sum-exp: the pieces of a larger online softmax.

  Ring attention (`flaxattn.attention.ring`) runs this on each pair of sequence shards and merges the
  partial results by their log-sum-exp. Not differentiable (pair it with `backward_from_lse`).

  Args:
    query, key, value: as `attention` (`[batch, q_len, heads, head_dim]`, `[batch, kv_len, kv_heads,
      head_dim]`, `[batch, kv_len, kv_heads, value_dim]`), both lengths > 0.
    mask, scale, softcap, block_q, block_kv: as `attention` (no bias).

  Returns:
    `(out, lse)`: `out` `[batch, q_len, heads, value_dim]` float32, the softmax-weighted values of the
    keys given; `lse` `[batch, q_len, heads]` float32, `log(sum_j exp(logit_j))` over the visible keys,
    `+inf` for a row that sees none of them (its `out` is 0).
  """
  heads = query.shape[2]
  plan, q, k, v, _, mask = _tiled(query, key, value, None, mask, scale, softcap, block_q, block_kv)
  out, lse = _forward(q, k, v, None, mask, plan)
  return _untile_rows(out, plan, heads), _untile_rows(lse[..., None], plan, heads)[..., 0]


def backward_from_lse(query, key, value, out, lse, d_out, *, mask: Mask | None, scale: float,
                      softcap=None, block_q: int | None = None, block_kv: int | None = None):
  """Gradients of attention over the keys given, with the softmax normalised by a given log-sum-exp.

  With `out` and `lse` of the whole attention (all keys, e.g. merged over a ring), the results are
  this key block's share: `dq` summed over all key blocks, and `dk`, `dv` of these keys, are the
  exact gradients (FlashAttention-2's backward, which never needs the other blocks' logits).

  Args:
    query, key, value, mask, scale, softcap, block_q, block_kv: as `forward_with_lse`.
    out: `[batch, q_len, heads, value_dim]` float32, the attention output over all keys.
    lse: `[batch, q_len, heads]` float32, its log-sum-exp (`+inf` for rows that see no key).
    d_out: `[batch, q_len, heads, value_dim]`, the output's cotangent.

  Returns:
    `(dq, dk, dv)` float32, shaped like `query`, `key`, `value`.
  """
  heads = query.shape[2]
  plan, q, k, v, _, mask = _tiled(query, key, value, None, mask, scale, softcap, block_q, block_kv)
  rows = functools.partial(_tile_rows, plan=plan)
  # Padded query rows get lse +inf: their weights are 0, so they add nothing to dk and dv.
  residuals = (q, k, v, None, mask, rows(out.astype(jnp.float32)),
               rows(lse[..., None], pad_value=jnp.inf)[..., 0])
  dq, dk, dv, _ = _backward(plan, residuals, rows(d_out))
  # The tiles hold the scaled queries, so the query's gradient takes the scale once more.
  dq = _untile_rows(dq, plan, heads) * scale
  return dq, _untile_kv(dk, plan), _untile_kv(dv, plan)


def _check_block(name: str, block) -> None:
  if block is not None and not (isinstance(block, (int, np.integer)) and block > 0):
    raise ValueError(f"{name} must be a positive int or None, got {block!r}")


def _tiled(query, key, value, bias, mask: Mask | None, scale: float, softcap, block_q, block_kv):
  """`(plan, q, k, v, bias, mask)` in the tile layout, padded to whole blocks (see module doc).

  `q` is `[q_blocks, batch, kv_heads, block_q * group, head_dim]`, already multiplied by `scale` (in
  bfloat16 that rounds the scaled queries; exact for power-of-two scales such as 1/8 at head_dim 64);
  `k`, `v` are `[batch, kv_blocks * block_kv, kv_heads, dim]` (blocks taken by `_kv_tile`).
  """
  batch, q_len, heads, _ = query.shape
  kv_len, kv_heads = key.shape[1], key.shape[2]
  default_q, default_kv = DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS["cpu"])
  _check_block("block_q", block_q)
  _check_block("block_kv", block_kv)
  plan = _Plan(
      q_len=q_len, kv_len=kv_len,
      block_q=min(int(block_q or default_q), q_len),
      block_kv=min(int(block_kv or default_kv), kv_len),
      group=heads // kv_heads,
      softcap=None if softcap is None else float(softcap))
  q_pad = plan.q_blocks * plan.block_q - q_len
  kv_pad = plan.kv_blocks * plan.block_kv - kv_len
  q = _tile_rows((query * scale).astype(query.dtype), plan=plan)
  k, v = (_kv_blocks(x, plan, kv_pad) for x in (key, value))
  if bias is not None:
    bias = jnp.pad(bias, [(0, 0), (0, 0), (0, q_pad if bias.shape[2] > 1 else 0),
                          (0, kv_pad if bias.shape[3] > 1 else 0)])
  return plan, q, k, v, bias, _pad_mask(mask, batch, plan, q_pad, kv_pad)


def _tile_rows(x, *, plan: _Plan, pad_value=0.0):
  """`[batch, q_len, heads, d]` -> `[q_blocks, batch, kv_heads, block_q * group, d]`: rows (position,
  g), positions padded with `pad_value` to whole blocks."""
  batch, q_len, heads, dim = x.shape
  kv_heads = heads // plan.group
  x = x.reshape(batch, q_len, kv_heads, plan.group, dim)
  x = pad_length(x, plan.q_blocks * plan.block_q, value=pad_value)
  x = x.reshape(batch, plan.q_blocks, plan.block_q, kv_heads, plan.group, dim)
  return x.transpose(1, 0, 3, 2, 4, 5).reshape(
      plan.q_blocks, batch, kv_heads, plan.block_q * plan.group, dim)


def _untile_rows(x, plan: _Plan, heads: int):
  """Inverse of `_tile_rows`: `[batch, q_len, heads, d]` with the padded positions dropped."""
  q_blocks, batch, kv_heads, _, dim = x.shape
  x = x.reshape(q_blocks, batch, kv_heads, plan.block_q, plan.group, dim)
  x = x.transpose(1, 0, 3, 2, 4, 5).reshape(batch, q_blocks * plan.block_q, heads, dim)
  return x[:, :plan.q_len]


def _untile_kv(x, plan: _Plan):
  """Inverse of `_kv_blocks`: `[batch, kv_blocks * block_kv, kv_heads, d]` -> `[batch, kv_len,
  kv_heads, d]`."""
  return x[:, :plan.kv_len]


def _kv_blocks(x, plan: _Plan, kv_pad: int):
  """`[batch, kv_len, kv_heads, d]` zero padded to whole key blocks (a copy only when `kv_pad`)."""
  return pad_length(x, x.shape[1] + kv_pad)


def _kv_tile(x, kv_block, plan: _Plan):
  """Key block `kv_block` (traced) of `[batch, kv_blocks * block_kv, kv_heads, d]` as the tile
  `[batch, kv_heads, block_kv, d]`."""
  block = jax.lax.dynamic_slice_in_dim(x, kv_block * plan.block_kv, plan.block_kv, axis=1)
  return jnp.swapaxes(block, 1, 2)


def _kv_untile(tile):
  """Inverse of `_kv_tile` for one block: `[batch, kv_heads, block_kv, d]` -> `[batch, block_kv,
  kv_heads, d]`."""
  return jnp.swapaxes(tile, 1, 2)


def _pad_mask(mask: Mask | None, batch: int, plan: _Plan, q_pad: int, kv_pad: int) -> Mask:
  """The mask over padded lengths: padded keys hidden by `kv_lengths`, arrays padded to whole blocks.

  Segment ids are padded with their last value so that padding does not widen the per-block id ranges
  used for skipping (padded keys are hidden anyway, padded queries dropped).
  """
  mask = Mask() if mask is None else mask
  kv_lengths = mask.kv_lengths
  if kv_lengths is not None:
    kv_lengths = jnp.minimum(jnp.asarray(kv_lengths), plan.kv_len)
  elif kv_pad:
    kv_lengths = jnp.full((batch,), plan.kv_len, jnp.int32)
  q_segment_ids, kv_segment_ids = mask.q_segment_ids, mask.kv_segment_ids
  if q_segment_ids is not None:
    q_segment_ids = jnp.pad(jnp.asarray(q_segment_ids), ((0, 0), (0, q_pad)), mode="edge")
    kv_segment_ids = jnp.pad(jnp.asarray(kv_segment_ids), ((0, 0), (0, kv_pad)), mode="edge")
  array = mask.array
  if array is not None:
    array = jnp.asarray(array)
    array = array.reshape((1,) * (4 - array.ndim) + array.shape)
    array = jnp.pad(array, [(0, 0), (0, 0), (0, q_pad if array.shape[2] > 1 else 0),
                            (0, kv_pad if array.shape[3] > 1 else 0)])
  return dataclasses.replace(mask, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
                             kv_lengths=kv_lengths, array=array)


def _kv_block_range(mask: Mask, plan: _Plan, q_block):
  """Key blocks `[lo, hi)` that may hold a visible key for query block `q_block` (traced int)."""
  q_lo = q_block * plan.block_q
  q_hi = jnp.minimum(q_lo + plan.block_q, plan.q_len)
  lo, hi = mask.kv_bounds(q_lo, q_hi, offset=plan.kv_len - plan.q_len, kv_len=plan.kv_len)
  if mask.kv_lengths is not None:
    hi = jnp.minimum(hi, jnp.max(mask.kv_lengths))
  if mask.q_lengths is not None:
    hi = jnp.where(q_lo < jnp.max(mask.q_lengths), hi, 0)
  lo, hi = lo // plan.block_kv, -(-hi // plan.block_kv)
  if mask.q_segment_ids is not None:
    # A tile can only hold equal ids if the blocks' [min, max] id ranges intersect in some batch row.
    q_ids = jax.lax.dynamic_slice_in_dim(mask.q_segment_ids, q_lo, plan.block_q, axis=1)
    kv_ids = mask.kv_segment_ids.reshape(-1, plan.kv_blocks, plan.block_kv)
    meets = jnp.any((kv_ids.max(-1) >= q_ids.min(-1, keepdims=True))
                    & (kv_ids.min(-1) <= q_ids.max(-1, keepdims=True)), axis=0)
    lo = jnp.maximum(lo, jnp.argmax(meets))
    hi = jnp.where(jnp.any(meets), jnp.minimum(hi, plan.kv_blocks - jnp.argmax(meets[::-1])), 0)
  return lo, hi


def _fold_heads(tile, kv_heads: int, group: int, block_q: int):
  """`[b, heads|1, block_q|1, block_kv|1]` -> `[b, kv_heads|1, block_q * group|1, block_kv|1]`.

  Rows follow the folded query layout (`row = position * group + g`).
  """
  b, h, rows, cols = tile.shape
  if group == 1 or (h == 1 and rows == 1):
    return tile
  if h == 1:
    return jnp.broadcast_to(tile[:, :, :, None], (b, 1, rows, group, cols)).reshape(
        b, 1, rows * group, cols)
  tile = jnp.broadcast_to(tile, (b, h, block_q, cols))
  tile = tile.reshape(b, kv_heads, group, block_q, cols).transpose(0, 1, 3, 2, 4)
  return tile.reshape(b, kv_heads, block_q * group, cols)


def _unfold_heads(tile, like_shape, kv_heads: int, group: int):
  """Inverse of `_fold_heads` for a gradient: sums over the dims where `like_shape` broadcasts."""
  b, _, rows, cols = tile.shape
  tile = tile.reshape(b, kv_heads, rows // group, group, cols).transpose(0, 1, 3, 2, 4)
  tile = tile.reshape(b, kv_heads * group, rows // group, cols)
  axes = tuple(axis for axis, size in enumerate(like_shape) if size == 1 and tile.shape[axis] != 1)
  return tile.sum(axis=axes, keepdims=True) if axes else tile


def _bias_tile(bias, q_start, block_q: int, kv_start, block_kv: int):
  """The `[b|1, heads|1, block_q|1, block_kv|1]` tile of a (padded) bias; broadcast dims stay 1."""
  if bias.shape[2] != 1:
    bias = jax.lax.dynamic_slice_in_dim(bias, q_start, block_q, axis=2)
  if bias.shape[3] != 1:
    bias = jax.lax.dynamic_slice_in_dim(bias, kv_start, block_kv, axis=3)
  return bias


def _logits(q_i, k_j, bias, mask: Mask, plan: _Plan, q_block, kv_block, *, transposed: bool):
  """One tile's logits, float32, -inf where hidden, and the softcap's tanh (or None).

  `[batch, kv_heads, rows, block_kv]`, or `[batch, kv_heads, block_kv, rows]` if `transposed`. The query
  block `q_i` is already multiplied by the scale.
  """
  kv_heads = k_j.shape[1]
  if transposed:
    s = jnp.einsum("bhkd,bhrd->bhkr", k_j, q_i, preferred_element_type=jnp.float32)
  else:
    s = jnp.einsum("bhrd,bhkd->bhrk", q_i, k_j, preferred_element_type=jnp.float32)
  orient = (lambda tile: jnp.swapaxes(tile, -1, -2)) if transposed else (lambda tile: tile)
  capped = None
  if plan.softcap is not None:
    capped = jnp.tanh(s / plan.softcap)
    s = plan.softcap * capped
  q_start, kv_start = q_block * plan.block_q, kv_block * plan.block_kv
  if bias is not None:
    tile = _bias_tile(bias, q_start, plan.block_q, kv_start, plan.block_kv)
    s = s + orient(_fold_heads(tile.astype(jnp.float32), kv_heads, plan.group, plan.block_q))
  visible = mask.tile(q_start, plan.block_q, kv_start, plan.block_kv,
                      offset=plan.kv_len - plan.q_len)
  if visible is not None:
    s = jnp.where(orient(_fold_heads(visible, kv_heads, plan.group, plan.block_q)), s, -jnp.inf)
  return s, capped


def _varying_zero(*operands):
  """A float32 scalar 0 that varies over the same `shard_map` mesh axes as `operands`.

  Loop carries must keep one type through a loop; inside `shard_map` a carry that starts as a constant
  but is updated from sharded operands would change type, so initial carries add this zero.
  """
  return sum(jnp.zeros_like(leaf, jnp.float32).reshape(-1)[:1].sum()
             for leaf in jax.tree.leaves(operands))


def softmax_init(q_i, v, zero):
  """The online softmax's carry for the query tile `q_i` `[batch, kv_heads, rows, dim]`: row max
  -inf, row sum 0, accumulator `[..., rows, value_dim]` 0 (each plus `zero`, see `_varying_zero`)."""
  rows = q_i.shape[:-1]
  return (jnp.full(rows, -jnp.inf) + zero, jnp.zeros(rows) + zero,
          jnp.zeros(rows + v.shape[-1:]) + zero)


def softmax_step(carry, s, v_j):
  """Folds one key tile into the online softmax: `s` `[batch, kv_heads, rows, block_kv]` float32
  logits (-inf where hidden), `v_j` `[batch, kv_heads, block_kv, value_dim]`."""
  row_max, row_sum, acc = carry
  new_max = jnp.maximum(row_max, s.max(-1))
  # Until a row has seen a key its max is -inf (`max_shift` then shifts by 0).
  shift = max_shift(new_max)
  p = jnp.exp(s - shift[..., None])
  correction = jnp.exp(row_max - shift)
  row_sum = row_sum * correction + p.sum(-1)
  pv = jnp.einsum("bhrk,bhkd->bhrd", p.astype(v_j.dtype), v_j, preferred_element_type=jnp.float32)
  return new_max, row_sum, acc * correction[..., None] + pv


def softmax_finish(carry):
  """`(out, lse)` of a query tile from its final carry; a row that saw no key gets out 0, lse +inf."""
  row_max, row_sum, acc = carry
  seen = row_sum > 0.0
  out = acc / jnp.where(seen, row_sum, 1.0)[..., None]
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), jnp.inf)
  return out, lse


def _forward(q, k, v, bias, mask: Mask, plan: _Plan):
  """Output `[q_blocks, batch, kv_heads, rows, value_dim]` float32 and log-sum-exp `[..., rows]`.

  A row that sees no key gets output 0 and log-sum-exp +inf (so the backward's `exp(s - lse)` is 0).
  """

  def query_block(q_block, q_i):

    def step(kv_block, carry):
      s, _ = _logits(q_i, _kv_tile(k, kv_block, plan), bias, mask, plan, q_block, kv_block,
                     transposed=False)
      return softmax_step(carry, s, _kv_tile(v, kv_block, plan))

    lo, hi = _kv_block_range(mask, plan, q_block)
    return softmax_finish(jax.lax.fori_loop(lo, hi, step, softmax_init(q_i, v, zero)))

  zero = _varying_zero(q, k, v, bias, mask)
  return jax.lax.map(lambda xs: query_block(*xs), (jnp.arange(plan.q_blocks), q))


def _add_at(buffer, kv_block, tile, plan: _Plan):
  """Adds the tile `[batch, kv_heads, block_kv, d]` to key block `kv_block` of `buffer` `[batch,
  kv_blocks * block_kv, kv_heads, d]`, as an in-place dynamic update (not a scatter)."""
  start = kv_block * plan.block_kv
  current = jax.lax.dynamic_slice_in_dim(buffer, start, plan.block_kv, axis=1)
  return jax.lax.dynamic_update_slice_in_dim(buffer, current + _kv_untile(tile), start, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, bias, mask: Mask, plan: _Plan):
  return _forward(q, k, v, bias, mask, plan)[0]


def _attention_fwd(q, k, v, bias, mask: Mask, plan: _Plan):
  out, lse = _forward(q, k, v, bias, mask, plan)
  return out, (q, k, v, bias, mask, out, lse)


def _attention_bwd(plan: _Plan, residuals, d_out):
  """The custom VJP: `_backward`'s float32 gradients in the inputs' dtypes."""
  q, k, v, bias = residuals[:4]
  cast = lambda grad, like: None if like is None else grad.astype(like.dtype)
  dq, dk, dv, dbias = _backward(plan, residuals, d_out)
  return cast(dq, q), cast(dk, k), cast(dv, v), cast(dbias, bias), None


def tile_dv_ds(s_t, v_j, d_out_i, lse_i, delta_i, dv, kv_block, plan: _Plan):
  """The backward of one transposed tile up to the logits: adds `p^T d_out` to key block `kv_block`
  of `dv` and returns `(dv, ds_t)`, `ds_t` `[batch, kv_heads, block_kv, rows]` float32 the loss's
  gradient w.r.t. the tile's final logits `s_t` (-inf where hidden)."""
  p_t = jnp.exp(s_t - lse_i[..., None, :])
  matmul = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dv = _add_at(dv, kv_block, matmul("bhkr,bhrd->bhkd", p_t.astype(v_j.dtype), d_out_i), plan)
  dp_t = matmul("bhkd,bhrd->bhkr", v_j, d_out_i)
  return dv, p_t * (dp_t - delta_i[..., None, :])


def tile_dq_dk(ds_t, q_i, k_j, dq_t, dk, kv_block, plan: _Plan):
  """Adds one tile's query and key gradients from `ds_t` (the gradient w.r.t. the raw scaled logits):
  `dq_t` (transposed, `[batch, kv_heads, dim, rows]`) and key block `kv_block` of `dk`."""
  ds_t = ds_t.astype(q_i.dtype)
  matmul = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  dq_t = dq_t + matmul("bhdk,bhkr->bhdr", jnp.swapaxes(k_j, -1, -2), ds_t)
  return dq_t, _add_at(dk, kv_block, matmul("bhkr,bhrd->bhkd", ds_t, q_i), plan)


def _backward(plan: _Plan, residuals, d_out):
  """FlashAttention-2 backward: per query block, dq in the loop carry, dk/dv/dbias added in place.

  Returns float32 `(dq, dk, dv, dbias)`: `dq` in the tile layout, `dk`, `dv` like `k`, `v` (`dbias` None
  without a bias).

  Tiles are computed transposed, `[block_kv, rows]`: then each of the five products is a plain
  `[m, n] @ [n, p]` matmul (dq as `dq^T = k^T @ ds^T`), which XLA:CPU runs about 3x faster than a
  product contracting the leading dimension of an operand.
  """
  q, k, v, bias, mask, out, lse = residuals
  kv_heads = k.shape[2]
  # delta_r = sum_j p_rj dp_rj = <d_out_r, out_r>: the softmax backward's row term, computed once.
  delta = jnp.einsum("nbhrd,nbhrd->nbhr", d_out, out)
  d_out = d_out.astype(v.dtype)

  def query_block(carry, xs):
    q_block, q_i, d_out_i, lse_i, delta_i = xs

    def step(kv_block, inner):
      dq_t, dk, dv, dbias = inner
      k_j, v_j = _kv_tile(k, kv_block, plan), _kv_tile(v, kv_block, plan)
      s_t, capped = _logits(q_i, k_j, bias, mask, plan, q_block, kv_block, transposed=True)
      # d loss / d logits (after softcap, with bias)
      dv, ds_t = tile_dv_ds(s_t, v_j, d_out_i, lse_i, delta_i, dv, kv_block, plan)
      if bias is not None:
        q_start, kv_start = q_block * plan.block_q, kv_block * plan.block_kv
        tile = _unfold_heads(jnp.swapaxes(ds_t, -1, -2), bias.shape, kv_heads, plan.group)
        tile = tile + _bias_tile(dbias, q_start, plan.block_q, kv_start, plan.block_kv)
        dbias = jax.lax.dynamic_update_slice(
            dbias, tile, (0, 0, q_start if bias.shape[2] > 1 else 0,
                          kv_start if bias.shape[3] > 1 else 0))
      if capped is not None:
        ds_t = ds_t * (1.0 - capped * capped)
      dq_t, dk = tile_dq_dk(ds_t, q_i, k_j, dq_t, dk, kv_block, plan)
      return dq_t, dk, dv, dbias

    lo, hi = _kv_block_range(mask, plan, q_block)
    dq_t = jnp.zeros(jnp.swapaxes(q_i, -1, -2).shape) + zero
    dq_t, *carry = jax.lax.fori_loop(lo, hi, step, (dq_t, *carry))
    return tuple(carry), dq_t

  zero = _varying_zero(q, k, v, bias, mask, d_out, lse)
  zeros = lambda x: None if x is None else jnp.zeros(x.shape) + zero
  (dk, dv, dbias), dq_t = jax.lax.scan(
      query_block, (zeros(k), zeros(v), zeros(bias)),
      (jnp.arange(plan.q_blocks), q, d_out, lse, delta))
  return jnp.swapaxes(dq_t, -1, -2), dk, dv, dbias


_attention.defvjp(_attention_fwd, _attention_bwd)


IMPLEMENTATION = Implementation(
    name="blockwise",
    fn=attention,
    masks=frozenset({"causal", "window", "segment_ids", "lengths", "array"}),
    bias=True,
    softcap=True,
    dropout=False,
    weights=False,
    dtypes=frozenset({"float32", "bfloat16", "float16"}),
    platforms=frozenset({"cpu", "gpu", "tpu"}),
    memory="O(length)",
    notes="Pure-JAX FlashAttention-2 (online softmax, recomputing backward); skips invisible tiles. "
          "Runs flex_attention mods on its tiles.",
    mods=True,
)
