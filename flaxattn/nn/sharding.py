"""Logical axis names for parameters and activations, and the one activation-sharding helper.

Every parameter is created through `param`, which records its logical axis names (`embed`, `heads`,
`kv_heads`, `head_dim`, `mlp`, `vocab`, `layers`, ...) as the Variable's `out_sharding` metadata; read
them with `nnx.get_partition_spec(nnx.state(model))`, translated to mesh axes under
`nnx.logical_axis_rules(rules)` (flax keeps a name without a rule as a mesh axis name, so give every
name in `LOGICAL_AXES` a rule, `None` for replicated). Parameters are created unsharded (`eager_sharding=False`): a model can
be built with or without a mesh, and the training code places the state from that metadata.

Activations pass through `constrain(x, ("batch", "length", "embed"))`, which is a no-op unless both a
mesh (`jax.set_mesh`) and logical axis rules (`nnx.logical_axis_rules`) are active; there a name
without a rule is replicated.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd

# Every logical axis name used in flaxattn; sharding rules map these to mesh axes.
LOGICAL_AXES = ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers")


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Sequence[str | None],
          dtype) -> nnx.Param:
  """A `nnx.Param` of `shape` and `dtype` drawn from `init(key, shape, dtype)`, named by `axes`."""
  shape, axes = tuple(shape), tuple(axes)
  if len(shape) != len(axes):
    raise ValueError(f"axes {axes} must name every dimension of shape {shape}")
  _check_known("axes", axes)
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def _check_known(what: str, axes: tuple) -> None:
  unknown = [name for name in axes if name is not None and name not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"{what} {axes} name unknown logical axes {unknown}; known: {LOGICAL_AXES}")


def logical_spec(logical_axes: Sequence[str | None], rules=None) -> jax.sharding.PartitionSpec:
  """The mesh `PartitionSpec` that `rules` (default: the active logical axis rules) give `logical_axes`.

  `rules` is a sequence of `(logical_name, mesh_axes)` with `mesh_axes` a mesh axis name, a tuple of
  them, or None. A mesh axis already taken by an earlier dimension is left out of later ones: with
  FSDP both `batch` and `embed` map to `fsdp`, and an activation `[batch, length, embed]` is then
  sharded on its batch only (a `PartitionSpec` may not name a mesh axis twice).
  """
  rules = dict(spmd.get_logical_axis_rules() if rules is None else rules)
  used, spec = set(), []
  for name in logical_axes:
    mesh_axes = rules.get(name)
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    free = tuple(axis for axis in mesh_axes if axis not in used)
    used.update(free)
    spec.append(free[0] if len(free) == 1 else (free or None))
  return jax.sharding.PartitionSpec(*spec)


def active_spec(logical_axes: Sequence[str | None]) -> jax.sharding.PartitionSpec | None:
  """`logical_spec(logical_axes)` when a mesh and logical axis rules are active (the layout
  `constrain` gives), else None."""
  if not spmd.get_logical_axis_rules() or jax.sharding.get_abstract_mesh().empty:
    return None
  return logical_spec(logical_axes)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on activation `x` by logical names (each in `LOGICAL_AXES` or None); a no-op
  without a mesh and rules."""
  logical_axes = tuple(logical_axes)
  _check_known("logical_axes", logical_axes)
  if len(logical_axes) != jnp.ndim(x):
    raise ValueError(f"logical_axes {tuple(logical_axes)} must name every dimension of shape {x.shape}")
  spec = active_spec(logical_axes)
  if spec is None:
    return x
  # On Explicit mesh axes sharding is part of the type and with_sharding_constraint only asserts it.
  mesh = jax.sharding.get_abstract_mesh()
  if any(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types):
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)
