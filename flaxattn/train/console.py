"""What a run prints on the console: a line when each long phase starts, progress bars, and the
summary at the end. Only process 0 prints.

Phase lines and bars go to stderr (with the warnings), so stdout keeps what a mode returns (the
train summary, eval metrics, decoded lines, attend's predictions). Library logs are another matter:
`flaxattn.main` keeps them at warnings unless `--verbosity` asks for more.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import tqdm

from flaxattn.train.metrics import COUNTERS

_START = time.monotonic()  # The clock of the phase lines: from the first import (the run's start).

# What the summary leaves out: the evaluations' counters (`metrics.COUNTERS`), the loss weight, the
# z-loss term and the baseline's regularisation strength: how much, not how well.
_COUNTERS = frozenset(COUNTERS) | {"weight", "z_loss", "C"}


def printing() -> bool:
  """Whether this process prints (process 0 of a multi-process run)."""
  return jax.process_index() == 0


def elapsed() -> float:
  """Seconds since the run started (`start_clock`, else the first import of this module)."""
  return time.monotonic() - _START


def start_clock() -> None:
  """Starts the clock of the phase lines and the summary's wall time (a run's start)."""
  global _START
  _START = time.monotonic()


def clock(seconds: float) -> str:
  """`seconds` as `M:SS` (or `H:MM:SS`)."""
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def say(message: str) -> None:
  """One phase line on stderr, `[M:SS] message`, above any progress bar (process 0)."""
  if printing():
    tqdm.tqdm.write(f"[{clock(elapsed())}] {message}", file=sys.stderr)
    sys.stderr.flush()


def _terminal() -> bool:
  return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def progress(iterable=None, *, desc: str, total: int | None = None, unit: str = "batch",
             leave: bool = False, initial: int = 0):
  """A tqdm bar on stderr for a phase, cleared when done (`leave=False`); off on processes > 0.
  Where stderr is no terminal (a log file, a pipe), a phase's bar is one line saying it started."""
  if not leave and not _terminal():
    plural = "batches" if unit == "batch" else f"{unit}s"
    say(f"{desc} ({total:,} {plural})" if total else desc)
    return tqdm.tqdm(iterable, total=total, disable=True)
  return tqdm.tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, initial=initial,
                   dynamic_ncols=True, file=sys.stderr, disable=not printing())


def _number(value: float | None) -> str:
  if value is None:
    return "-"
  if not math.isfinite(value):
    return str(value)
  return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"


def summary_lines(record: dict, *, title: str, workdir: str, seconds: float,
                  checkpoint: str = "", baseline: str = "tfidf") -> list[str]:
  """The summary block of a finished run: validation (`eval_*`) and test (`test_*`) metrics beside
  the baseline's (`baseline_<name>_<split>_*`), the wall time, and where the report and the
  TensorBoard logs are."""
  columns = [("validation", "eval_"), ("test", "test_")]
  if any(key.startswith(f"baseline_{baseline}_") for key in record):
    columns += [(f"{baseline.upper()} val", f"baseline_{baseline}_validation_"),
                (f"{baseline.upper()} test", f"baseline_{baseline}_test_")]
  columns = [(name, prefix) for name, prefix in columns
             if any(key.startswith(prefix) for key in record)]
  names = []
  for _, prefix in columns[:2]:
    names += [key[len(prefix):] for key in record if key.startswith(prefix)
              and key[len(prefix):] not in _COUNTERS and key[len(prefix):] not in names]
  # An nll equal to the loss (no label smoothing, no z-loss) is the same number twice.
  names = [name for name in names if not (name == "nll" and all(
      math.isclose(record.get(prefix + "nll", 0.0), record.get(prefix + "loss", math.nan),
                   rel_tol=1e-6) for _, prefix in columns[:2] if prefix + "nll" in record))]
  width = max([len(name) for name in names] + [10])
  header = f"  {'':<{width}}" + "".join(f"  {name:>12}" for name, _ in columns)
  rule = "=" * max(len(header), 60)
  step = f"step {int(record['step'])}" if "step" in record else ""
  lines = [rule, f"{title}: done in {clock(seconds)}" + (f", {step}" if step else "") +
           (f"; reported: checkpoint {checkpoint}" if checkpoint else "")]
  if names:
    lines.append(header)
    lines += [f"  {name:<{width}}" + "".join(f"  {_number(record.get(prefix + name)):>12}"
                                              for _, prefix in columns) for name in names]
  lines += [f"  report       {workdir}/report.md",
            f"  tensorboard  tensorboard --logdir {workdir}/tensorboard", rule]
  return lines


def print_summary(*args, **kwargs) -> None:
  """`summary_lines` on stdout (process 0)."""
  if printing():
    print("\n".join(summary_lines(*args, **kwargs)), file=sys.stdout, flush=True)
