"""`python -m flaxattn.main --config=experiments/NAME.py[:variant] --workdir=DIR` (also the
`flaxattn` console script). Overrides: `--config.model.num_layers=6`, `--config.mesh.data=4`.

Modes (`--mode=`, or the first word of the console script: `flaxattn attend --workdir=DIR ...`):
  train   (default) train, evaluate, checkpoint, and write `DIR/report.md` at the end.
  eval    metrics of a checkpoint in DIR (`--checkpoint`, default the newest) on `--split`
          (default validation and test), printed and written to `DIR/eval_<split>.json`.
  decode  one input per line from `--input` (a file; default stdin) to `--output` (default stdout):
          translations (seq2seq, beam search), continuations (lm, `--max_new_tokens`, greedy or
          `--temperature` sampling), or predicted labels with probabilities (classification).
  attend  the prediction (class and probabilities, greedy translation, or next tokens) and the
          attention maps of `--text` (repeatable, not empty; seq2seq: the source, the target is
          generated) as labelled heatmaps, rollout and cross-attention alignments (beyond 256
          tokens: maps pooled into bins and per-query curves, any length the model takes), from
          the config's own kernel, named after the text in `DIR/attention/cli/` (or
          `--out=PREFIX`); prints the prediction and paths.
  summary the model's parameter table (shapes, counts, dtypes, logical axes, sharding, bytes,
          FLOPs per token) from `--config` (or DIR's config), built abstractly; no DIR needed.
`flaxattn --help` lists the modes and their flags (the `MODES` table below).
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

The console stays quiet: library logs at warnings unless `--verbosity=0` (INFO) or `1` (debug);
phase lines, progress bars and the final summary come from `flaxattn.train.console` (process 0).
A bad command line (unknown config key, missing file, a workdir that is a file, an empty --text,
...) is one `error: ...` line on stderr and exit status 2, before anything is built.

The config is validated (`flaxattn.config.validate`) before anything is built or compiled; the
resolved config is written to `DIR/config.json`, metrics to `DIR/metrics.jsonl`, checkpoints to
`DIR/checkpoints` (a restart of the same command resumes from the newest).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import os
import sys
import textwrap

from absl import app, flags
from ml_collections import config_dict, config_flags




@dataclasses.dataclass(frozen=True)
class Mode:
  """One mode of the command line: what it does (one line of `--help`) and its own flags."""

  summary: str
  flags: tuple[str, ...] = ()


# The modes, in `--help` order: adding a mode is one entry here (and its branch in `main`).
MODES = {
    "train": Mode("(default) train, evaluate, checkpoint, write WORKDIR/report.md", ("restart",)),
    "eval": Mode("metrics of a checkpoint on --split, printed and in WORKDIR/eval_<split>.json",
                 ("split",)),
    "decode": Mode("outputs of --input lines: translations, continuations or labels",
                   ("input", "output", "max_new_tokens", "temperature")),
    "attend": Mode("the prediction and attention maps of each --text", ("text", "out")),
    "summary": Mode("the model's parameter table (of --config, or WORKDIR's); trains nothing"),
}
# Flags that every mode reads, in `--help` order.
COMMON_FLAGS = ("workdir", "config", "checkpoint", "verbosity", "distributed",
                "coordinator_address", "num_processes", "process_id")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (get_config(arg) -> ConfigDict), with an optional "
    "':variant' argument; train needs it, the other modes read WORKDIR/config.json without it. "
    "Override keys with --config.KEY=VALUE.", lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", list(MODES), "What to do (the console script takes it "
                          "as its first word: `flaxattn eval ...`).")
_SPLIT = flags.DEFINE_string("split", None, "eval: the split (default validation and test).")
_INPUT = flags.DEFINE_string("input", None, "decode: input file, one example per line (default stdin).")
_OUTPUT = flags.DEFINE_string("output", None, "decode: output file (default stdout).")
_TEXT = flags.DEFINE_multi_string("text", [], "attend: input text (repeatable; not empty).")
_OUT = flags.DEFINE_string("out", None, "attend: path prefix of the maps (PREFIX_self_layer0.png, "
                           "...; with several --text PREFIX-1_..., PREFIX-2_...); default "
                           "WORKDIR/attention/cli/<the text as a file name>.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 32,
                                       "decode, attend (lm): tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "decode (lm): 0 = greedy, else sampling.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Which checkpoint eval/decode/attend read and the final report uses: "
    "'latest', 'best' (by config.best_checkpoint_metric) or a step (default: config.checkpoint).")
_RESTART = flags.DEFINE_bool("restart", False, "train: move a run already in --workdir aside to "
                             "WORKDIR.old-N and start over (otherwise it is resumed).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the "
                               "resolved config (required).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Join a multi-process run first "
                                 "(flaxattn.parallel.distributed.initialize; it "
                                 "detects TPU VMs and SLURM; implied by --coordinator_address).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes-1.")
# absl's --verbosity, quiet by default here (absl's own default would turn INFO on).
VERBOSITY_HELP = ("Library log level: -1 (default) warnings only, flaxattn's progress lines and "
                  "summary still print; 0 adds the INFO logs of flaxattn, Orbax and absl; 1 debug.")


class UserError(Exception):
  """A bad command line: printed as one line, `error: <message>`, with exit status 2."""


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def help_text(program: str = "flaxattn") -> str:
  """`--help`: the usage, each mode in one line with its own flags, then the common flags."""
  def flag_line(name: str) -> str:
    flag = flags.FLAGS[name]
    text = VERBOSITY_HELP if name == "verbosity" else flag.help.split(";\n")[0]
    if flag.default not in (None, [], "", False) and name != "verbosity":
      text += f" (default {flag.default!r})"
    return textwrap.fill(text, 100, initial_indent=f"    --{name:<20} ",
                         subsequent_indent=" " * 27)
  lines = [f"usage: {program} [MODE] --workdir=DIR [--config=experiments/NAME.py[:variant]] "
           "[--config.KEY=VALUE ...] [flags]",
           f"   or: python -m flaxattn.main --mode=MODE --workdir=DIR ...", "", "modes:"]
  for name, mode in MODES.items():
    lines.append(f"  {name:<8}{mode.summary}")
    lines.extend(flag_line(flag) for flag in mode.flags)
  lines += ["", "flags of every mode:"] + [flag_line(name) for name in COMMON_FLAGS]
  lines += ["", "Modes other than train read WORKDIR/config.json unless --config is given. "
            "Every flag: --helpfull."]
  return "\n".join(lines)


def _argument(argv: list[str], name: str) -> str | None:
  """The value of the last `--name=VALUE` / `--name VALUE` in `argv`, None when absent."""
  value = None
  for index, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def _check_experiment_file(spec: str) -> None:
  """UserError when `--config=PATH[:arg]` names no file (with the nearest experiment's name)."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    directory = os.path.dirname(path) or "."
    known = sorted(name for name in os.listdir(directory) if name.endswith(".py")) if (
        os.path.isdir(directory)) else []
    close = difflib.get_close_matches(os.path.basename(path), known, n=1)
    hint = (f"did you mean {os.path.join(directory, close[0])}?" if close else
            f"{directory} holds {', '.join(known)}" if known else
            "give an experiment file such as experiments/lm_tiny.py")
    raise UserError(f"--config={spec}: no such file; {hint}")


def _load_experiment(spec: str):
  """The ConfigDict of `--config=PATH[:arg]`."""
  _check_experiment_file(spec)
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_flaxattn_experiment", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _check_override(config, arg: str) -> None:
  """UserError naming `--config.a.b=...`'s first key that `config` lacks, with a did-you-mean."""
  dotted = arg[len("--config."):].split("=", 1)[0]
  node, seen = config, []
  for key in dotted.split("."):
    if not isinstance(node, (config_dict.ConfigDict, dict)):
      raise UserError(f"--config.{dotted}: {'.'.join(seen)} is a value, not a section")
    keys = list(node.keys())
    if key not in keys:
      where = f"config.{'.'.join(seen)}" if seen else "the config"
      close = difflib.get_close_matches(key, keys, n=1)
      hint = f"did you mean {close[0]}?" if close else f"its keys: {', '.join(sorted(keys))}"
      raise UserError(f"--config.{dotted}: no such key {key!r} in {where}; {hint}")
    node, seen = node[key], seen + [key]


def _diagnose(argv: list[str], error: Exception) -> str:
  """One line for a command line that absl or ml_collections could not parse."""
  spec = _argument(argv, "config")
  overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
  if spec is not None:
    try:
      config = _load_experiment(spec)  # A missing file raises its own UserError.
    except UserError:
      raise
    except Exception as load_error:  # pylint: disable=broad-except  # A bad variant, a bug in it.
      lines = str(load_error).strip().splitlines() or [type(load_error).__name__]
      return f"--config={spec}: {lines[0]}"
    for arg in overrides:
      _check_override(config, arg)
  elif overrides:
    return f"{overrides[0]}: overrides need --config=experiments/NAME.py"
  message = str(error).strip().splitlines()
  return (message[0] if message else type(error).__name__) + "; see flaxattn --help"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser with `--help` (the modes and their flags), quiet library logs (unless
  `--verbosity`), and one `error:` line instead of a traceback for a bad command line."""
  if any(arg in ("-h", "--help", "-?", "--helpshort") for arg in argv[1:]):
    print(help_text(os.path.basename(argv[0]) if "main.py" not in argv[0] else "flaxattn"))
    sys.exit(0)
  try:
    spec = _argument(argv, "config")
    if spec is not None:
      _check_experiment_file(spec)  # One line, before absl tries to load it.
    try:
      rest = flags.FLAGS(argv)
    except Exception as error:  # pylint: disable=broad-except
      raise UserError(_diagnose(argv, error)) from None
  except UserError as error:
    _fail(str(error))
  if flags.FLAGS["verbosity"].using_default_value:
    flags.FLAGS.verbosity = -1  # Warnings only (absl would turn INFO on).
  return rest



def _run_config(workdir: str):
  """The config of the run in `workdir` (its `config.json`)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"--workdir={workdir} has no config.json (not a training run's workdir); "
                    "give --config or the workdir of a run")
  with open(path) as f:
    return config_dict.ConfigDict(json.load(f))


def check_arguments(argv: list[str]) -> None:
  """UserError for what is wrong with the flags of this mode, before anything is built."""
  mode, workdir = _MODE.value, _WORKDIR.value
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}: flags take --name=VALUE")
  if mode == "summary" and _CONFIG.value is not None and not workdir:
    return  # The summary of a config needs no run.
  if not workdir:
    raise UserError("--workdir is required: the run's directory (see flaxattn --help)")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a directory; give a directory")
  if mode == "train" and _CONFIG.value is None:
    raise UserError("--config is required to train, e.g. --config=experiments/lm_tiny.py")
  if mode != "train" and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir}: no such directory; {mode} reads a trained run's workdir")
  if mode == "attend":
    if not _TEXT.value:
      raise UserError('attend needs --text="..." (repeatable)')
    empty = [text for text in _TEXT.value if not text.strip()]
    if empty:
      raise UserError(f"--text={empty[0]!r} is empty; give the text to look at")
  if mode == "decode":
    if _INPUT.value is not None and not os.path.isfile(_INPUT.value):
      raise UserError(f"--input={_INPUT.value}: no such file; give a file with one input per "
                      "line, or none to read stdin")
    folder = os.path.dirname(_OUTPUT.value or "") or "."
    if _OUTPUT.value is not None and not os.path.isdir(folder):
      raise UserError(f"--output={_OUTPUT.value}: no directory {folder}")
  if _OUT.value is not None and mode == "attend":
    folder = os.path.dirname(_OUT.value) or "."
    if os.path.exists(folder) and not os.path.isdir(folder):
      raise UserError(f"--out={_OUT.value}: {folder} is a file, not a directory")
  if _SPLIT.value is not None and mode != "eval":
    raise UserError(f"--split={_SPLIT.value} is an eval flag; {mode} does not read it")


def main(argv):
  try:
    check_arguments(argv)
    _main()
  except UserError as error:
    _fail(str(error))


def _main():
  # Deferred, like the loop (jax): --help and bad flags fail fast.
  from flaxattn.config import validate
  if _DISTRIBUTED.value or _COORDINATOR.value:
    from flaxattn.parallel import distributed
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value
  if config is None:
    config = _run_config(_WORKDIR.value)
  if _CHECKPOINT.value is not None or "checkpoint" not in config:  # (config.json of older runs)
    with config.unlocked():
      config.checkpoint = _CHECKPOINT.value or "latest"
  try:
    validate(config)
  except ValueError as error:
    raise UserError(str(error)) from None
  if _MODE.value == "train":
    from flaxattn.train.loop import RunRefused, train_and_evaluate
    try:
      train_and_evaluate(config, _WORKDIR.value, restart=_RESTART.value)
    except RunRefused as error:
      raise UserError(str(error)) from None
    return
  if _MODE.value == "summary":  # The model built abstractly: its parameter table, nothing trained.
    from flaxattn.train.inference import model_summary
    print(model_summary(config, _WORKDIR.value).table("param"))
    return
  from flaxattn.train import inference
  try:
    _use_checkpoint(config, inference)
  except inference.BadRequest as error:
    raise UserError(str(error)) from None


def _use_checkpoint(config, inference) -> None:
  """The eval, decode and attend modes."""
  import jax
  from flaxattn.train import console
  if _MODE.value == "eval":
    splits = [_SPLIT.value] if _SPLIT.value else None
    results = inference.evaluate_checkpoint(config, _WORKDIR.value, splits)
    for split, metrics in results.items():
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
      console.say(f"{len(outputs)} outputs in {_OUTPUT.value}")
    else:
      sys.stdout.write(text)
  else:
    results = inference.attend(config, _WORKDIR.value, _TEXT.value, out=_OUT.value,
                               max_new_tokens=_MAX_NEW_TOKENS.value)
    if jax.process_index() == 0:
      for result in results:
        print(result.describe())


def run():
  """Entry point of the `flaxattn` console script: `flaxattn [MODE] --workdir=DIR ...`."""
  if len(sys.argv) > 1 and sys.argv[1] in MODES:
    sys.argv[1:2] = [f"--mode={sys.argv[1]}"]
  elif len(sys.argv) > 1 and sys.argv[1] == "help":
    sys.argv[1:2] = ["--help"]
  elif len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    _fail(f"no mode {sys.argv[1]!r}; the modes are {', '.join(MODES)} (flaxattn --help)")
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
