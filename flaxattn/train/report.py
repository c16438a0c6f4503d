"""A run's report: learning curves from `WORKDIR/metrics.jsonl`, `report.md` / `report.json`, and
TensorBoard images.

`plot_learning_curves` draws the training loss (smoothed) with the eval loss, and each evaluation
metric (not the counters) against the step; `write_report` writes the final metrics, result tables,
image links and notes as Markdown (and the metrics as JSON), atomically; `log_images` sends PNG
files (learning curves, attention maps from `flaxattn.models.attention_maps`) to TensorBoard, and
`figure_array` / `png_to_array` turn figures and PNG files into the uint8 `[height, width, 3]`
images it sends.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import matplotlib.image
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flaxattn.files import write_atomically
from flaxattn.train.metrics import COUNTERS, is_metric  # noqa: F401 (part of this API)


def read_metrics(metrics_jsonl_path: str) -> list[dict]:
  """The records of a `metrics.jsonl` file, in order (blank lines skipped).

  Raises:
    ValueError: naming the file and line of a line that is not a JSON object with a 'step'.
  """
  records = []
  with open(metrics_jsonl_path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(
            f"{metrics_jsonl_path}:{number}: not JSON ({error.msg}): {line[:80]!r}") from None
      if not isinstance(record, dict) or "step" not in record:
        raise ValueError(f"{metrics_jsonl_path}:{number}: expected a JSON object with a 'step', "
                         f"got {line[:80]!r}")
      records.append(record)
  return records


def _series(records: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of the records that hold a numeric `name`."""
  pairs = [(record["step"], record[name]) for record in records
           if isinstance(record.get(name), numbers.Real) and not isinstance(record[name], bool)]
  steps, values = zip(*pairs) if pairs else ((), ())
  return np.asarray(steps, np.float64), np.asarray(values, np.float64)


# Parts of the loss: `z_loss` is the z-loss term (0 unless `loss.z_loss`), `nll` the cross-entropy
# (`loss` without label smoothing and z-loss; `perplexity` is its exponential).
LOSS_PARTS = ("z_loss", "nll")


def _smoothing(points: int) -> float:
  """The moving average's weight for a series of `points`: 0 (none) up to 16 points, rising to 0.9
  from 160 (a short curve is drawn as logged; a long, noisy one averages about 1 / (1 - weight)
  points)."""
  return float(np.clip(1.0 - 16.0 / max(points, 1), 0.0, 0.9))


def smoothed(values: np.ndarray) -> np.ndarray:
  """A debiased exponential moving average of `values` (as TensorBoard's smoothing), weighted by
  `_smoothing(len(values))`: longer series are smoothed more."""
  weight = _smoothing(len(values))
  average, out = 0.0, np.empty(len(values))
  for index, value in enumerate(values):
    average = weight * average + (1.0 - weight) * value
    out[index] = average / (1.0 - weight ** (index + 1)) if weight else value
  return out


def _plotted(records: list[dict], name: str) -> bool:
  """Whether `name` gets its own panel: an eval metric, not the loss or a part of it, not a
  counter, with a numeric value that is not always 0."""
  if not name.startswith("eval_") or name == "eval_loss" or not is_metric(name):
    return False
  if name[len("eval_"):] in LOSS_PARTS:
    return False
  values = _series(records, name)[1]
  return values.size > 0 and bool(np.any(values != 0))


def plot_learning_curves(metrics_jsonl_path: str, png_path: str, *, log_loss: bool = False,
                         title: str | None = None) -> str:
  """Plots a run's loss and its evaluation metrics against the step, as PNG.

  The first panel holds the training `loss`, smoothed (`smoothed`; the raw values faint behind it),
  and `eval_loss` on the same axes; then one panel per evaluation metric (`eval_accuracy`,
  `eval_perplexity`, `eval_bleu`, ...) in the order they first appear, without counters
  (`COUNTERS`), the loss's parts (`LOSS_PARTS`) or series that are always 0. Evaluated points are
  marked, so a single evaluation still shows.

  Args:
    metrics_jsonl_path: the training loop's `WORKDIR/metrics.jsonl` (one JSON object per line with
      'step', 'loss', and 'eval_*' keys at evaluation steps).
    png_path: the PNG file to write (parent directories are created).
    log_loss: log-scale y axis for the loss panel.
    title: the figure title (default: the workdir's name).

  Returns:
    `png_path`.

  Raises:
    ValueError: the file holds no numeric 'loss' or 'eval_*' value, or a malformed line.
  """
  records = read_metrics(metrics_jsonl_path)
  names = []
  for record in records:
    names.extend(name for name in record if name.startswith("eval_") and name not in names)
  others = [name for name in names if _plotted(records, name)]
  has_loss = any(_series(records, name)[0].size for name in ("loss", "eval_loss"))
  if not has_loss and not others:
    raise ValueError(f"{metrics_jsonl_path} holds no numeric 'loss' or 'eval_*' values to plot")
  panels = (["loss"] if has_loss else []) + others
  columns = min(3, len(panels))
  rows = math.ceil(len(panels) / columns)
  figure = Figure(figsize=(4.5 * columns, 3.4 * rows + 0.5), dpi=100, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(rows, columns, squeeze=False)
  for ax, panel in zip(axes.flat, panels):
    if panel == "loss":
      steps, values = _series(records, "loss")
      if steps.size:
        line, = ax.plot(steps, values, alpha=0.25, linewidth=1)
        ax.plot(steps, smoothed(values), color=line.get_color(),
                label="train (smoothed)" if _smoothing(steps.size) else "train")
      steps, values = _series(records, "eval_loss")
      if steps.size:
        ax.plot(steps, values, marker="o", markersize=4, label="eval")
      ax.legend(fontsize=8)
      if log_loss:
        ax.set_yscale("log")
    else:
      steps, values = _series(records, panel)
      ax.plot(steps, values, marker="o", markersize=4)
      if panel.endswith("perplexity") and values.min() > 0 and values.max() > 10 * values.min():
        ax.set_yscale("log")  # From ~vocabulary size down to a few: linear hides the end.
    ax.set_title(panel[len("eval_"):] if panel.startswith("eval_") else panel)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  for ax in axes.flat[len(panels):]:
    ax.set_axis_off()
  default_title = os.path.basename(os.path.dirname(os.path.abspath(metrics_jsonl_path)))
  figure.suptitle(default_title if title is None else title)
  write_atomically(png_path, lambda f: figure.savefig(f, format="png"), binary=True)
  return png_path


def _plain(value):
  """`value` as JSON: numpy scalars/arrays to Python, non-finite floats as the strings 'nan',
  'inf', '-inf' (JSON has no such numbers; strings keep them exact and the file standard)."""
  if isinstance(value, np.ndarray):
    return [_plain(item) for item in value.tolist()]
  if isinstance(value, (np.bool_, bool)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else str(value)
  if isinstance(value, Mapping):
    return {str(key): _plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(item) for item in value]
  return value


def _cell(value) -> str:
  """A Markdown table cell: floats to 6 significant digits, '|' escaped, newlines as spaces."""
  if isinstance(value, (bool, np.bool_)):
    text = str(bool(value))
  elif isinstance(value, numbers.Integral):
    text = str(int(value))
  elif isinstance(value, numbers.Real):
    text = f"{float(value):.6g}"
  else:
    text = str(value)
  return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[Mapping], name: str) -> list[str]:
  if not rows:
    return ["(no rows)"]
  columns = []
  for index, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"tables[{name!r}][{index}] must be a dict, got {type(row).__name__}")
    columns.extend(column for column in row if column not in columns)
  lines = ["| " + " | ".join(_cell(column) for column in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(row[column]) if column in row else "" for column in columns)
            + " |" for row in rows]
  return lines


def write_report(workdir: str, *, title: str, metrics: Mapping,
                 tables: Mapping[str, Sequence[Mapping]] | None = None,
                 images: Sequence[str] | None = None, notes: Sequence[str] | None = None) -> str:
  """Writes `WORKDIR/report.md` and `WORKDIR/report.json`, each atomically.

  `report.md`: the title, a table of `metrics` (name, value), each of `tables` under its name (the
  columns are the rows' keys in order of first appearance; a missing cell stays empty), the
  `images` as Markdown image links relative to `workdir`, and the `notes` as a list.
  `report.json`: `metrics` as a JSON object (numpy values converted; NaN and infinities as the
  strings 'nan', 'inf', '-inf').

  Args:
    workdir: the run's directory (created if missing).
    title: the report's heading.
    metrics: final metric name -> value.
    tables: table name -> list of row dicts (e.g. per-class scores, baselines beside the model).
    images: PNG paths (absolute, or relative to the current directory); each must exist.
    notes: free-text lines.

  Returns:
    The path of `report.md`.
  """
  if not isinstance(metrics, Mapping):
    raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
  lines = [f"# {title}", "", "## Metrics", ""]
  lines += _table([{"metric": name, "value": value} for name, value in metrics.items()], "metrics")
  for name, rows in (tables or {}).items():
    lines += ["", f"## {name}", ""] + _table(rows, name)
  if images:
    lines += ["", "## Figures", ""]
    for path in images:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
      relative = os.path.relpath(os.path.abspath(path), os.path.abspath(workdir))
      caption = os.path.splitext(os.path.basename(path))[0]
      # Angle brackets let a path hold spaces or parentheses in a Markdown link.
      lines += [f"![{caption}](<{relative}>)", ""]
  if notes:
    lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
  text = "\n".join(lines).rstrip("\n") + "\n"
  record = json.dumps(_plain(dict(metrics)), indent=2, sort_keys=False, allow_nan=False)
  md_path = os.path.join(workdir, "report.md")
  write_atomically(md_path, lambda f: f.write(text))
  write_atomically(os.path.join(workdir, "report.json"), lambda f: f.write(record + "\n"))
  return md_path


def figure_array(figure: Figure) -> np.ndarray:
  """A matplotlib figure rendered as uint8 RGB `[height, width, 3]`."""
  canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def png_to_array(path: str) -> np.ndarray:
  """A PNG file as uint8 RGB `[height, width, 3]` (grey scale expanded, transparency composited on
  white), ready for `SummaryWriter.add_image(tag, image, step, dataformats='HWC')`."""
  image = matplotlib.image.imread(path)
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / 255.0
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.shape[-1] == 4:
    alpha = image[..., 3:]
    image = image[..., :3] * alpha + (1.0 - alpha)
  return np.clip(np.rint(image[..., :3] * 255.0), 0, 255).astype(np.uint8)


def log_images(writer, tag_to_png: Mapping[str, str], step: int) -> None:
  """Adds each PNG file to TensorBoard as an image under its tag, at `step`, and flushes.

  Args:
    writer: a `tensorboardX.SummaryWriter`.
    tag_to_png: tag -> PNG path (e.g. `{'attention/layer0': '.../attention_self_layer0.png'}`).
    step: the global step.
  """
  for tag, path in tag_to_png.items():
    writer.add_image(tag, png_to_array(path), int(step), dataformats="HWC")
  writer.flush()
