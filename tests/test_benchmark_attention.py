"""Plumbing of benchmarks/attention.py: subprocess workers, error reporting, the files it writes.

Tiny sizes only; the measured numbers themselves are not checked here.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("attention_benchmark", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_measures_and_writes_results(script, tmp_path):
  pytest.importorskip("torch", reason="the benchmark times torch SDPA as a peer")
  report = script.main(["--lengths", "64", "--impls", f"reference,{script.TORCH}",
                           "--causal", "yes", "--repeats", "2", "--matmul-size", "64",
                           "--timeout", "120", "--out", str(tmp_path)])
  assert report["environment"]["matmul_gflops"] > 0
  assert [(row["implementation"], row["length"], row["causal"]) for row in report["results"]] == [
      ("reference", 64, True), (script.TORCH, 64, True)]
  for row in report["results"]:
    for mode in script.MODES:
      result = row[mode]
      assert result["seconds"] > 0 and result["gflops"] > 0, row
      assert isinstance(result["peak_bytes"], int), row
  assert json.loads((tmp_path / "results.json").read_text()) == report
  table = (tmp_path / "results.md").read_text()
  assert "| reference | True | 64 |" in table and f"| {script.TORCH} | True | 64 |" in table
  assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reports_estimated_oom_and_timeout(script, tmp_path):
  """A dense implementation too big for memory is not started; a slow worker is cut off."""
  length = 2**20  # reference: 8 heads * 2^40 scores, tens of TiB
  report = script.main(["--lengths", str(length), "--impls", f"reference,{script.TORCH}",
                           "--causal", "no", "--timeout", "0.05", "--matmul-size", "64",
                           "--out", str(tmp_path)])
  dense, torch_row = report["results"]
  for mode in script.MODES:
    assert dense[mode]["status"].startswith("OOM (estimated "), dense
    assert torch_row[mode]["status"] == "timeout > 0.05s", torch_row
  assert "OOM (estimated" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "must be positive: --repeats=0"),
    (["--lengths", "1024,0", "--timeout", "-1"], "must be positive: --timeout=-1.0, --lengths=[1024, 0]"),
    (["--lengths", "1k"], "--lengths must be comma-separated integers, got '1k'"),
])
def test_bad_arguments_are_named(script, argv, message, capsys):
  with pytest.raises(SystemExit):
    script.parse_args(argv)
  assert message in capsys.readouterr().err
