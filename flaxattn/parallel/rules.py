"""Logical-axis rules: the one place that maps the modules' logical names to mesh axes.

Parameters and activations carry logical names (`flaxattn.nn.sharding.LOGICAL_AXES`); a preset
chooses which of them are sharded over which mesh axis, and the config may override single names.
A mesh axis of size 1 shards nothing, so one preset serves any mesh shape that uses its axes.

Presets (`batch` is always split over `data` and `fsdp`: FSDP is data parallel for activations):
  dp: parameters replicated.
  fsdp: parameters and optimizer state split on `embed` over `fsdp` (ZeRO-3).
  tp: Megatron tensor parallel: `heads`, `kv_heads`, `mlp`, `vocab` over `tensor`.
  fsdp_tp: both.
  context: fsdp_tp, and the sequence (`length`) split over `context`.
"""

from __future__ import annotations

from flaxattn.nn.sharding import LOGICAL_AXES
from flaxattn.parallel.mesh import MESH_AXES

_BATCH = {"batch": ("data", "fsdp")}
_FSDP = {"embed": "fsdp"}
_TENSOR = {"heads": "tensor", "kv_heads": "tensor", "mlp": "tensor", "vocab": "tensor"}

PRESETS = {
    "dp": _BATCH,
    "fsdp": {**_BATCH, **_FSDP},
    "tp": {**_BATCH, **_TENSOR},
    "fsdp_tp": {**_BATCH, **_FSDP, **_TENSOR},
    "context": {**_BATCH, **_FSDP, **_TENSOR, "length": "context"},
}

Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]


def parse_overrides(overrides: str) -> dict[str, tuple[str, ...]]:
  """`"embed=fsdp,batch=data+fsdp,mlp="` -> `{'embed': ('fsdp',), 'batch': ('data', 'fsdp'),
  'mlp': ()}` (an empty right side: not sharded)."""
  parsed = {}
  for item in filter(None, (part.strip() for part in overrides.split(","))):
    name, sep, axes = item.partition("=")
    name = name.strip()
    if not sep or name not in LOGICAL_AXES:
      raise ValueError(
          f"config.sharding.overrides: {item!r} must be 'logical_name=mesh_axis[+mesh_axis]' with a "
          f"logical name in {list(LOGICAL_AXES)}")
    axes = tuple(filter(None, (axis.strip() for axis in axes.split("+"))))
    bad = [axis for axis in axes if axis not in MESH_AXES]
    if bad:
      raise ValueError(
          f"config.sharding.overrides: {item!r} names mesh axis {bad[0]!r}; the axes are "
          f"{list(MESH_AXES)}")
    parsed[name] = axes
  return parsed


def make_rules(preset: str, overrides: str = "") -> Rules:
  """Rules `((logical_name, mesh_axes or None), ...)` naming every logical axis, for
  `nnx.logical_axis_rules` and `flaxattn.nn.sharding.logical_spec`."""
  if preset not in PRESETS:
    raise ValueError(f"config.sharding.preset must be one of {list(PRESETS)}, got {preset!r}")
  mapping = {**PRESETS[preset], **parse_overrides(overrides)}
  return tuple((name, mapping.get(name) or None) for name in LOGICAL_AXES)


def unused_mesh_axes(rules: Rules, mesh_shape: dict[str, int]) -> list[str]:
  """Mesh axes of size > 1 that no rule uses (their devices would only repeat the work)."""
  used = set()
  for _, axes in rules:
    used.update((axes,) if isinstance(axes, str) else axes or ())
  return [axis for axis, size in mesh_shape.items() if size > 1 and axis not in used]
