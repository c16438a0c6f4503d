"""`python -m flaxattn.main --config=experiments/NAME.py[:variant] --workdir=DIR` (also the
`flaxattn` console script). Overrides: `--config.model.num_layers=6`, `--config.mesh.data=4`.

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
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from flaxattn.train.loop import train_and_evaluate  # Deferred: --helpfull stays fast.
  validate(_CONFIG.value)
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def run():
  """Entry point of the `flaxattn` console script."""
  app.run(main)


if __name__ == "__main__":
  run()
