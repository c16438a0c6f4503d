"""Every experiment's ':smoke' variant end to end on its real corpus: train, evaluate (validation
and test), checkpoint, report; then the eval / decode / attend modes on the trained runs."""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

from flaxattn.config import validate
from test_report import read_events

ROOT = pathlib.Path(__file__).resolve().parents[1]
# experiment -> metrics its final record must hold (finite).
EXPECTED = {
    "sentiment_tweets": ("eval_accuracy", "eval_macro_f1", "test_accuracy", "test_macro_f1",
                         "baseline_tfidf_test_accuracy"),
    "lm_ptb": ("eval_perplexity", "test_perplexity"),
    "translate_bible": ("eval_loss", "test_bleu", "test_chrf"),
    "simplify_bible": ("test_rouge1", "test_rouge2", "test_rougeL", "test_bleu"),
    "listops": ("eval_accuracy", "test_accuracy"),
    "sequence_tasks": ("test_accuracy", "test_bleu"),
}


def experiment_config(name: str, variant: str = "smoke"):
  spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  validate(config)
  return config


_RUNS = {}


def trained(name: str, tmp_path_factory):
  """The workdir and final record of `name:smoke`, trained once per test session."""
  if name not in _RUNS:
    from flaxattn.train.loop import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp(name))
    _RUNS[name] = workdir, train_and_evaluate(experiment_config(name), workdir)
  return _RUNS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_smoke_variant_trains_evaluates_and_reports(name, tmp_path_factory):
  workdir, record = trained(name, tmp_path_factory)
  for metric in EXPECTED[name]:
    assert metric in record and math.isfinite(record[metric]), (metric, sorted(record))
  assert record["step"] == experiment_config(name).steps
  files = set(os.listdir(workdir))
  assert {"report.md", "report.json", "learning_curves.png", "metrics.jsonl", "config.json",
          "checkpoints", "tokenizer", "summary.txt"} <= files
  report = (pathlib.Path(workdir) / "report.md").read_text()
  assert "learning_curves.png" in report and "attention" in report
  pngs = list(pathlib.Path(workdir, "attention").rglob("*.png"))
  assert pngs, "no attention maps were drawn"
  # Drawn once at the end (not also by the last evaluation), each image logged once.
  steps = experiment_config(name).steps
  assert not os.path.exists(os.path.join(workdir, "attention", f"step_{steps}"))
  images = [(event.step, value.tag) for event in read_events(os.path.join(workdir, "tensorboard"))
            for value in event.summary.value if value.HasField("image")]
  assert images and len(images) == len(set(images)), images
  assert matplotlib.image.imread(pngs[0]).shape[0] > 50
  with open(os.path.join(workdir, "report.json")) as f:
    saved = json.load(f)
  assert saved[EXPECTED[name][0]] == pytest.approx(record[EXPECTED[name][0]])


@pytest.mark.slow
def test_eval_mode_reproduces_the_final_metrics(tmp_path_factory):
  from flaxattn.train import inference
  workdir, record = trained("sentiment_tweets", tmp_path_factory)
  config = experiment_config("sentiment_tweets")
  results = inference.evaluate_checkpoint(config, workdir, ["test"])
  assert results["test"]["accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)
  assert os.path.isfile(os.path.join(workdir, "eval_test.json"))


@pytest.mark.slow
def test_decode_and_attend_modes(tmp_path_factory):
  from flaxattn.train import inference
  workdir, _ = trained("translate_bible", tmp_path_factory)
  config = experiment_config("translate_bible")
  outputs = inference.decode_lines(config, workdir, ["In the beginning God created the heaven.",
                                                     "And God said, Let there be light."])
  assert len(outputs) == 2 and all(isinstance(line, str) for line in outputs)
  paths = inference.attend(config, workdir, ["And God saw the light."])
  assert any("align" in os.path.basename(path) or "cross" in path for path in paths), paths
  # The console script's `attend` word reads the run's own config.json.
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from flaxattn.main import run; sys.argv[0] = 'flaxattn';"
       " run()", "attend", f"--workdir={workdir}", "--text=And there was light."],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(line.endswith(".png") for line in result.stdout.splitlines()), result.stdout
