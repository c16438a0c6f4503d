"""Running a fused kernel per device when attention is traced for a multi-device mesh.

XLA cannot partition a Pallas kernel: on TPU it refuses ("Mosaic kernels cannot be automatically
partitioned"), elsewhere it would gather every operand onto each device. Attention is independent
per batch element and per head, so `run_per_device` runs the kernel inside `jax.shard_map` over the
mesh's non-manual axes, each device on its own slice of the batch and the heads. Which slice:

* Explicit mesh axes carry the partition spec in the array type, and that is the layout used.
* Auto mesh axes (flaxattn's training mesh, `flaxattn.parallel.mesh`) give the types no spec, so
  the caller states the layout with `activation_layout(spec)` around the call: `flaxattn.nn`'s
  attention passes the spec its logical-axis rules give `[batch, length, heads, head_dim]`, the
  layout it constrains queries, keys and values to, so nothing moves on entry. Only the batch and
  heads entries are used (lengths stay whole: a length-sharded activation is gathered along its
  length, as a kernel needs the whole sequence; ring attention is the one that does not), each
  kept only where its mesh axes divide the sizes. Without a layout the kernel runs on gathered
  inputs: correct, but every device computes the whole batch.

Lengths and head_dim must not be sharded in an Explicit type (sharding the sequence needs ring
attention). cuDNN needs none of this: jax registers its fused attention with `custom_partitioning`,
so XLA itself splits it along batch and heads as the operands are laid out.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math

import jax
import jax.numpy as jnp

from flaxattn.attention.mask import Mask

P = jax.sharding.PartitionSpec

# The layout `activation_layout` sets: a `PartitionSpec` of `[batch, length, heads, head_dim]`.
_LAYOUT: contextvars.ContextVar[P | None] = contextvars.ContextVar("flaxattn_attention_layout",
                                                                   default=None)


@contextlib.contextmanager
def activation_layout(spec: P | None):
  """Within it, per-device kernels traced on Auto mesh axes split their inputs as `spec` says.

  Args:
    spec: the `PartitionSpec` of the `[batch, length, heads, head_dim]` activations (queries; keys
      and values are split along their heads alike), or None for no layout. Enter it inside the
      traced function (as `flaxattn.nn` does), so that a jit cache never holds a trace made
      under another layout.
  """
  token = _LAYOUT.set(spec)
  try:
    yield
  finally:
    _LAYOUT.reset(token)


def _spec4(x) -> tuple:
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (4 - len(spec))


def call_layout(query) -> tuple:
  """The layout of a call's `[batch, length, heads, head_dim]` activations, as 4 `PartitionSpec`
  entries: `activation_layout`'s when one is set, else the query's type on Explicit mesh axes, else
  all None."""
  stated = _LAYOUT.get()
  if stated is not None:
    return tuple(stated) + (None,) * (4 - len(stated))
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and jax.sharding.AxisType.Explicit in mesh.axis_types:
    return _spec4(query)
  return (None,) * 4


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one `PartitionSpec` entry (None, a name, or a tuple of names)."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def dividing_axes(mesh, entry, *sizes):
  """The leading mesh axes of spec `entry` (present in `mesh`, size > 1) whose product divides all
  `sizes`, as an entry."""
  chosen = []
  for axis in axes_of(entry):
    if axis not in mesh.shape:
      continue
    ways = math.prod(mesh.shape[name] for name in chosen) * mesh.shape[axis]
    if mesh.shape[axis] > 1 and all(size % ways == 0 for size in sizes):
      chosen.append(axis)
  return None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen)


def _explicit_specs(query, key, value, name: str) -> tuple:
  """`(batch_entry, heads_entry)` from the arrays' types (Explicit axes). Raises `ValueError`
  naming the array when one is sharded along length or head_dim, or when they differ along batch
  or heads."""
  specs = {}
  for array_name, x in (("query", query), ("key", key), ("value", value)):
    spec = _spec4(x)
    if spec[1] is not None or spec[3] is not None:
      raise ValueError(
          f"implementation={name!r} needs {array_name} unsharded along its length and head_dim "
          f"axes, got partition spec {spec}: shard batch and heads only (sequence sharding needs "
          f"ring attention)")
    specs[array_name] = spec
  batch_entries = {specs[n][0] for n in specs}
  head_entries = {specs[n][2] for n in specs}
  if len(batch_entries) > 1 or len(head_entries) > 1:
    raise ValueError(
        f"implementation={name!r} needs query, key and value sharded alike along batch and heads, "
        f"got {specs['query']}, {specs['key']}, {specs['value']}")
  return specs["query"][0], specs["query"][2]


def device_placement(query, key, value, *, name: str):
  """`(mesh, axes, batch_axes, head_axes)` when traced for several devices outside a shard_map.

  `batch_axes` / `head_axes` are the `PartitionSpec` entries that split batch and heads: from the
  arrays' types on Explicit mesh axes, from `activation_layout` on Auto ones (None, None without
  one). Returns None on one device, without a mesh, or inside a shard_map over every mesh axis.
  Raises `ValueError` as `_explicit_specs`.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free_axes = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
  if all(mesh.shape[axis] == 1 for axis in free_axes):
    return None
  kinds = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(kinds[axis] == jax.sharding.AxisType.Explicit for axis in free_axes):
    batch_axes, head_axes = _explicit_specs(query, key, value, name)
  else:
    layout = tuple(_LAYOUT.get() or ()) + (None,) * 4
    usable = lambda entry: tuple(axis for axis in axes_of(entry) if axis in free_axes)
    batch_axes = dividing_axes(mesh, usable(layout[0]), query.shape[0])
    head_axes = dividing_axes(mesh, usable(layout[2]), query.shape[2], key.shape[2])
  return mesh, free_axes, batch_axes, head_axes


def _broadcastable_spec(x, batch_axes, head_axes) -> P:
  """Spec of an array broadcastable to `[batch, heads, q_len, kv_len]` (bias, mask array)."""
  shape = (1,) * (4 - jnp.ndim(x)) + tuple(jnp.shape(x))
  entries = (batch_axes if shape[0] > 1 else None, head_axes if shape[1] > 1 else None, None, None)
  return P(*entries[4 - jnp.ndim(x):])


def run_per_device(fn, query, key, value, mask: Mask, bias, *, name: str):
  """`fn(query, key, value, mask, bias)`, inside `jax.shard_map` when a multi-device mesh needs it.

  Args:
    fn: attention on one device's arrays (or all of them); returns `[batch, q_len, heads, dim]`.
    query, key, value: `[batch, length, heads, dim]`, sharded at most along batch and heads.
    mask: a `Mask` (segment ids and lengths follow the batch; an explicit array, like `bias`,
      follows batch and heads where it is not broadcast).
    bias: broadcastable to `[batch, heads, q_len, kv_len]`, or None.
    name: the implementation, for error messages.
  """
  placement = device_placement(query, key, value, name=name)
  if placement is None:
    return fn(query, key, value, mask, bias)
  mesh, axes, batch_axes, head_axes = placement
  per_head = P(batch_axes, None, head_axes, None)
  by_batch = lambda x: None if x is None else P(batch_axes, *(None,) * (jnp.ndim(x) - 1))
  mask_specs = dataclasses.replace(
      mask, q_segment_ids=by_batch(mask.q_segment_ids), kv_segment_ids=by_batch(mask.kv_segment_ids),
      q_lengths=by_batch(mask.q_lengths), kv_lengths=by_batch(mask.kv_lengths),
      array=None if mask.array is None else _broadcastable_spec(mask.array, batch_axes, head_axes))
  bias_spec = None if bias is None else _broadcastable_spec(bias, batch_axes, head_axes)
  per_device = jax.shard_map(fn, mesh=mesh, in_specs=(per_head, per_head, per_head, mask_specs,
                                                      bias_spec),
                             out_specs=per_head, axis_names=axes, check_vma=False)
  return per_device(query, key, value, mask, bias)
