"""Hook points: where `flaxattn.interpret` reads or replaces the activations of a module.

`hook(module, name, value)` marks a point where `flaxattn.interpret` may read or replace
an activation (`run_with_cache`, `run_with_interventions`). It returns `value` untouched unless the
module carries a `HookPoints` naming that point: a static attribute that `flaxattn.interpret` sets
on a copy of the model, so a model without it traces exactly what it did before. The stacks tell the
points of a block which layer runs (`hook_layer`: a Python int unrolled, the traced index scanned).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

# The function `flaxattn.interpret` handles marked points with, `(module, name, value, layer) ->
# value`, and the layer the running block has (None outside a block): set only while it traces.
HOOK_HANDLER: contextvars.ContextVar[Callable | None] = contextvars.ContextVar(
    "flaxattn_hook_handler", default=None)
_HOOK_LAYER: contextvars.ContextVar[Any] = contextvars.ContextVar("flaxattn_hook_layer", default=None)


@dataclasses.dataclass(frozen=True)
class HookPoints:
  """The static mark of a module's hook points: `prefix` of their canonical names (with a
  `{layer}` field in blocks, e.g. 'decoder.blocks.{layer}.cross_attn') and the local `names` that
  are handled."""

  prefix: str
  names: frozenset[str]


def hooked(module: nnx.Module, name: str) -> bool:
  """Whether `module`'s hook point `name` is marked (static)."""
  points = getattr(module, "hook_points", None)
  return points is not None and name in points.names


def hook(module: nnx.Module, name: str, value: Any) -> Any:
  """Hook point `name` of `module`: `value`, or what `flaxattn.interpret` makes of it when marked."""
  if not hooked(module, name):
    return value
  return HOOK_HANDLER.get()(module, name, value, _HOOK_LAYER.get())


@contextlib.contextmanager
def hook_layer(index):
  """The blocks' hook points inside see `index` (int, or a traced int32 scalar) as their layer."""
  token = _HOOK_LAYER.set(index)
  try:
    yield
  finally:
    _HOOK_LAYER.reset(token)


def hook_pattern(module: nnx.Module, result: jnp.ndarray, weights: Any, value: jnp.ndarray):
  """The 'pattern' hook point of an attention call: `(result, weights)` unchanged, or, when the hook
  changed the weights `[batch, heads, q_len, kv_len]`, those and the result recomputed from them
  and `value` `[batch, kv_len, kv_heads, value_dim]` (`[batch, q_len, heads, value_dim]`)."""
  if weights is None or not hooked(module, "pattern"):
    return result, weights
  new = hook(module, "pattern", weights)
  if new is weights:
    return result, weights
  groups = new.shape[1] // value.shape[2]
  grouped = new.reshape(new.shape[0], value.shape[2], groups, *new.shape[2:])
  attended = jnp.einsum("bhgqk,bkhd->bqhgd", grouped, value.astype(new.dtype))
  return attended.reshape(result.shape).astype(result.dtype), new
