"""Putting checkpoint tensors into a flaxattn model, strictly: every parameter set, every tensor used."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.nn import TransformerConfig

# Config fields a caller may change when loading: they leave every parameter's shape and meaning alone.
OVERRIDABLE = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat", "dropout_rate",
               "attention_dropout_rate")


class Checkpoint:
  """A checkpoint's tensors by name that records which ones were taken.

  Args:
    tensors: name -> array, as stored in the file.
    source: the file or directory, for error messages.
    ignore: names that are not weights of the model (e.g. BERT's `position_ids` buffer), never reported
      as unused.
  """

  def __init__(self, tensors: dict[str, np.ndarray], source: str, ignore: Iterable[str] = ()):
    self._tensors, self.source = tensors, str(source)
    self._unused = set(tensors) - set(ignore)

  def take(self, name: str) -> np.ndarray:
    """The tensor `name`; raises `ValueError` naming the file if the checkpoint lacks it."""
    if name not in self._tensors:
      raise ValueError(f"checkpoint {self.source} has no weight {name!r} that the model needs")
    self._unused.discard(name)
    return self._tensors[name]

  def check_all_used(self) -> None:
    """Raises `ValueError` listing every tensor no parameter took (the model would silently differ)."""
    if self._unused:
      raise ValueError(
          f"checkpoint {self.source} has weights the flaxattn model does not use: {sorted(self._unused)}")


def override(config: TransformerConfig, overrides: dict, source: str) -> TransformerConfig:
  """`config` with `overrides` (fields from `OVERRIDABLE`) applied."""
  unknown = sorted(set(overrides) - set(OVERRIDABLE))
  if unknown:
    raise ValueError(f"cannot override {unknown} when loading {source}: the checkpoint fixes them; "
                     f"overridable: {list(OVERRIDABLE)}")
  return dataclasses.replace(config, **overrides)


def linear(weight: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
  """A PyTorch-layout linear weight `[out_features, in_features]` as a flaxattn `Dense` kernel
  `[*in_shape, *out_shape]` (e.g. `[embed, heads, head_dim]` for a query projection)."""
  return weight.T.reshape(*in_shape, *out_shape)


def stack_layers(prefix: str, layers: Sequence[dict[str, np.ndarray]], *,
                 scanned: bool) -> dict[str, np.ndarray]:
  """Per-layer parameters (block-relative names) under `prefix/layers`: `prefix/layers/{i}/name` for an
  unrolled stack, `prefix/layers/name` stacked on a leading `[layers]` axis for a scanned one."""
  if scanned:
    return {f"{prefix}/layers/{name}": np.stack([layer[name] for layer in layers])
            for name in layers[0]}
  return {f"{prefix}/layers/{index}/{name}": value
          for index, layer in enumerate(layers) for name, value in layer.items()}


def path_name(path: tuple) -> str:
  """`('layers', 0, 'mlp', 'up', 'kernel')` -> `'layers/0/mlp/up/kernel'`."""
  return "/".join(str(part) for part in path)


def assign(model: nnx.Module, params: dict[str, np.ndarray], *, source: str) -> nnx.Module:
  """Sets every `nnx.Param` of `model` from `params` (keyed by `path_name`), casting to its dtype.

  `model` may be abstract (from `nnx.eval_shape`): then no random initialisation is ever computed.
  Raises `ValueError` naming the parameters without a value, the values without a parameter, and the
  shape mismatches, all at once. Returns `model`, updated in place.
  """
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  expected = {path_name(path): variable for path, variable in flat}
  problems = []
  missing = sorted(set(expected) - set(params))
  if missing:
    problems.append(f"parameters without a checkpoint weight: {missing}")
  unexpected = sorted(set(params) - set(expected))
  if unexpected:
    problems.append(f"mapped weights for parameters the model lacks: {unexpected}")
  mismatched = [f"{name}: model {tuple(expected[name].shape)}, checkpoint {np.shape(params[name])}"
                for name in sorted(set(expected) & set(params))
                if tuple(expected[name].shape) != np.shape(params[name])]
  if mismatched:
    problems.append(f"shape mismatches: {mismatched}")
  if problems:
    raise ValueError(f"cannot load {source} into {type(model).__name__}: " + "; ".join(problems))
  nnx.update(model, nnx.from_flat_state(
      [(path, jnp.asarray(params[path_name(path)], dtype=variable.dtype)) for path, variable in flat]))
  return model


def build(model_class, config: TransformerConfig, params: dict[str, np.ndarray],
          checkpoint: Checkpoint) -> nnx.Module:
  """`model_class(config)` holding `params`, after checking that the mapping used every checkpoint
  tensor. The model is created abstract, so no random initialisation is computed."""
  checkpoint.check_all_used()
  model = nnx.eval_shape(lambda: model_class(config, rngs=nnx.Rngs(0)))
  return assign(model, params, source=checkpoint.source)
