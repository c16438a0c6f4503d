"""Orbax checkpoints of the whole training state and the data position, saved together.

A checkpoint is a step directory holding `state` (the `TrainState`: parameters, optimizer state,
step, RNG) and `progress` (JSON: the data iterator's state, e.g. a grain iterator's `get_state()`). Orbax writes each into a temporary
directory and renames it when complete, so a process killed mid-save leaves nothing that
`latest_step` would pick. Saving is asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written while training goes on.
"""

from __future__ import annotations

import logging as std_logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from flaxattn.parallel.sharding import path_name  # The one path-naming rule.


class CheckpointMismatch(ValueError):
  """A readable checkpoint whose arrays do not fit the state being restored (another model,
  optimizer or vocabulary): never skipped as corrupt, so the run is not silently started over."""


def _shapes_by_path(tree) -> dict[str, tuple]:
  """{'params/layers/0/kernel': (shape, dtype name)} of the arrays (or their metadata) in `tree`."""
  return {path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


class _ExpectedOrbaxWarnings(std_logging.Filter):
  """Drops Orbax's warnings about what flaxattn does on purpose: opening a run's checkpoints
  read-only (eval, decode, attend) and reading the parameters item of a step alone."""

  EXPECTED = ("CheckpointManagerOptions.read_only=True", "Given directory is read only",
              "Metadata file does not exist")

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno == std_logging.WARNING and
                record.getMessage().startswith(self.EXPECTED))


if not any(isinstance(f, _ExpectedOrbaxWarnings) for f in std_logging.getLogger("absl").filters):
  std_logging.getLogger("absl").addFilter(_ExpectedOrbaxWarnings())  # Orbax logs through absl.


class Checkpointer:
  """Saves and restores `(TrainState, data_state)` under `directory`, keeping the last `keep`
  and, with `best_metric`, also the one whose metric is best (lowest with `best_mode='min'`, highest
  with 'max') among the checkpoints saved with metrics, and the steps in `preserve_steps`.
  `read_only` creates, saves and deletes nothing (for reading another run's checkpoints)."""

  def __init__(self, directory: str | os.PathLike, *, keep: int, best_metric: str = "",
               best_mode: str = "min", async_save: bool = True, preserve_steps=(),
               read_only: bool = False):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    self.best_metric, self.best_mode = best_metric, best_mode
    preserve = [ocp.checkpoint_managers.LatestN(keep)]
    metric = (lambda metrics: metrics[best_metric]) if best_metric else None
    if best_metric:
      # BestN keeps the end of the sorted list: sort descending to keep the minimum.
      preserve.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=metric, reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    if preserve_steps:
      preserve.append(ocp.checkpoint_managers.CustomSteps(steps=list(preserve_steps)))
    # `best_fn` makes Orbax write each step's metrics to disk (without it they live only in this
    # manager, and a resumed run's BestN would know no best and let the old one be deleted).
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        best_fn=metric, best_mode=best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve))
    # Handlers named up front: a new manager can then read an old checkpoint's metadata.
    self.manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_state, metrics: dict | None = None) -> None:
    """Starts saving `state` and the data iterator's state (anything JSON-serialisable) as
    checkpoint `step` (returns before it is on disk; `wait` or `close` to be sure). `metrics` (floats
    by name) rank it for `best_metric`."""
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave({"step": step, "data_state": data_state})))

  def steps(self) -> list[int]:
    """The complete checkpoints' steps, ascending."""
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step with the best `best_metric` among those saved with metrics (None: none)."""
    ranked = [(metrics[self.best_metric], step) for step in self.steps()
              if (metrics := self.manager.metrics(step)) and self.best_metric in metrics]
    if not ranked:
      return None
    return (min if self.best_mode == "min" else max)(ranked)[1]

  def select(self, checkpoint: str | int) -> int:
    """The step of `checkpoint`: 'latest', 'best' or a step number; ValueError (one line, with the
    available steps) when there is no such checkpoint."""
    steps = self.steps()
    where = f"in {self.manager.directory} (available steps: {steps or 'none'})"
    if checkpoint == "best":
      if not self.best_metric:
        raise ValueError(f"checkpoint 'best' needs config.best_checkpoint_metric; {where}")
      step = self.best_step()
      if step is None:
        raise ValueError(f"no checkpoint has a {self.best_metric} to pick the best by {where}")
      return step
    if checkpoint == "latest":
      if not steps:
        raise ValueError(f"no checkpoint {where}")
      return steps[-1]
    if checkpoint not in steps:
      raise ValueError(f"no checkpoint at step {checkpoint} {where}")
    return checkpoint

  def check_fits(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatch naming the arrays of checkpoint `step` that differ from
    `abstract_state` (missing, unused, other shape or dtype). Errors reading its metadata (a
    corrupt checkpoint) propagate as they are."""
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise FileNotFoundError(f"checkpoint {step} has no readable state metadata")
    saved = _shapes_by_path(getattr(metadata, "tree", metadata))
    expected = _shapes_by_path(abstract_state)
    params_first = lambda path: (not path.startswith("params/"), path)
    differ = [f"{path}: {saved.get(path, 'absent')} -> {expected.get(path, 'absent')}"
              for path in sorted(set(saved) | set(expected), key=params_first)
              if saved.get(path) != expected.get(path)]
    if differ:
      raise CheckpointMismatch(
          f"checkpoint {step} in {self.manager.directory} does not fit this config's state "
          f"({len(differ)} arrays differ, saved -> expected: {'; '.join(differ[:4])})")

  def restore(self, step: int, abstract_state):
    """`(state, data_state)` of checkpoint `step` (after `check_fits`), arrays placed with the
    shardings of `abstract_state` (`jax.ShapeDtypeStruct`s, which may differ from the saved ones)."""
    self.check_fits(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
    return restored.state, restored.progress["data_state"]

  def restore_latest(self, abstract_state):
    """`(state, data_state)` from the newest readable checkpoint (see `restore`); None when there is
    none. A checkpoint that cannot be read (unreadable or missing files) is moved aside to
    `DIRECTORY.corrupt/STEP`, with a warning naming it, and the one before it is tried; one that
    is readable but does not fit `abstract_state` raises CheckpointMismatch."""
    for step in reversed(self.steps()):
      try:
        return self.restore(step, abstract_state)
      except CheckpointMismatch:
        raise
      except Exception as error:  # Anything else means the files are damaged.
        aside = self._set_aside(step)
        logging.warning("checkpoint %d in %s cannot be read (%s: %s); moved to %s, trying the one "
                        "before it", step, self.manager.directory, type(error).__name__, error,
                        aside)
    return None

  def _set_aside(self, step: int) -> str:
    """Moves checkpoint `step` out of the directory (so that a resumed run saves that step anew,
    which Orbax would skip as already there), never deleting it."""
    directory = str(self.manager.directory)
    aside = os.path.join(directory + ".corrupt", str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      os.replace(os.path.join(directory, str(step)), aside)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    self.manager.reload()
    return aside

  def wait(self) -> None:
    """Blocks until the pending save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state, shardings):
  """`jax.ShapeDtypeStruct`s of `state`'s arrays with `shardings` (the restore target)."""
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state, shardings)


def checkpoint_step(config, workdir: str) -> int:
  """The step of `config.checkpoint` ('latest', 'best', a step) among `WORKDIR/checkpoints`;
  ValueError (one line, listing the available steps) when it does not exist."""
  from flaxattn.config import parse_checkpoint  # Deferred: the config module imports the model.
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1, read_only=True,
                              best_metric=config.best_checkpoint_metric,
                              best_mode=config.best_checkpoint_mode)
  try:
    return checkpointer.select(parse_checkpoint(config.checkpoint))
  finally:
    checkpointer.close()


def load_params(path: str | os.PathLike, step: int | None = None) -> dict:
  """The parameters alone from a checkpoint, as a nested dict of NumPy arrays (host memory).

  `path` is a run's workdir or its `checkpoints` directory (checkpoint `step`, by default the newest
  complete one, is read) or one step's directory. Only the parameters are read, not the optimizer state. Load them into a
  model with `nnx.update(model, nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params))`.
  """
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not os.path.isdir(os.path.join(path, "state")):
    # Unfinished saves live in '<step>.orbax-checkpoint-tmp' directories: not digits, not read.
    steps = [int(name) for name in os.listdir(path) if name.isdigit()] if os.path.isdir(path) else []
    if not steps:
      raise ValueError(f"path {path!r} holds no checkpoint (a workdir, its checkpoints directory, "
                       "or a step directory)")
    if step is not None and step not in steps:
      raise ValueError(f"no checkpoint at step {step} in {path} (available steps: {sorted(steps)})")
    path = os.path.join(path, str(max(steps) if step is None else step))
  state_path = os.path.join(path, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  # orbax 0.12 wraps the tree in StepMetadata.item_metadata; other versions return it directly.
  metadata = checkpointer.metadata(state_path)
  metadata = getattr(metadata, "item_metadata", metadata)
  wanted = {"params": getattr(metadata, "tree", metadata)["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(state_path, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))["params"]
