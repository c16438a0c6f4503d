"""Plumbing of benchmarks/flex.py: every row of both cases runs at a tiny length (numbers not checked)."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "flex.py"


@pytest.mark.slow
def test_rows_of_both_cases_run():
  spec = importlib.util.spec_from_file_location("flex_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  results = module.main(["--lengths", "256", "--cases", "documents", "alibi", "--repeats", "1",
                         "--no-torch", "--heads", "2", "--head-dim", "8", "--doc-min", "64",
                         "--doc-max", "128"])
  expected = {("documents", 256, mode, name) for mode in ("fwd", "fwd+bwd")
              for name in ("flex", "blockwise dense mask", "blockwise segment ids", "xla",
                           "flex (mask given)")}
  expected |= {("alibi", 256, mode, name) for mode in ("fwd", "fwd+bwd")
               for name in ("flex", "blockwise dense bias", "xla")}
  assert set(results) == expected
  assert all(wall > 0 and cpu >= 0 for wall, cpu in results.values())
