"""Test setup: 8 simulated CPU devices, configured before any backend use; one compilation cache
for the session's subprocesses; runs that several test files check, trained once per session."""

import os
import shutil
import tempfile

import jax
import pytest

from launch_support import LM_TINY_TWO_PROCESS_FLAGS, launch_lm_tiny

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", None)  # Even if the one below was inherited.

# The `flaxattn.main` subprocesses (2-process launches, preempted and resumed runs, eval / decode /
# attend modes) compile the same programs again and again: they share a disk cache, new every
# session so that each run starts cold. This process keeps its cache in memory only.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # Else a given cache, or a pytest-xdist worker's.
  _SESSION_CACHE = tempfile.mkdtemp(prefix="flaxattn-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE


def pytest_unconfigure(config):
  del config
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def lm_tiny_two_processes(tmp_path_factory):
  """The workdir of an uninterrupted 2 x 4 lm_tiny run with LM_TINY_TWO_PROCESS_FLAGS: the
  reference of tests/test_launch.py (one process: same losses) and tests/test_preemption.py (a
  preempted and resumed run: same metrics and parameters)."""
  workdir = tmp_path_factory.mktemp("lm_tiny_two_processes") / "workdir"
  run = launch_lm_tiny(workdir, *LM_TINY_TWO_PROCESS_FLAGS)
  output = run.communicate(timeout=900)[0]
  assert run.returncode == 0, output[-3000:]
  return workdir
