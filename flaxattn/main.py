"""`python -m flaxattn.main --config=experiments/NAME.py[:variant] --workdir=DIR` (also the
`flaxattn` console script). Overrides: `--config.model.num_layers=6`, `--config.mesh.data=4`.

Modes (`--mode=`, or the first word of the console script: `flaxattn attend --workdir=DIR ...`):
  train   (default) train, evaluate, checkpoint, and write `DIR/report.md` at the end.
  eval    metrics of a checkpoint in DIR (`--checkpoint`, default the newest) on `--split`
          (default validation and test), printed and written to `DIR/eval_<split>.json`.
  decode  one input per line from `--input` (a file; default stdin) to `--output` (default stdout):
          translations (seq2seq, beam search), continuations (lm, `--max_new_tokens`, greedy or
          `--temperature` sampling), or predicted labels with probabilities (classification).
  attend  attention maps of `--text` (repeatable; seq2seq: the source, the target is generated)
          as labelled heatmaps, rollout and cross-attention alignments, in `DIR/attention/cli/`.
  summary the model's parameter table (shapes, counts, dtypes, logical axes, sharding, bytes,
          FLOPs per token) from `--config` (or DIR's config), built abstractly; no DIR needed.
Modes other than train read the run's config from `DIR/config.json` unless `--config` is given.
`--checkpoint=latest|best|STEP` (`config.checkpoint`) picks the checkpoint that eval, decode and
attend read and that the final report of train evaluates (the report names it and its step).

A DIR that already holds a run is resumed from its newest checkpoint (SIGTERM saves one and exits),
but only with the same config up to the keys that may change on resume
(`flaxattn.config.RESUMABLE_KEYS`: steps, eval/log/checkpoint frequency, eval and report options,
the mesh, ...); any other change is refused before anything is written, naming the keys.
`--restart` moves the old run to `DIR.old-N` and starts over.

Multi-process (multi-host) runs start every process with the same command: on TPU VMs and under
SLURM add `--distributed` (JAX finds the coordinator itself); elsewhere also give
`--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (`launch/local.py` does this for
N processes on this machine).

The config is validated (`flaxattn.config.validate`) before anything is built or compiled; the
resolved config is written to `DIR/config.json`, metrics to `DIR/metrics.jsonl`, checkpoints to
`DIR/checkpoints` (a restart of the same command resumes from the newest).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from flaxattn.config import validate

MODES = ("train", "eval", "decode", "attend", "summary")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg) -> ConfigDict), with an optional "
    "':variant' argument.", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do (see the module docstring).")
_SPLIT = flags.DEFINE_string("split", None, "eval: the split ('validation', 'test'; default both).")
_INPUT = flags.DEFINE_string("input", None, "decode: input file, one example per line (default stdin).")
_OUTPUT = flags.DEFINE_string("output", None, "decode: output file (default stdout).")
_TEXT = flags.DEFINE_multi_string("text", [], "attend: input text (repeatable).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32, "decode (lm): tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "decode (lm): 0 = greedy, else sampling.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Which checkpoint eval/decode/attend read and the final report uses: "
    "'latest', 'best' (by config.best_checkpoint_metric) or a step (default: config.checkpoint).")
_RESTART = flags.DEFINE_bool("restart", False, "train: move a run already in --workdir aside to "
                             "WORKDIR.old-N and start over (otherwise it is resumed).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "resolved config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run first "
                                 "(flaxattn.parallel.distributed.initialize; it "
                                 "detects TPU VMs and SLURM; implied by --coordinator_address).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1.")


def _run_config(workdir: str):
  """The config of the run in `workdir` (its `config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise app.UsageError(f"--workdir={workdir} has no config.json (not a training run's workdir); "
                         "give --config")
  with open(path) as f:
    return config_dict.ConfigDict(json.load(f))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax  # Deferred, like the loop: --helpfull stays fast.

  if _DISTRIBUTED.value or _COORDINATOR.value:
    from flaxattn.parallel import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  if _WORKDIR.value is None and not (_MODE.value == "summary" and config is not None):
    raise app.UsageError("--workdir is required (the summary mode takes --config instead)")
  if config is None:
    if _MODE.value == "train":
      raise app.UsageError("--config is required to train")
    config = _run_config(_WORKDIR.value)
  if _CHECKPOINT.value is not None or "checkpoint" not in config:  # (config.json of older runs)
    with config.unlocked():
      config.checkpoint = _CHECKPOINT.value or "latest"
  validate(config)
  if _MODE.value == "train":
    from flaxattn.train.loop import train_and_evaluate
    train_and_evaluate(config, _WORKDIR.value, restart=_RESTART.value)
    return
  if _MODE.value == "summary":  # The model built abstractly: its parameter table, nothing trained.
    from flaxattn.train.inference import model_summary
    print(model_summary(config, _WORKDIR.value).table("param"))
    return
  from flaxattn.train import inference
  if _MODE.value == "eval":
    splits = [_SPLIT.value] if _SPLIT.value else None
    for split, metrics in inference.evaluate_checkpoint(config, _WORKDIR.value, splits).items():
      if jax.process_index() == 0:  # Every process computes the metrics; one prints them.
        print(json.dumps({"split": split, **metrics}, sort_keys=True))
  elif _MODE.value == "decode":
    source = open(_INPUT.value) if _INPUT.value else sys.stdin
    lines = [line.rstrip("\n") for line in source]
    outputs = inference.decode_lines(config, _WORKDIR.value, lines,
                                     max_new_tokens=_MAX_NEW_TOKENS.value,
                                     temperature=_TEMPERATURE.value)
    text = "".join(line + "\n" for line in outputs)
    if jax.process_index() != 0:  # Every process decodes; one writes.
      return
    if _OUTPUT.value:
      with open(_OUTPUT.value, "w") as f:
        f.write(text)
    else:
      sys.stdout.write(text)
  else:
    if not _TEXT.value:
      raise app.UsageError("attend needs --text")
    for path in inference.attend(config, _WORKDIR.value, _TEXT.value):
      print(path)


def run():
  """Entry point of the `flaxattn` console script: `flaxattn [MODE] --workdir=DIR ...`."""
  if len(sys.argv) > 1 and sys.argv[1] in MODES:
    sys.argv[1:2] = [f"--mode={sys.argv[1]}"]
  app.run(main)


if __name__ == "__main__":
  run()
