"""The command line (`python -m flaxattn.main`, the `flaxattn` script): `--help`, one `error:` line
for each kind of bad input (before any model is built), and the console of a finished run."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from flaxattn.train import console

ROOT = pathlib.Path(__file__).resolve().parents[1]
# absl's prefix of an INFO line: 'I1202 06:07:47.937157 139836269009792 loop.py:163] ...'.
ABSL_INFO = re.compile(r"^I\d{4} \d\d:\d\d:\d\d", re.MULTILINE)


def flaxattn(*args, script: bool = False, timeout: int = 120) -> subprocess.CompletedProcess:
  """Runs the command line in a subprocess (as `flaxattn ...` when `script`)."""
  command = ([sys.executable, "-c", "import sys; from flaxattn.main import run; "
              "sys.argv[0] = 'flaxattn'; run()"] if script else
             [sys.executable, "-m", "flaxattn.main"])
  return subprocess.run(command + list(args), capture_output=True, text=True, timeout=timeout,
                        cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                       "PYTHONPATH": str(ROOT)})


def assert_one_error_line(result: subprocess.CompletedProcess, *names: str) -> str:
  """The run failed with one `error:` line, the last of stderr, naming every one of `names`, and
  no traceback; returns that line."""
  assert result.returncode not in (0, None), result
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines and lines[-1].startswith("error: "), result.stderr[-3000:]
  assert len(lines) == 1, lines  # Nothing else: these fail before any library logs.
  for name in names:
    assert name in lines[-1], (name, lines[-1])
  return lines[-1]


def test_help_lists_every_mode_and_its_flags():
  from flaxattn.main import COMMON_FLAGS, MODES
  for result in (flaxattn("--help"), flaxattn("help", script=True)):
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: flaxattn [MODE] --workdir=DIR")
    for name, mode in MODES.items():
      at = next(i for i, line in enumerate(lines) if line.startswith(f"  {name} "))
      assert mode.summary in lines[at]
      following = lines[at + 1:]
      own = following[:next((i for i, line in enumerate(following) if not line.startswith(" " * 4)),
                            len(following))]
      assert {f"--{flag}" for flag in mode.flags} == {
          line.split()[0] for line in own if line.startswith("    --")}, (name, own)
    for flag in COMMON_FLAGS:
      assert any(line.startswith(f"    --{flag} ") for line in lines), flag
    assert len(lines) < 50  # A screen, not absl's hundreds of flags.


@pytest.mark.parametrize("args, names", [
    (["--config.trian.steps=3"], ["--config.trian.steps", "'trian'", "steps"]),
    (["--config.stpes=3"], ["--config.stpes", "did you mean steps?"]),
    (["--config.optimizer.lerning_rate=1e-3"], ["lerning_rate", "config.optimizer",
                                                "did you mean learning_rate?"]),
], ids=["section", "key", "nested key"])
def test_misspelt_config_key(args, names, tmp_path):
  assert_one_error_line(flaxattn("--config=experiments/lm_tiny.py", f"--workdir={tmp_path}",
                                 *args), *names)


@pytest.mark.parametrize("args, names", [
    (["--config=experiments/nope.py"], ["--config=experiments/nope.py", "no such file",
                                        "lm_tiny.py"]),
    (["--config=experiments/lm_tny.py"], ["lm_tny.py", "did you mean experiments/lm_tiny.py?"]),
    (["--config=experiments/lm_tiny.py:nope"], ["lm_tiny.py:nope", "'nope'", "bf16"]),
    (["--config=experiments/lm_tiny.py", "--config.steps=abc"], ["--config.steps=abc"]),
    (["--mode=nope"], ["--mode=nope", "train"]),
    (["--mode=train"], ["--config is required"]),
], ids=["missing experiment", "near miss", "bad variant", "bad value", "bad mode", "no config"])
def test_bad_config_or_mode(args, names, tmp_path):
  assert_one_error_line(flaxattn(f"--workdir={tmp_path}", *args), *names)


def test_workdir_that_is_a_file(tmp_path):
  path = tmp_path / "notes.txt"
  path.write_text("not a run")
  assert_one_error_line(flaxattn(f"--workdir={path}"), f"--workdir={path}", "is a file")
  assert path.read_text() == "not a run"


def test_missing_workdir_flag():
  assert_one_error_line(flaxattn("--mode=eval"), "--workdir is required")


def test_modes_check_their_own_flags(tmp_path):
  # Each fails before the workdir is read: the workdir is an empty directory.
  assert_one_error_line(flaxattn("attend", f"--workdir={tmp_path}", "--text=", script=True),
                        "--text=''", "empty")
  assert_one_error_line(flaxattn("attend", f"--workdir={tmp_path}", "--text=ok", "--text=  ",
                                 script=True), "--text='  '", "empty")
  assert_one_error_line(flaxattn("attend", f"--workdir={tmp_path}", script=True), "--text")
  assert_one_error_line(flaxattn("decode", f"--workdir={tmp_path}", "--input=/no/such/file",
                                 script=True), "--input=/no/such/file", "no such file")
  assert_one_error_line(flaxattn("eval", f"--workdir={tmp_path / 'absent'}", script=True),
                        "absent", "no such directory")
  assert_one_error_line(flaxattn("eval", f"--workdir={tmp_path}", script=True),
                        "no config.json")
  assert_one_error_line(flaxattn("evaluate", f"--workdir={tmp_path}", script=True),
                        "'evaluate'", "eval")


def test_summary_lines_put_the_baseline_beside_the_metrics():
  record = {"step": 30, "loss": 1.0, "eval_accuracy": 0.5, "eval_macro_f1": 0.25,
            "eval_examples": 3717.0, "eval_z_loss": 0.0, "test_accuracy": 0.625,
            "test_macro_f1": 0.375, "baseline_tfidf_validation_accuracy": 0.75,
            "baseline_tfidf_validation_C": 3.0, "baseline_tfidf_test_accuracy": 0.875,
            "baseline_tfidf_test_macro_f1": 0.8125}
  lines = console.summary_lines(record, title="tweets (classification)", workdir="/w",
                                seconds=125, checkpoint="best, step 30")
  assert "tweets (classification): done in 2:05, step 30" in lines[1]
  assert lines[2].split() == ["validation", "test", "TFIDF", "val", "TFIDF", "test"]
  rows = {line.split()[0]: line.split()[1:] for line in lines[3:] if line.startswith("  ")}
  assert rows["accuracy"] == ["0.5000", "0.6250", "0.7500", "0.8750"]
  assert rows["macro_f1"] == ["0.2500", "0.3750", "-", "0.8125"]
  assert "examples" not in rows and "z_loss" not in rows and "C" not in rows
  assert rows["report"] == ["/w/report.md"] and rows["tensorboard"][-1] == "/w/tensorboard"


@pytest.mark.slow
def test_two_process_run_prints_once_and_quietly(lm_tiny_two_processes):
  """Only process 0 prints phase lines and the summary; no absl INFO line from either process."""
  output = (lm_tiny_two_processes.parent / "output.txt").read_text()
  assert not ABSL_INFO.search(re.sub(r"^\[\d\] ", "", output, flags=re.MULTILINE)), output[-3000:]
  summaries = [line for line in output.splitlines() if ": done in " in line]
  assert len(summaries) == 1 and summaries[0].startswith("[0] "), summaries
  assert f"{lm_tiny_two_processes}/report.md" in output
  assert not re.search(r"^\[1\] \[\d+:\d\d\] ", output, re.MULTILINE), output[-3000:]


@pytest.mark.parametrize("flag, level", [(None, 30), ("--verbosity=0", 20), ("--verbosity=1", 10)])
def test_library_logs_are_quiet_unless_asked(flag, level):
  """Python's logging level under the command line's absl handler: WARNING by default (absl
  alone would say INFO), INFO with --verbosity=0, DEBUG with 1."""
  probe = ("import logging, sys; from flaxattn import main; "
           "main.main = lambda argv: print(logging.getLogger('orbax').getEffectiveLevel(), "
           "logging.getLogger('absl').getEffectiveLevel()); main.run()")
  result = subprocess.run(
      [sys.executable, "-c", probe, "--mode=eval", "--workdir=.", *([flag] if flag else [])],
      capture_output=True, text=True, timeout=60, cwd=ROOT,
      env={**os.environ, "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == [str(level), str(level)]


def test_workdir_of_another_run_is_refused_in_one_line(tmp_path):
  from flaxattn.config import base_config
  (tmp_path / "config.json").write_text(base_config().to_json())  # A run of another config.
  before = sorted(os.listdir(tmp_path))
  assert_one_error_line(flaxattn("--config=experiments/lm_tiny.py", f"--workdir={tmp_path}"),
                        f"--workdir={tmp_path} holds a run with another config", "--restart")
  assert sorted(os.listdir(tmp_path)) == before
