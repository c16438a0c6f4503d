"""Shardings of parameters, optimizer state and batches, and creating state directly sharded."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from flaxattn.nn.sharding import logical_spec
from flaxattn.parallel.rules import Rules


def _path_keys(path) -> tuple:
  return tuple(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
               for entry in path)


def _check_divisible(where: str, shape, spec: jax.sharding.PartitionSpec, mesh: jax.sharding.Mesh):
  for size, axes in zip(shape, spec):
    axes = (axes,) if isinstance(axes, str) else axes or ()
    ways = math.prod(mesh.shape[axis] for axis in axes)
    if size % ways:
      raise ValueError(
          f"{where} of shape {tuple(shape)} cannot be sharded as {spec} on mesh {dict(mesh.shape)}: "
          f"dimension {size} is not divisible by {ways}; change the model size, the mesh or "
          "config.sharding.overrides")


def param_shardings(abstract_params: nnx.State, mesh: jax.sharding.Mesh, rules: Rules):
  """`NamedSharding`s for `abstract_params` (`nnx.State` of `nnx.Param`s carrying logical axis names
  as `out_sharding` metadata), as a pure state tree (the structure of `nnx.as_pure(params)`)."""
  def sharding(path, variable):
    axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
    spec = logical_spec(axes, rules)
    _check_divisible("parameter " + "/".join(map(str, _path_keys(path))), variable.shape, spec, mesh)
    return jax.sharding.NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(sharding, abstract_params,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def like_params(tree, params, shardings, mesh: jax.sharding.Mesh):
  """Shardings for a tree of arrays mirroring the parameters (optimizer state): a leaf whose path
  ends with a parameter's path and whose shape equals that parameter's gets its sharding; anything
  else (step counts, Adafactor's factored statistics) is replicated."""
  by_path = {}
  for (path, param), (_, sharding) in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                          jax.tree_util.tree_flatten_with_path(shardings)[0]):
    by_path[_path_keys(path)] = (param.shape, sharding)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def sharding(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      shape, param_sharding = by_path.get(keys[start:], (None, None))
      if shape is not None:
        return param_sharding if tuple(shape) == tuple(leaf.shape) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(sharding, tree)


def create_sharded(init_fn: Callable[[], Any], shardings) -> Any:
  """`init_fn()` run under `jax.jit` with `out_shardings=shardings`: every array is created on its
  own devices, never whole on one."""
  return jax.jit(init_fn, out_shardings=shardings)()


def batch_shardings(batch_shapes: dict[str, tuple[int, ...]], mesh: jax.sharding.Mesh, rules: Rules):
  """`NamedSharding` per batch entry: dimension 0 is `batch`, dimension 1 (if any) `length`."""
  shardings = {}
  for name, shape in batch_shapes.items():
    axes = ("batch", "length", *([None] * (len(shape) - 2)))[:len(shape)]
    spec = logical_spec(axes, rules)
    _check_divisible(f"batch[{name!r}]", shape, spec, mesh)
    shardings[name] = jax.sharding.NamedSharding(mesh, spec)
  return shardings


def global_batch(local: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the batch (all of it with one process)."""
  return {name: jax.make_array_from_process_local_data(shardings[name], value)
          for name, value in local.items()}
