"""Ring attention: exact attention with the sequence sharded over one mesh axis (the ring).

The caller names the axes: the ring is the mesh axis the call's layout gives the length
(`flaxattn.attention.activation_layout(P(batch, RING, heads, None))`, which `flaxattn.nn` sets from
its logical rules, 'length' -> `context` in the `context` preset; or the query's type on Explicit
axes), and the batch and heads are split as that layout says.

Each of the `C` devices of the ring holds `length / C` queries, keys and values. The key/value
blocks travel around the ring (`lax.ppermute` to the next device, `C - 1` hops); each device attends its
queries to every block as it passes, with the blockwise kernel (`blockwise.forward_with_lse`), and
merges the partial results by their log-sum-exp (an online softmax over blocks). A device holds two
key/value blocks at a time (the one it attends to and the one arriving); nothing is all-gathered.

Backward (a `jax.custom_vjp`, not autodiff through the forward loop). Only the output and the per-row
log-sum-exp are saved. The key/value blocks travel the ring again, now with their `dk`/`dv`
accumulators: each device adds its queries' share (`blockwise.backward_from_lse`, which recomputes
the tile weights from the saved log-sum-exp) and passes block and accumulators on; one last hop brings
each accumulator home. `dq` stays on its device. Accumulators are float32 whatever the input dtype
(so bfloat16 gradients are rounded once, at the end, at the cost of float32 traffic).

Overlap. Each step sends the held block on before attending to it, so the transfer can run during the
step's compute; the price is one more hop than strictly needed (the last block received is not used).

Causal load balance (zig-zag). With the sequence cut into `2C` chunks, device `i` holds chunks `i`
and `2C - 1 - i`. Against the block of device `j`, device `i` then computes exactly half of its
pairs whatever `j` is: for `j < i` all its queries against the first chunk of `j`, for `j > i` its
second chunk against both of `j`'s, and on the diagonal a causal block; every fully masked chunk
pair is skipped. Inside a device the zig-zag order is increasing in position, so the diagonal block's
causal mask is the plain causal mask of its local indices. Callers see natural order: the reorder
(two `ppermute`s for each of query, key, value and segment ids) is applied inside and undone on the
output (and autodiff runs them in reverse for the gradients). That costs about one extra ring hop of
traffic each way; a model that kept its tokens in zig-zag order throughout could save it.

Sharding. The function runs under `jax.shard_map` over the mesh set with `jax.set_mesh` (its
`jax.sharding.get_abstract_mesh()`): length over the ring; batch and heads over the layout's axes
where they divide the sizes (the layout is the one the model constrains its activations to, so
nothing moves on entry). Other axes see the same work repeated. On Explicit mesh axes the arguments
are resharded to that layout first.

Supported: causal and segment-id masks (packing; padding as its own segment id), GQA/MQA, softcap,
float32/bfloat16/float16. Not supported (the dispatcher says so): `q_len != kv_len`, bias, window,
lengths and explicit-array masks, dropout, returning weights. The length must be divisible by `C`
(`2C` when causal).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from flaxattn.attention import blockwise
from flaxattn.attention.mask import Mask
from flaxattn.attention.placement import axes_of, call_layout, dividing_axes
from flaxattn.attention.spec import Implementation


@dataclasses.dataclass(frozen=True)
class _Ring:
  """Static facts about one ring call."""

  axis_name: str
  size: int
  causal: bool
  scale: float
  softcap: float | None
  block_q: int | None
  block_kv: int | None


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool, block_q: int | None = None,
              block_kv: int | None = None):
  """Exact attention with the sequence split over the layout's length axis, forward and backward.

  Call it inside `jax.set_mesh(mesh)` (under `jit` or not), with the layout stated
  (`activation_layout`, or the query's type on Explicit axes); the arrays are global, in natural
  order.

  Args:
    query: `[batch, length, heads, head_dim]`, float32/bfloat16/float16.
    key: `[batch, length, kv_heads, head_dim]`, same dtype; `heads % kv_heads == 0`.
    value: `[batch, length, kv_heads, value_dim]`, same dtype.
    mask: None or a `Mask` with only `causal` and segment ids.
    scale, softcap: as `flaxattn.attention.dot_product_attention`.
    bias, dropout_rate, dropout_rng, return_weights: unsupported (declared so); the dispatcher never
      sets them.
    block_q, block_kv: tile sizes of the per-device blockwise kernel (default: its own).

  Returns:
    `[batch, length, heads, value_dim]` in the query dtype, sharded like the query.

  Raises:
    ValueError: no mesh with the ring axis, `q_len != kv_len`, a length not divisible by the ring's
      chunks, or a mask part other than causal and segment ids.
  """
  del bias, dropout_rate, dropout_rng, return_weights  # Unsupported: the dispatcher rejects them first.
  batch, length, heads, _ = query.shape
  kv_heads = key.shape[2]
  if key.shape[1] != length:
    raise ValueError(f"ring attention needs q_len == kv_len, got query {query.shape}, key {key.shape}")
  if mask is not None and not mask.kinds <= {"causal", "segment_ids"}:
    raise ValueError(f"ring attention supports causal and segment-id masks, got mask kinds "
                     f"{sorted(mask.kinds)}")
  mesh = jax.sharding.get_abstract_mesh()
  batch_entry, length_entry, heads_entry, _ = call_layout(query)
  length_axes = axes_of(length_entry)
  axis_name = length_axes[0] if len(length_axes) == 1 else None
  if mesh.empty or axis_name not in mesh.axis_names:
    raise ValueError(f"ring attention needs the length split over one axis of the mesh set with "
                     f"jax.set_mesh, got layout axes {list(length_axes)} and mesh axes "
                     f"{list(mesh.axis_names)}")
  causal = mask is not None and mask.causal
  ring = _Ring(axis_name=axis_name, size=mesh.shape[axis_name], causal=causal, scale=float(scale),
               softcap=None if softcap is None else float(softcap), block_q=block_q,
               block_kv=block_kv)
  chunks = 2 * ring.size if causal else ring.size
  if length % chunks:
    reason = f"2 x {ring.size} zig-zag chunks (causal)" if causal else f"{ring.size} devices"
    raise ValueError(f"ring attention over mesh axis {axis_name!r} of size {ring.size} needs a length "
                     f"divisible by {chunks} ({reason}), got length {length}")

  batch_axes = dividing_axes(mesh, batch_entry, batch)
  head_axes = dividing_axes(mesh, heads_entry, heads, kv_heads)
  spec = jax.sharding.PartitionSpec(batch_axes, axis_name, head_axes, None)
  segments = ()
  if mask is not None and mask.q_segment_ids is not None:
    segments = (jnp.asarray(mask.q_segment_ids, jnp.int32), jnp.asarray(mask.kv_segment_ids, jnp.int32))
  segment_spec = jax.sharding.PartitionSpec(batch_axes, axis_name)

  def local(query, key, value, *segments):
    q_seg, kv_seg = segments or (None, None)
    if causal:
      query, key, value, q_seg, kv_seg = (
          None if x is None else _to_zigzag(x, ring) for x in (query, key, value, q_seg, kv_seg))
    out = _ring_attention(query, key, value, q_seg, kv_seg, ring)
    return _from_zigzag(out, ring) if causal else out

  in_specs = (spec,) * 3 + (segment_spec,) * len(segments)
  arguments = (query, key, value, *segments)
  if jax.sharding.AxisType.Explicit in mesh.axis_types:
    # Explicit axes make the sharding part of the type: shard_map takes arguments laid out as
    # in_specs say, so lay them out so (a no-op when they already are).
    arguments = tuple(jax.sharding.reshard(x, s) for x, s in zip(arguments, in_specs))
  return jax.shard_map(local, in_specs=in_specs, out_specs=spec)(*arguments)


# ------------------------------------------------------------------------------------------------
# Zig-zag order: chunk c of 2C (natural order: device c // 2) moves to device c if c < C, else to
# device 2C - 1 - c. Each device's first-half chunks move by one permutation and its second-half
# chunks by another.


def _zigzag_permutations(size: int):
  first = [(d, 2 * d if 2 * d < size else 2 * size - 1 - 2 * d) for d in range(size)]
  second = [(d, 2 * d + 1 if 2 * d + 1 < size else 2 * size - 2 - 2 * d) for d in range(size)]
  return first, second


def _to_zigzag(x, ring: _Ring):
  """A device's `[batch, local_len, ...]` shard in natural order -> its zig-zag chunks `i, 2C-1-i`."""
  if ring.size == 1:
    return x
  half = x.shape[1] // 2
  first, second = _zigzag_permutations(ring.size)
  via_first = jax.lax.ppermute(x[:, :half], ring.axis_name, first)
  via_second = jax.lax.ppermute(x[:, half:], ring.axis_name, second)
  # Chunks with even index land on even devices: there the first permutation brought chunk i, and
  # on odd devices it brought chunk 2C - 1 - i.
  even = jax.lax.axis_index(ring.axis_name) % 2 == 0
  return jnp.concatenate([jnp.where(even, via_first, via_second),
                          jnp.where(even, via_second, via_first)], axis=1)


def _from_zigzag(x, ring: _Ring):
  """Inverse of `_to_zigzag`."""
  if ring.size == 1:
    return x
  half = x.shape[1] // 2
  first, second = _zigzag_permutations(ring.size)
  inverse = lambda permutation: [(target, source) for source, target in permutation]
  even = jax.lax.axis_index(ring.axis_name) % 2 == 0
  own, mirrored = x[:, :half], x[:, half:]
  back_first = jax.lax.ppermute(jnp.where(even, own, mirrored), ring.axis_name, inverse(first))
  back_second = jax.lax.ppermute(jnp.where(even, mirrored, own), ring.axis_name, inverse(second))
  return jnp.concatenate([back_first, back_second], axis=1)


# ------------------------------------------------------------------------------------------------
# The ring, on one device's shards (zig-zag order when causal).


def _pass_on(tree, ring: _Ring):
  """Sends every array of `tree` to the next device of the ring and returns what the previous sent."""
  hop = [(d, (d + 1) % ring.size) for d in range(ring.size)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, ring.axis_name, hop), tree)


def _segment_mask(q_seg, kv_seg, *, causal: bool = False) -> Mask | None:
  if q_seg is None:
    return Mask(causal=True) if causal else None
  return Mask(causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg)


def _front_pad(x, rows: int, value=0.0):
  """Prepends `rows` positions of `value` along axis 1."""
  return jnp.pad(x, [(0, 0), (rows, 0)] + [(0, 0)] * (x.ndim - 2), constant_values=value)


def _diagonal_blocks(ring: _Ring, half: int) -> dict[str, int]:
  """Tile sizes for a device's own block under a causal mask: at most one zig-zag chunk (`half`
  positions) each way, so that the fully masked chunk pair (first chunk's queries, second chunk's
  keys) is made of whole tiles, which the blockwise kernel skips."""
  default_q, default_kv = blockwise.DEFAULT_BLOCKS.get(jax.default_backend(),
                                                      blockwise.DEFAULT_BLOCKS["cpu"])
  return dict(block_q=min(ring.block_q or default_q, half),
              block_kv=min(ring.block_kv or default_kv, half))


def _visit_forward(ring: _Ring, q, q_seg, held, step, index):
  """This device's queries against the held key/value block (from device `index - step`).

  Returns `(out, lse)` over the local rows as `blockwise.forward_with_lse` (lse `+inf` for rows that
  see none of these keys). `step` 0 is the device's own block; later steps are traced.
  """
  k, v, kv_seg = held
  forward = functools.partial(blockwise.forward_with_lse, scale=ring.scale, softcap=ring.softcap,
                              block_q=ring.block_q, block_kv=ring.block_kv)
  if not ring.causal:
    return forward(q, k, v, mask=_segment_mask(q_seg, kv_seg))
  half = q.shape[1] // 2
  if isinstance(step, int) and step == 0:
    return forward(q, k, v, mask=_segment_mask(q_seg, kv_seg, causal=True),
                   **_diagonal_blocks(ring, half))

  def from_earlier_device():  # Its first chunk precedes both of ours; its second follows both.
    return forward(q, k[:, :half], v[:, :half],
                   mask=_segment_mask(q_seg, None if kv_seg is None else kv_seg[:, :half]))

  def from_later_device():  # Both its chunks precede our second chunk and follow our first.
    out, lse = forward(q[:, half:], k, v,
                       mask=_segment_mask(None if q_seg is None else q_seg[:, half:], kv_seg))
    return _front_pad(out, half), _front_pad(lse, half, jnp.inf)

  return jax.lax.cond(index >= step, from_earlier_device, from_later_device)


def _visit_backward(ring: _Ring, q, q_seg, out, lse, d_out, held, step, index):
  """This device's share of `(dq, dk, dv)` (float32) for the held block; see `_visit_forward`."""
  k, v, kv_seg = held
  backward = functools.partial(blockwise.backward_from_lse, scale=ring.scale, softcap=ring.softcap,
                               block_q=ring.block_q, block_kv=ring.block_kv)
  if not ring.causal:
    return backward(q, k, v, out, lse, d_out, mask=_segment_mask(q_seg, kv_seg))
  half = q.shape[1] // 2
  if isinstance(step, int) and step == 0:
    return backward(q, k, v, out, lse, d_out, mask=_segment_mask(q_seg, kv_seg, causal=True),
                    **_diagonal_blocks(ring, half))
  back_pad = lambda x: jnp.pad(x, [(0, 0), (0, half), (0, 0), (0, 0)])

  def from_earlier_device():
    dq, dk, dv = backward(q, k[:, :half], v[:, :half], out, lse, d_out,
                          mask=_segment_mask(q_seg, None if kv_seg is None else kv_seg[:, :half]))
    return dq, back_pad(dk), back_pad(dv)

  def from_later_device():
    second = lambda x: None if x is None else x[:, half:]
    dq, dk, dv = backward(second(q), k, v, second(out), second(lse), second(d_out),
                          mask=_segment_mask(second(q_seg), kv_seg))
    return _front_pad(dq, half), dk, dv

  return jax.lax.cond(index >= step, from_earlier_device, from_later_device)


def _merge(out, lse, out_part, lse_part):
  """Online-softmax merge of two partial results over disjoint keys (lse `+inf` = no key seen)."""
  no_key = lambda x: jnp.where(x == jnp.inf, -jnp.inf, x)
  lse, lse_part = no_key(lse), no_key(lse_part)
  total = jnp.logaddexp(lse, lse_part)
  seen = total > -jnp.inf
  shift = jnp.where(seen, total, 0.0)  # Rows that saw nothing keep weights exp(-inf) = 0, not NaN.
  out = out * jnp.exp(lse - shift)[..., None] + out_part * jnp.exp(lse_part - shift)[..., None]
  return out, jnp.where(seen, total, jnp.inf)


def _ring_forward(q, k, v, q_seg, kv_seg, ring: _Ring):
  """Output `[batch, local_len, heads, value_dim]` and log-sum-exp `[batch, local_len, heads]`,
  float32, over all the ring's keys."""
  index = jax.lax.axis_index(ring.axis_name)
  held = (k, v, kv_seg)
  if ring.size == 1:
    return _visit_forward(ring, q, q_seg, held, 0, index)
  arriving = _pass_on(held, ring)  # Sent before the local block's compute, to overlap with it.
  out, lse = _visit_forward(ring, q, q_seg, held, 0, index)

  def step(carry, step_index):
    held, out, lse = carry
    arriving = _pass_on(held, ring)
    out_part, lse_part = _visit_forward(ring, q, q_seg, held, step_index, index)
    return (arriving, *_merge(out, lse, out_part, lse_part)), None

  (_, out, lse), _ = jax.lax.scan(step, (arriving, out, lse), jnp.arange(1, ring.size))
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ring_attention(q, k, v, q_seg, kv_seg, ring: _Ring):
  return _ring_forward(q, k, v, q_seg, kv_seg, ring)[0].astype(q.dtype)


def _ring_attention_fwd(q, k, v, q_seg, kv_seg, ring: _Ring):
  out, lse = _ring_forward(q, k, v, q_seg, kv_seg, ring)
  return out.astype(q.dtype), (q, k, v, q_seg, kv_seg, out, lse)


def _ring_attention_bwd(ring: _Ring, residuals, d_out):
  q, k, v, q_seg, kv_seg, out, lse = residuals
  index = jax.lax.axis_index(ring.axis_name)
  held = (k, v, kv_seg)
  visit = functools.partial(_visit_backward, ring, q, q_seg, out, lse, d_out)
  if ring.size == 1:
    dq, dk, dv = visit(held, 0, index)
  else:
    arriving = _pass_on(held, ring)
    dq, dk, dv = visit(held, 0, index)
    # The key gradients travel with their block; after the last step one more hop brings them home.
    grads_arriving = _pass_on((dk, dv), ring)

    def step(carry, step_index):
      held, (dk, dv), dq = carry
      arriving = _pass_on(held, ring)
      dq_part, dk_part, dv_part = visit(held, step_index, index)
      return (arriving, _pass_on((dk + dk_part, dv + dv_part), ring), dq + dq_part), None

    (_, (dk, dv), dq), _ = jax.lax.scan(step, (arriving, grads_arriving, dq),
                                        jnp.arange(1, ring.size))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring_attention.defvjp(_ring_attention_fwd, _ring_attention_bwd)


IMPLEMENTATION = Implementation(
    name="ring",
    fn=attention,
    masks=frozenset({"causal", "segment_ids"}),
    bias=False,
    softcap=True,
    dropout=False,
    weights=False,
    dtypes=frozenset({"float32", "bfloat16", "float16"}),
    platforms=frozenset({"cpu", "gpu", "tpu"}),
    memory="O(length / ring size) per device",
    notes="Sequence split over the mesh axis the layout gives the length ('context' in flaxattn's "
          "'context' preset); key/value blocks passed around the ring "
          "(zig-zag balanced when causal). Never picked automatically: ask for it by name.",
    sequence_sharded=True,
    equal_lengths=True,
)
