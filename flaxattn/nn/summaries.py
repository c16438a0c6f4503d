"""`summary(model)`: a model's parameters as a table, as Keras' `model.summary()` prints a model.

One row per parameter (path, shape, count, dtype, logical axes, the mesh sharding that the logical
axis rules give them, bytes), subtotals per module (the first `depth` parts of the path), a total,
and, when the caller gives it, the model's FLOPs per token (`flaxattn.train.flops`). The model may
be abstract (`nnx.eval_shape`): only shapes, dtypes and metadata are read.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from flaxattn.nn.sharding import logical_spec


@dataclasses.dataclass(frozen=True)
class ParamRow:
  """One parameter: `path` ('/'-joined), `module` (the first `depth` parts of its module's path),
  `shape`, `count`, `dtype`, `axes` (logical names, None for an unnamed dimension), `spec` (the mesh `PartitionSpec`
  the rules give them), `sharding` (`spec` as text, 'replicated' when no dimension is split or
  without rules), `bytes` (of
  the whole parameter) and `device_bytes` (of one device's shard: `bytes` without a mesh)."""

  path: str
  module: str
  shape: tuple[int, ...]
  count: int
  dtype: str
  axes: tuple[str | None, ...]
  spec: jax.sharding.PartitionSpec
  sharding: str
  bytes: int
  device_bytes: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """What `summary` returns: `rows` (a `ParamRow` per parameter), `modules` (module -> (count,
  bytes) in order), totals, and `flops_per_token` (None when not given). `str()` is the module
  table; `table('param')` the full one."""

  rows: list[ParamRow]
  flops_per_token: float | None
  mesh_shape: dict[str, int] | None

  @property
  def total_params(self) -> int:
    return sum(row.count for row in self.rows)

  @property
  def total_bytes(self) -> int:
    return sum(row.bytes for row in self.rows)

  @property
  def modules(self) -> dict[str, tuple[int, int]]:
    """Module -> (parameters, bytes), in the order of the parameters."""
    totals: dict[str, tuple[int, int]] = {}
    for row in self.rows:
      count, size = totals.get(row.module, (0, 0))
      totals[row.module] = (count + row.count, size + row.bytes)
    return totals

  def table(self, per: str = "module") -> str:
    """The summary as text: one line per module (`per='module'`) or per parameter with its
    module's subtotal after it (`per='param'`), then the total and the FLOPs per token."""
    if per not in ("module", "param"):
      raise ValueError(f"per must be 'module' or 'param', got {per!r}")
    if per == "module":
      header = ("module", "parameters", "bytes")
      lines = [(name, f"{count:,}", _bytes(size)) for name, (count, size) in self.modules.items()]
    else:
      header = ("parameter", "shape", "count", "dtype", "logical axes", "sharding", "bytes",
                "per device")
      lines, modules = [], self.modules
      for index, row in enumerate(self.rows):
        lines.append((row.path, "x".join(map(str, row.shape)) or "scalar", f"{row.count:,}",
                      row.dtype, ",".join(str(axis) for axis in row.axes) or "-", row.sharding,
                      _bytes(row.bytes), _bytes(row.device_bytes)))
        last = index + 1 == len(self.rows) or self.rows[index + 1].module != row.module
        if last and row.path != row.module:
          count, size = modules[row.module]
          lines.append((f"  = {row.module}", "", f"{count:,}", "", "", "", _bytes(size), ""))
    footer = [("total", *([""] * (len(header) - 3)), f"{self.total_params:,}",
               _bytes(self.total_bytes))] if per == "module" else [
        ("total", "", f"{self.total_params:,}", "", "", "", _bytes(self.total_bytes), "")]
    widths = [max(len(str(line[i])) for line in [header, *lines, *footer])
              for i in range(len(header))]
    fmt = lambda line: "  ".join(str(cell).rjust(width) if index and cell and cell[0].isdigit()
                                 else str(cell).ljust(width)
                                 for index, (cell, width) in enumerate(zip(line, widths))).rstrip()
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    text = [fmt(header), rule, *map(fmt, lines), rule, *map(fmt, footer)]
    if self.mesh_shape is not None:
      text.append(f"mesh {self.mesh_shape}")
    if self.flops_per_token is not None:
      text.append(f"forward FLOPs per token: {self.flops_per_token:,.0f} "
                  f"({self.flops_per_token / 1e6:.3g} MFLOP; matmuls only, flaxattn.train.flops)")
    return "\n".join(text)

  def __str__(self) -> str:
    return self.table("module")


def _bytes(size: int) -> str:
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if size >= scale:
      return f"{size / scale:.1f} {unit}"
  return f"{size} B"


def _spec_text(spec: jax.sharding.PartitionSpec) -> str:
  """`P('fsdp', 'tensor', None)` (the same text on every jax version), or 'replicated'."""
  if all(entry is None for entry in spec):
    return "replicated"
  return "P(" + ", ".join(map(repr, spec)) + ")"


def _path(keys: Sequence) -> str:
  return "/".join(str(getattr(key, "key", getattr(key, "idx", key))) for key in keys)


def summary(model: nnx.Module, *, rules=None, mesh: jax.sharding.Mesh | None = None,
            flops_per_token: float | None = None, depth: int = 2) -> ModelSummary:
  """The parameters of `model` (concrete or `nnx.eval_shape`d) as a `ModelSummary`.

  Args:
    model: an `nnx.Module`; its `nnx.Param`s are read, with the logical axis names that
      `flaxattn.nn.sharding.param` records (`out_sharding` metadata).
    rules: logical axis rules (`flaxattn.parallel.make_rules`); None: every parameter replicated.
    mesh: the mesh the rules map onto, for each device's bytes (and the mesh's shape in the text).
    flops_per_token: the model's forward FLOPs per token (`flaxattn.train.flops`), printed last.
    depth: the leading parts of a parameter's module path that group it for the subtotals (2:
      `decoder/layers`, `embedder/token`, `lm_head`).

  Returns:
    A `ModelSummary`; `print(summary(model))` shows one line per module, `.table('param')` one per
    parameter.
  """
  if depth < 1:
    raise ValueError(f"depth must be >= 1, got {depth}")
  rows = []
  for keys, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape = tuple(int(size) for size in variable.shape)
    dtype = np.dtype(variable.dtype)
    axes = tuple(variable.get_metadata().get("out_sharding") or (None,) * len(shape))
    spec = logical_spec(axes, rules) if rules is not None else jax.sharding.PartitionSpec()
    split = 1
    for entry in spec:
      for axis in (entry,) if isinstance(entry, str) else (entry or ()):
        split *= mesh.shape.get(axis, 1) if mesh is not None else 1
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    path = _path(keys)
    rows.append(ParamRow(
        path=path, module="/".join(path.split("/")[:-1][:depth]) or path, shape=shape,
        count=int(np.prod(shape, dtype=np.int64)), dtype=str(dtype), axes=axes,
        spec=spec, sharding=_spec_text(spec), bytes=size, device_bytes=size // split))
  return ModelSummary(rows=rows, flops_per_token=flops_per_token,
                      mesh_shape=None if mesh is None else dict(mesh.shape))
