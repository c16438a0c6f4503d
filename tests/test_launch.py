"""`launch/local.py`: a 2-process run (jax.distributed on localhost, CPU collectives) trains,
checkpoints, and logs the same losses as one process with the same 8 devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flaxattn.config import validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import lm_tiny  # noqa: E402


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [(r["step"], r["loss"], r.get("eval_loss")) for r in map(json.loads, f)]


@pytest.mark.slow
def test_two_processes_match_one(lm_tiny_two_processes, tmp_path):
  from flaxattn.train.loop import train_and_evaluate
  multi = lm_tiny_two_processes  # Trained once per session (tests/conftest.py).
  assert sorted(os.listdir(multi / "checkpoints")) == ["20", "40", "60"]

  config = lm_tiny.get_config()
  config.update(steps=60, log_every=5, checkpoint_every=20, eval_every=40)  # The fixture's flags.
  validate(config)
  train_and_evaluate(config, str(tmp_path / "one_process"))
  got, want = losses(multi), losses(tmp_path / "one_process")
  assert [r[0] for r in got] == [r[0] for r in want] == list(range(5, 61, 5))
  # Cross-process gloo all-reduces add in another order than one process: float32 rounding.
  np.testing.assert_allclose([r[1] for r in got], [r[1] for r in want], rtol=1e-4)
  np.testing.assert_allclose([r[2] for r in got if r[2]], [r[2] for r in want if r[2]], rtol=1e-4)


def test_local_launcher_rejects_bad_counts():
  result = subprocess.run([sys.executable, "launch/local.py", "--processes=0"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "--processes and --devices_per_process must be >= 1" in result.stderr


def test_tpu_vm_dry_run_prints_the_gcloud_commands():
  result = subprocess.run(
      ["bash", "launch/tpu_vm.sh", "--dry-run", "--name=run-1", "--zone=us-central2-b",
       "--project=proj", "--accelerator=v4-16", "--runtime=tpu-ubuntu2204-base", "--spot", "all",
       "--", "--config=experiments/lm_tiny.py:sharded", "--workdir=/mnt/shared/run 1"],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  location = "--zone=us-central2-b --project=proj"
  ssh = f"gcloud compute tpus tpu-vm ssh run-1 {location} --worker=all --command="
  assert result.stdout.splitlines() == [
      f"gcloud compute tpus queued-resources create run-1 --node-id=run-1 {location} "
      "--accelerator-type=v4-16 --runtime-version=tpu-ubuntu2204-base --spot",
      f"gcloud compute tpus queued-resources describe run-1 {location} "
      "--format=value\\(state.state\\)",
      f"gcloud compute tpus tpu-vm scp --recurse {REPO} run-1:\\~/flaxattn {location} --worker=all",
      ssh + "pip\\ install\\ -U\\ \\'jax\\[tpu\\]\\'\\ \\&\\&\\ pip\\ install\\ -e\\ ~/flaxattn",
      # The flags reach every worker intact, the space in the workdir quoted twice (local, remote).
      ssh + "cd\\ ~/flaxattn\\ \\&\\&\\ python\\ -m\\ flaxattn.main\\ --distributed\\ "
      "--config=experiments/lm_tiny.py:sharded\\ --workdir=/mnt/shared/run\\\\\\ 1",
      f"gcloud compute tpus queued-resources delete run-1 {location} --force --quiet",
  ]
  result = subprocess.run(["bash", "launch/tpu_vm.sh", "--name=x", "run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "--zone is required" in result.stderr
