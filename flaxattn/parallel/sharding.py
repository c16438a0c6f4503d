"""Shardings of parameters, optimizer state and batches, and creating state directly sharded."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from flaxattn.nn.sharding import logical_spec
from flaxattn.parallel.rules import Rules


def path_keys(path) -> tuple:
  """The plain keys of a `jax.tree_util` key path (dict keys, sequence indices, attribute names):
  `(DictKey('a'), SequenceKey(0))` -> `('a', 0)`."""
  return tuple(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry)))
               for entry in path)


def path_name(path) -> str:
  """A key path as one string, `'a/0/b'`: how checkpoints, restores and errors name a leaf."""
  return "/".join(map(str, path_keys(path)))


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
    _check_divisible("parameter " + path_name(path), variable.shape, spec, mesh)
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
    by_path[path_keys(path)] = (param.shape, sharding)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def sharding(path, leaf):
    keys = path_keys(path)
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


def row_block(sharding: jax.sharding.NamedSharding, devices=None) -> tuple[int, int]:
  """`(index, count)`: `devices` (default: this process's) hold block `index` of the `count` equal,
  contiguous blocks of rows of any batch placed with `sharding` (dimension 0 is the batch).

  Processes whose devices hold the same rows (a `tensor` or `context` axis spanning processes, or
  a batch not sharded at all) get the same block and must be fed the same data; with one process
  it is `(0, 1)`. Raises ValueError when `devices` hold rows that are not one such block (a mesh
  whose device order splits a process's rows)."""
  mesh = sharding.mesh
  axes = sharding.spec[0] if len(sharding.spec) else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  ways = math.prod(mesh.shape[axis] for axis in axes)
  shard_of = {device: range(ways)[index] for device, (index,) in jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(axes or None)).devices_indices_map((ways,)).items()}

  def block(group, name):
    shards = sorted({shard for device in group for shard in shard_of[device]})
    size = len(shards)
    if shards != list(range(shards[0], shards[0] + size)) or ways % size or shards[0] % size:
      raise ValueError(
          f"{name} batch shards {shards} of {ways} on mesh {dict(mesh.shape)}, not one "
          "contiguous block of an equal split; order the devices so that each process's hold "
          "adjacent batch shards")
    return shards[0] // size, ways // size

  if devices is not None:
    return block(devices, "the devices hold")
  processes = {}
  for device in shard_of:
    processes.setdefault(device.process_index, []).append(device)
  blocks = {process: block(group, f"process {process} holds")
            for process, group in processes.items()}
  if len({count for _, count in blocks.values()}) > 1:
    raise ValueError(f"the processes hold unequal shares of the batch on mesh {dict(mesh.shape)}: "
                     f"(block, of blocks) per process {blocks}")
  return blocks[jax.process_index()]


def local_rows(sharding: jax.sharding.NamedSharding, batch_size: int) -> slice:
  """The rows of a global batch of `batch_size` rows that this process feeds (see `row_block`)."""
  index, count = row_block(sharding)
  if batch_size % count:
    raise ValueError(f"a batch of {batch_size} rows cannot be split into the {count} per-process "
                     f"blocks of mesh {dict(sharding.mesh.shape)}; make it a multiple of {count}")
  size = batch_size // count
  return slice(index * size, (index + 1) * size)


def global_batch(local: dict[str, np.ndarray], shardings) -> dict[str, jax.Array]:
  """Global arrays from this process's rows of the batch (`local_rows`; all of it with one
  process). Processes holding the same rows must pass the same values."""
  def make(name, value):
    _, count = row_block(shardings[name])
    return jax.make_array_from_process_local_data(
        shardings[name], value, (value.shape[0] * count,) + value.shape[1:])
  return {name: make(name, value) for name, value in local.items()}


def replicated(value, mesh: jax.sharding.Mesh) -> jax.Array:
  """`value` (host data, the same on every process) as an array replicated on every device of
  `mesh`: an input that jitted programs over global arrays accept on any number of processes."""
  value = np.asarray(value)
  return jax.make_array_from_process_local_data(
      jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), value, value.shape)


def to_host(tree, mesh: jax.sharding.Mesh):
  """NumPy copies of every array of `tree` (global arrays on `mesh`, sharded or not) on every
  process. A collective: every process must call it with the same tree."""
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  gathered = jax.jit(lambda tree: tree, out_shardings=whole)(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), gathered)
