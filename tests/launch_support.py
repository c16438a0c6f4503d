"""lm_tiny on 2 processes x 4 devices (`launch/local.py`), as tests/test_launch.py and
tests/test_preemption.py run it; the uninterrupted run is the session fixture
`lm_tiny_two_processes` (tests/conftest.py)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 60 steps: room for a preemption between the checkpoints at 20 and 60.
LM_TINY_TWO_PROCESS_FLAGS = ["--config.steps=60", "--config.log_every=5",
                             "--config.checkpoint_every=20", "--config.eval_every=40"]


def launch_lm_tiny(workdir, *overrides):
  """Starts experiments/lm_tiny.py on 2 processes x 4 devices in `workdir` (not waited for)."""
  return subprocess.Popen(
      [sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=4", "--",
       "--config=experiments/lm_tiny.py", f"--workdir={workdir}", *overrides], cwd=REPO,
      env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
