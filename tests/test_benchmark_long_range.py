"""Plumbing of benchmarks/long_range.py: subprocess workers, unavailable implementations, the files it
writes. Tiny sizes only; the measured numbers themselves are not checked here."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "long_range.py"


@pytest.mark.slow
def test_measures_and_writes_results(tmp_path):
  spec = importlib.util.spec_from_file_location("long_range_benchmark", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  report = script.main(["--impls", "linear,ring", "--lengths", "64", "--repeats", "1",
                        "--timeout", "300", "--listops-length", "32", "--listops-min-length", "8",
                        "--listops-steps", "2", "--listops-batch", "4", "--listops-test", "8",
                        "--out", str(tmp_path)])
  linear = report["speed"]["linear"]["64"]
  assert linear["seconds"] > 0 and isinstance(linear["peak_bytes"], int), linear
  listops = report["listops"]["linear"]
  assert 0.0 <= listops["accuracy"] <= 1.0 and 0.0 <= listops["majority_accuracy"] <= 1.0, listops
  ring = report["speed"]["ring"]["64"]
  assert "seconds" in ring or ring["status"].startswith("not available"), ring
  assert "accuracy" in report["listops"]["ring"], report["listops"]["ring"]
  assert json.loads((tmp_path / "results.json").read_text()) == report
  table = (tmp_path / "results.md").read_text()
  assert "| linear |" in table and "ListOps accuracy" in table
  assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.slow
def test_no_speed_runs_listops_only(tmp_path):
  spec = importlib.util.spec_from_file_location("long_range_benchmark", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  report = script.main(["--impls", "linear", "--no-speed", "--listops-length", "32",
                        "--listops-min-length", "8", "--listops-steps", "2", "--listops-batch", "4",
                        "--listops-test", "8", "--out", str(tmp_path)])
  assert report["speed"] == {} and "accuracy" in report["listops"]["linear"], report
  table = (tmp_path / "results.md").read_text()
  assert "Training-step time" not in table and "| linear |" in table
  assert not (tmp_path / "results.png").exists()


def test_bad_arguments_are_named(capsys):
  spec = importlib.util.spec_from_file_location("long_range_benchmark", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  with pytest.raises(SystemExit):
    script.parse_args(["--window", "0", "--listops-steps", "-3"])
  assert "must be positive: --window=0, --listops-steps=-3" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    script.parse_args(["--impls", "flash"])
  assert "--impls: unknown ['flash']" in capsys.readouterr().err
