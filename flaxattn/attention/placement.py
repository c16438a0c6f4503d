"""Running a fused kernel per device when attention is traced for a multi-device mesh.

XLA cannot partition a Pallas kernel: on TPU it refuses ("Mosaic kernels cannot be automatically
partitioned"), elsewhere it would gather every operand onto each device. Attention is independent
per batch element and per head, so `run_per_device` runs the kernel inside `jax.shard_map` over the
mesh's non-manual axes, split along batch and heads as the inputs are sharded. Explicit mesh axes
carry their partition spec in the array type; Auto axes give none, and the inputs are then gathered
(correct, but slower: use Explicit axes, as flaxattn's training does). Lengths and head_dim must not
be sharded (sharding the sequence needs ring attention).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flaxattn.attention.mask import Mask

P = jax.sharding.PartitionSpec


def _spec4(x) -> tuple:
  spec = tuple(jax.typeof(x).sharding.spec)
  return spec + (None,) * (4 - len(spec))


def device_placement(query, key, value, *, name: str):
  """`(mesh, axes, batch_axes, head_axes)` when traced for several devices outside a shard_map.

  Returns None on one device, without a mesh, or inside a shard_map over every mesh axis. Raises
  `ValueError` naming the array when it is sharded along length or head_dim, or when query, key and
  value are sharded differently along batch or heads.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  free_axes = frozenset(mesh.axis_names) - frozenset(mesh.manual_axes)
  if all(mesh.shape[axis] == 1 for axis in free_axes):
    return None
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
  return mesh, free_axes, specs["query"][0], specs["query"][2]


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
