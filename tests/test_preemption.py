"""A run is never lost: SIGTERM saves and exits without evaluating, every process stopping at the
same step, and the rerun resumes exactly; a workdir whose run has another config is refused with the
differing keys named and its files untouched (`--restart` moves it aside); `config.checkpoint`
picks latest, best or a step for the report and the eval mode."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.config import base_config, config_changes, validate
from flaxattn.train import Checkpointer, load_params
from flaxattn.train.checkpoint import CheckpointMismatch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import lm_tiny  # noqa: E402
from launch_support import LM_TINY_TWO_PROCESS_FLAGS, launch_lm_tiny  # noqa: E402
from tests.test_checkpoint import read_metrics  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_force_host_platform_device_count=8")


def files(workdir) -> dict[str, str]:
  """Relative path -> SHA-256 of every file under `workdir`."""
  digests = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      digests[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return digests


def test_config_changes_name_the_keys_that_matter():
  old = json.loads(base_config().to_json())
  del old["checkpoint"]  # A config.json written before the key existed: its default.
  new = base_config()
  new.model.d_model, new.optimizer.name, new.data.vocab_size = 96, "sgd", 1000
  # Loop lengths, evaluation, reporting and the mesh may change on resume.
  new.update(steps=5, eval_every=7, checkpoint="best")
  new.mesh.data, new.eval.batch_size, new.report.attention_examples = 2, 4, 0
  assert config_changes(old, new) == ["data.vocab_size: None -> 1000", "model.d_model: 512 -> 96",
                                      "optimizer.name: 'adamw' -> 'sgd'"]
  assert config_changes(old, base_config()) == []
  bad = lm_tiny.get_config()
  bad.checkpoint = "newest"
  with pytest.raises(ValueError, match=r"config.checkpoint \(--checkpoint\) must be 'latest', "
                                       r"'best' or a step number, got 'newest'"):
    validate(bad)


def test_checkpoint_that_does_not_fit_is_refused_not_skipped(tmp_path):
  checkpointer = Checkpointer(tmp_path, keep=1)
  for step in (1, 2):
    checkpointer.save(step, {"w": jnp.zeros(4), "b": jnp.ones(2)}, data_state=step)
  checkpointer.wait()
  before = files(tmp_path)
  wider = {"w": jax.ShapeDtypeStruct((5,), jnp.float32),
           "b": jax.ShapeDtypeStruct((2,), jnp.float32)}
  with pytest.raises(CheckpointMismatch, match=r"checkpoint 2 .* w: \(\(4,\), 'float32'\) -> "
                                               r"\(\(5,\), 'float32'\)"):
    checkpointer.restore_latest(wider)
  other = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with pytest.raises(CheckpointMismatch, match=r"b: \(\(2,\), 'float32'\) -> absent"):
    checkpointer.restore_latest(other)
  checkpointer.close()
  assert files(tmp_path) == before and not os.path.exists(f"{tmp_path}.corrupt")


def tiny_config(**overrides):
  config = lm_tiny.get_config()
  config.update(steps=4, log_every=2, eval_every=2, checkpoint_every=2, eval_batches=1,
                checkpoint="best")
  config.update(overrides)
  validate(config)
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step lm_tiny run evaluated and saved at steps 2 and 4, reported on its best checkpoint."""
  from flaxattn.train.loop import train_and_evaluate
  workdir = tmp_path_factory.mktemp("run") / "workdir"
  train_and_evaluate(tiny_config(), str(workdir))
  return workdir


@pytest.mark.slow
def test_changed_model_is_refused_untouched_and_restart_moves_it_aside(trained, tmp_path):
  from flaxattn.train.loop import train_and_evaluate
  import shutil
  workdir = tmp_path / "workdir"
  shutil.copytree(trained, workdir)
  before = files(workdir)
  changed = tiny_config()
  changed.model.d_model = 96
  changed.optimizer.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r"holds a run with another config \(model.d_model: 64 -> "
                                       r"96; optimizer.learning_rate: 0.003 -> 0.001; old -> new\)"):
    train_and_evaluate(changed, str(workdir))
  assert files(workdir) == before
  changed.steps = 2
  train_and_evaluate(changed, str(workdir), restart=True)
  assert files(tmp_path / "workdir.old-1") == before
  assert json.load(open(workdir / "config.json"))["model"]["d_model"] == 96
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]


@pytest.mark.slow
def test_report_and_eval_use_the_chosen_checkpoint(trained):
  from flaxattn.train import inference
  evaluated = {r["step"]: r["eval_loss"] for r in read_metrics(trained) if "eval_loss" in r}
  assert sorted(evaluated) == [2, 4]
  best = min(evaluated, key=evaluated.get)
  assert f"checkpoint best (step {best})" in open(trained / "report.md").read()
  for checkpoint, step in (("2", 2), ("latest", 4), ("best", best)):
    config = tiny_config(checkpoint=checkpoint)
    loss = inference.evaluate_checkpoint(config, str(trained))["eval"]["loss"]
    # The eval mode reads the same batches as the loop's evaluation did at that step.
    assert loss == pytest.approx(evaluated[step], rel=1e-5), checkpoint
  with pytest.raises(ValueError,
                     match=r"^no checkpoint at step 3 in .* \(available steps: \[2, 4\]\)$"):
    inference.evaluate_checkpoint(tiny_config(checkpoint="3"), str(trained))
  with pytest.raises(ValueError, match="checkpoint='best' needs config.best_checkpoint_metric"):
    tiny_config(best_checkpoint_metric="")


def wait_for(path, process, timeout=300):
  deadline = time.time() + timeout
  while not os.path.isdir(path):
    assert process.poll() is None, "the run ended too early"
    assert time.time() < deadline, f"no {path} after {timeout} s"
    time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_exits_within_seconds_despite_an_expensive_evaluation(tmp_path):
  # The only evaluation is the final one, over 5000 batches (minutes): SIGTERM must not run it.
  overrides = ["--config.steps=100000", "--config.log_every=5", "--config.checkpoint_every=20",
               "--config.eval_every=0", "--config.eval_batches=5000"]
  process = subprocess.Popen(
      [sys.executable, "-m", "flaxattn.main", "--config=experiments/lm_tiny.py",
       f"--workdir={tmp_path}", *overrides], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    wait_for(tmp_path / "checkpoints" / "20", process)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    seconds = time.monotonic() - sent
  finally:
    if process.poll() is None:
      process.kill()
  saved = sorted(int(step) for step in os.listdir(tmp_path / "checkpoints") if step.isdigit())
  print(f"SIGTERM to exit: {seconds:.1f} s (stopped at step {saved[-1]})")
  assert process.returncode == 0, stderr[-3000:]
  assert saved[-1] > 20 and read_metrics(tmp_path)[-1]["step"] == saved[-1]
  assert not any(key.startswith("eval_") for key in read_metrics(tmp_path)[-1])
  assert not os.path.exists(tmp_path / "report.md")
  assert seconds < 30, f"{seconds:.1f} s from SIGTERM to exit"


def process_of(workdir, index: int) -> int:
  """The pid of the flaxattn.main process `index` training in `workdir`."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      args = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
      continue
    if f"--workdir={workdir}" in args and f"--process_id={index}" in args:
      return int(pid)
  raise AssertionError(f"no process {index} in {workdir}")


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes(
    lm_tiny_two_processes, tmp_path):
  overrides = LM_TINY_TWO_PROCESS_FLAGS
  uninterrupted = lm_tiny_two_processes  # Trained once per session (tests/conftest.py).

  workdir = tmp_path / "preempted"
  run = launch_lm_tiny(workdir, *overrides)
  try:
    wait_for(workdir / "checkpoints" / "20", run)
    sent = time.monotonic()
    os.kill(process_of(workdir, 1), signal.SIGTERM)
    output = run.communicate(timeout=300)[0]
    seconds = time.monotonic() - sent
  finally:
    if run.poll() is None:
      run.kill()
  assert run.returncode == 0, output[-3000:]
  stops = sorted(line.split("] ")[0] + " " + line.split("stopped at step ")[1].split()[0]
                 for line in output.splitlines() if "preempted: stopped at step" in line)
  saved = sorted(int(step) for step in os.listdir(workdir / "checkpoints") if step.isdigit())
  print(f"SIGTERM (one process) to exit of both: {seconds:.1f} s; stops {stops}")
  assert stops == [f"[0 {saved[-1]}", f"[1 {saved[-1]}"] and 20 < saved[-1] < 60

  resumed = launch_lm_tiny(workdir, *overrides)
  output = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, output[-3000:]
  want = read_metrics(uninterrupted)
  assert [r for r in read_metrics(workdir) if r["step"] % 5 == 0] == want
  for got, expected in zip(jax.tree.leaves(load_params(workdir, 60)),
                           jax.tree.leaves(load_params(uninterrupted, 60))):
    np.testing.assert_array_equal(got, expected)
