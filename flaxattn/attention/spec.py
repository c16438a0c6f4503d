"""What an attention implementation declares it supports, and the check of a call against it."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax.numpy as jnp
import numpy as np


def is_number(x) -> bool:
  """A Python/NumPy int or float (bool is an int subclass and np.isscalar accepts strings: neither
  is a meaningful scale or softcap)."""
  return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_operands(query, key, value) -> None:
  """The checks every attention entry point makes of `query` `[batch, q_len, heads, head_dim]`,
  `key` `[batch, kv_len, kv_heads, head_dim]` and `value` `[batch, kv_len, kv_heads, value_dim]`
  (`dot_product_attention`, `flex_attention`, the probes): one clear line naming the bad one."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if np.ndim(x) != 4:
      raise ValueError(
          f"{name} must have rank 4 [batch, length, heads, dim], got shape {tuple(np.shape(x))}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be floating point, got dtype {x.dtype}")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(
        f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
  batch, _, heads, head_dim = query.shape
  kv_batch, kv_len, kv_heads, key_dim = key.shape
  if kv_batch != batch or value.shape[0] != batch:
    raise ValueError(f"batch sizes differ: query {query.shape}, key {key.shape}, value {value.shape}")
  if key_dim != head_dim:
    raise ValueError(f"query and key head_dim differ: query {query.shape}, key {key.shape}")
  if value.shape[1:3] != (kv_len, kv_heads):
    raise ValueError(
        f"key and value must share [kv_len, kv_heads]: key {key.shape}, value {value.shape}")
  if heads % kv_heads:
    raise ValueError(
        f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}): "
        f"query {query.shape}, key {key.shape}")


@dataclasses.dataclass(frozen=True)
class Call:
  """The features one attention call needs (built by the dispatcher from its arguments).

  The static shape fields (0 when unknown) let an implementation with shape limits (cuDNN's head_dim,
  a kernel's aligned diagonal) decline a call in `Implementation.constraints`.
  """

  masks: frozenset[str]
  bias: bool
  softcap: bool
  dropout: bool
  weights: bool
  dtype: str
  platform: str
  # User score_mod/mask_mod (`flex_attention`'s mods, or a `block_mask`) given to the call.
  mods: bool = False
  q_len: int = 0
  kv_len: int = 0
  heads: int = 0
  kv_heads: int = 0
  head_dim: int = 0
  value_dim: int = 0
  # Axis names of the mesh set with `jax.set_mesh` around the call (empty without one).
  mesh_axes: frozenset[str] = frozenset()
  # The mesh axes the call's layout (`placement.call_layout`) splits the length over.
  sequence_axes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One attention implementation: its function and the features it supports.

  `fn(query, key, value, *, mask, bias, scale, softcap, dropout_rate, dropout_rng, return_weights)`
  receives validated arguments: `mask` a `Mask` or None, `bias` rank 4 or None, `scale` a float;
  one that declares `mods` also gets `mods=` (a `flex.FlexMods`) when the call has mods.

  `sequence_sharded`: the implementation spreads the sequence over the one mesh axis that the
  call's layout (`flaxattn.attention.activation_layout`, set by `flaxattn.nn` from the logical rule
  of 'length'; or the query's type on Explicit axes) gives the length, and runs only where the
  current mesh (`jax.set_mesh`) has that axis. `equal_lengths`: it needs `q_len == kv_len`.
  """

  name: str
  fn: Callable
  masks: frozenset[str]
  bias: bool
  softcap: bool
  dropout: bool
  weights: bool
  dtypes: frozenset[str]
  platforms: frozenset[str]
  memory: str
  notes: str = ""
  # Extra, implementation-specific limits checked after the declared features: `constraints(call)`
  # returns the unsupported feature in words, or None. Also where an optional dependency is missing.
  constraints: Callable[[Call], str | None] | None = None
  sequence_sharded: bool = False
  equal_lengths: bool = False
  # Runs `flex_attention`'s score_mod/mask_mod: `fn` then also takes `mods=` (a `flex.Mods`).
  mods: bool = False

  def unsupported(self, call: Call) -> str | None:
    """The first feature of `call` this implementation lacks, in words; None if it can run it."""
    if call.platform not in self.platforms:
      return f"platform {call.platform!r} (runs on {sorted(self.platforms)})"
    if call.dtype not in self.dtypes:
      return f"dtype {call.dtype} (supports {sorted(self.dtypes)})"
    missing = sorted(call.masks - self.masks)
    if missing:
      return f"mask kind {missing[0]!r} (supports {sorted(self.masks)})"
    for feature in ("bias", "softcap", "dropout", "weights"):
      if getattr(call, feature) and not getattr(self, feature):
        return {"weights": "return_weights=True"}.get(feature, feature)
    if call.mods and not self.mods:
      return "score_mod/mask_mod/block_mask (flex_attention mods: use blockwise or reference)"
    if self.equal_lengths and call.q_len != call.kv_len:
      return f"q_len != kv_len ({call.q_len} vs {call.kv_len}; it needs equal lengths)"
    if self.sequence_sharded:
      if len(call.sequence_axes) != 1:
        return (f"a layout that splits the length over {list(call.sequence_axes)} (it needs one "
                "mesh axis: set it with activation_layout(P(batch, AXIS, heads, None)) or the "
                "'length' logical rule)")
      if call.sequence_axes[0] not in call.mesh_axes:
        return (f"a call outside a mesh with axis {call.sequence_axes[0]!r} (set one with "
                f"jax.set_mesh; the current mesh axes are {sorted(call.mesh_axes)})")
    if self.constraints is not None:
      return self.constraints(call)
    return None

  def describe(self) -> dict:
    """A plain dict of what this implementation supports (for `describe_implementations()`)."""
    return {
        "name": self.name,
        "masks": sorted(self.masks),
        "bias": self.bias,
        "softcap": self.softcap,
        "dropout": self.dropout,
        "weights": self.weights,
        "dtypes": sorted(self.dtypes),
        "platforms": sorted(self.platforms),
        "memory": self.memory,
        "notes": self.notes,
        "sequence_sharded": self.sequence_sharded,
        "equal_lengths": self.equal_lengths,
        "mods": self.mods,
    }
