"""The device mesh: axes `data`, `fsdp`, `tensor`, `context`, sized by the config.

The axes are `AxisType.Auto`: the model code (`flaxattn.nn`) states shardings only through logical
names on parameters and `constrain` on activations, and leaves every matmul's output sharding to
the compiler. With Explicit axes each such op whose operands disagree (an FSDP-sharded kernel
against a batch-sharded activation) must name its output sharding or fails to trace, so Explicit
would need sharding code in every layer. Flax rejects meshes that mix axis types, so all four are
Auto.

On Auto axes the arrays' types carry no sharding, so the fused attention kernels, which run per
device inside a `shard_map` (`flaxattn.attention.placement`), are told the layout instead:
`flaxattn.nn` attention passes the spec its logical-axis rules give the queries, and each device
runs the kernel on its own batch and heads.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax

MESH_AXES = ("data", "fsdp", "tensor", "context")


def mesh_shape(sizes: Mapping[str, int], device_count: int) -> tuple[int, ...]:
  """Axis sizes in `MESH_AXES` order from `sizes` (missing axes are 1; one axis may be -1: all the
  devices the others leave). Raises ValueError unless the product is `device_count`."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh has unknown axes {unknown}; the axes are {list(MESH_AXES)}")
  shape = [sizes.get(axis, 1) for axis in MESH_AXES]
  for axis, size in zip(MESH_AXES, shape):
    if not isinstance(size, int) or isinstance(size, bool) or size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis} must be a positive int or -1, got {size!r}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh may have one axis of size -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(size for size in shape if size != -1)
  if -1 in shape and device_count % known == 0:
    shape[shape.index(-1)] = device_count // known
  if math.prod(shape) != device_count:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, (sizes.get(axis, 1) for axis in MESH_AXES)))} needs "
        f"{'a multiple of ' if -1 in shape else ''}{known} devices, but there are {device_count}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
              ) -> jax.sharding.Mesh:
  """A mesh with axes `MESH_AXES` over `devices` (default: all), shaped by `sizes` (see
  `mesh_shape`)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(mesh_shape(sizes, len(devices)), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)
