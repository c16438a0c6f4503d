"""Orbax checkpoints of the whole training state and the data position, saved together.

A checkpoint is a step directory holding `state` (the `TrainState`: parameters, optimizer state,
step, RNG) and `progress` (JSON: the data iterator's state, e.g. a grain iterator's `get_state()`). Orbax writes each into a temporary
directory and renames it when complete, so a process killed mid-save leaves nothing that
`latest_step` would pick. Saving is asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written while training goes on.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores `(TrainState, data_state)` under `directory`, keeping the last `keep`
  and, with `best_metric`, also the one whose metric is best (lowest with `best_mode='min'`, highest
  with 'max') among the checkpoints saved with metrics."""

  def __init__(self, directory: str | os.PathLike, *, keep: int, best_metric: str = "",
               best_mode: str = "min", async_save: bool = True):
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max', got {best_mode!r}")
    preserve = [ocp.checkpoint_managers.LatestN(keep)]
    if best_metric:
      # BestN keeps the end of the sorted list: sort descending to keep the minimum.
      preserve.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(preserve))
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                         item_names=("state", "progress"))

  def save(self, step: int, state, data_state, metrics: dict | None = None) -> None:
    """Starts saving `state` and the data iterator's state (anything JSON-serialisable) as
    checkpoint `step` (returns before it is on disk; `wait` or `close` to be sure). `metrics` (floats
    by name) rank it for `best_metric`."""
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        progress=ocp.args.JsonSave({"step": step, "data_state": data_state})))

  def restore_latest(self, abstract_state):
    """`(state, data_state)` from the newest readable checkpoint, each array placed with the
    sharding of `abstract_state` (a `TrainState` of `jax.ShapeDtypeStruct`s with shardings, which
    may differ from the saved ones); None when there is none. A checkpoint that fails to load
    (corrupted files) is skipped with a warning for the one before it."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
      except Exception as error:  # Any failure to read means: not usable; try the previous one.
        logging.warning("checkpoint %d in %s cannot be restored (%s: %s); trying an older one",
                        step, self.manager.directory, type(error).__name__, error)
        continue
      return restored.state, restored.progress["data_state"]
    return None

  def wait(self) -> None:
    """Blocks until the pending save is on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(state, shardings):
  """`jax.ShapeDtypeStruct`s of `state`'s arrays with `shardings` (the restore target)."""
  return jax.tree.map(lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      state, shardings)


def load_params(path: str | os.PathLike) -> dict:
  """The parameters alone from a checkpoint, as a nested dict of NumPy arrays (host memory).

  `path` is a run's workdir or its `checkpoints` directory (the newest complete checkpoint is read)
  or one step's directory. Only the parameters are read, not the optimizer state. Load them into a
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
    path = os.path.join(path, str(max(steps)))
  state_path = os.path.join(path, "state")
  checkpointer = ocp.PyTreeCheckpointer()
  # orbax 0.12 wraps the tree in StepMetadata.item_metadata; other versions return it directly.
  metadata = checkpointer.metadata(state_path)
  metadata = getattr(metadata, "item_metadata", metadata)
  wanted = {"params": getattr(metadata, "tree", metadata)["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(state_path, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=restore_args, partial_restore=True))["params"]
