"""Test setup: 8 simulated CPU devices, configured before any backend use; runs that several test
files check, trained once per session."""

import jax
import pytest

from launch_support import LM_TINY_TWO_PROCESS_FLAGS, launch_lm_tiny

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


@pytest.fixture(scope="session")
def lm_tiny_two_processes(tmp_path_factory):
  """The workdir of an uninterrupted 2 x 4 lm_tiny run with LM_TINY_TWO_PROCESS_FLAGS: the
  reference of tests/test_launch.py (one process: same losses) and tests/test_preemption.py (a
  preempted and resumed run: same metrics and parameters); its console output (both processes,
prefixed `[0] ` and `[1] `) is in `output.txt` beside it."""
  workdir = tmp_path_factory.mktemp("lm_tiny_two_processes") / "workdir"
  run = launch_lm_tiny(workdir, *LM_TINY_TWO_PROCESS_FLAGS)
  output = run.communicate(timeout=900)[0]
  assert run.returncode == 0, output[-3000:]
  (workdir.parent / "output.txt").write_text(output)  # The console, for tests/test_cli.py.
  return workdir
