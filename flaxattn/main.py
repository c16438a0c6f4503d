"""`python -m flaxattn.main --config=experiments/NAME.py[:variant] --workdir=DIR` (also the
`flaxattn` console script). Overrides: `--config.model.num_layers=6`, `--config.mesh.data=4`.

Multi-process (multi-host) runs start every process with the same command: on TPU VMs and under
SLURM add `--distributed` (JAX finds the coordinator itself); elsewhere also give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (`launch/local.py` does this for
N processes on this machine).

The config is validated (`flaxattn.config.validate`) before anything is built or compiled; the
resolved config is written to `DIR/config.json`, metrics to `DIR/metrics.jsonl`, checkpoints to
`DIR/checkpoints` (a restart of the same command resumes from the newest).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from flaxattn.config import validate

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg) -> ConfigDict), with an optional "
    "':variant' argument.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "resolved config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (it "
                                 "detects TPU VMs and SLURM; implied by --coordinator_address).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # Deferred, like the loop: --helpfull stays fast.

  from flaxattn.train.loop import train_and_evaluate
  if _DISTRIBUTED.value or _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  validate(_CONFIG.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  """Entry point of the `flaxattn` console script."""
  app.run(main)


if __name__ == "__main__":
  run()
