"""Every experiment's ':smoke' variant end to end on its real corpus: train, evaluate (validation
and test), checkpoint, report; then the eval / decode / attend modes on the trained runs."""

import contextlib
import importlib.util
import io
import json
import math
import os
import pathlib
import re
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
_PRINTED = {}  # name -> what its training printed on stdout (the summary).


def trained(name: str, tmp_path_factory):
  """The workdir and final record of `name:smoke`, trained once per test session."""
  if name not in _RUNS:
    from flaxattn.train.loop import train_and_evaluate
    workdir = str(tmp_path_factory.mktemp(name))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      _RUNS[name] = workdir, train_and_evaluate(experiment_config(name), workdir)
    _PRINTED[name] = printed.getvalue()
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
  # The run ends with the summary: metrics beside the baseline, the report and TensorBoard.
  printed = _PRINTED[name].splitlines()
  assert len(printed) < 20 and printed[0].startswith("===") and printed[-1].startswith("===")
  assert "done in " in printed[1] and f"step {int(record['step'])}" in printed[1]
  assert f"{workdir}/report.md" in _PRINTED[name]
  assert f"--logdir {workdir}/tensorboard" in _PRINTED[name]
  rows = {line.split()[0]: line.split()[1:] for line in printed[3:-3]}
  first = EXPECTED[name][0]
  column = printed[2].split().index("test" if first.startswith("test_") else "validation")
  shown = float(rows[first.split("_", 1)[1]][column])  # 4 decimals (1 from 1000 on).
  assert shown == pytest.approx(record[first], abs=6e-5, rel=1e-4)
  if name == "sentiment_tweets":
    assert printed[2].split()[-2:] == ["TFIDF", "test"]
    assert float(rows["accuracy"][-1]) == pytest.approx(
        record["baseline_tfidf_test_accuracy"], abs=6e-5)
    notes = (pathlib.Path(workdir) / "report.md").read_text()
    assert re.search(r"train: [\d,]+ of 29,738 examples seen", notes), notes[-1500:]


@pytest.mark.slow
def test_eval_mode_reproduces_the_final_metrics(tmp_path_factory):
  from flaxattn.train import inference
  workdir, record = trained("sentiment_tweets", tmp_path_factory)
  config = experiment_config("sentiment_tweets")
  results = inference.evaluate_checkpoint(config, workdir, ["test"])
  assert results["test"]["accuracy"] == pytest.approx(record["test_accuracy"], abs=1e-6)
  assert os.path.isfile(os.path.join(workdir, "eval_test.json"))


@pytest.mark.slow
def test_eval_mode_rejects_an_unknown_split_before_reading_the_checkpoint(tmp_path_factory,
                                                                          monkeypatch):
  from flaxattn.train import inference
  workdir, _ = trained("sentiment_tweets", tmp_path_factory)
  monkeypatch.setattr(inference, "load_params", lambda *args: pytest.fail("checkpoint read"))
  with pytest.raises(inference.UnknownSplit, match="--split=tset: tweets has no such split; its "
                     "splits are train, validation, test"):
    inference.evaluate_checkpoint(experiment_config("sentiment_tweets"), workdir, ["tset"])
  monkeypatch.undo()
  result = subprocess.run(
      [sys.executable, "-m", "flaxattn.main", "--mode=eval", f"--workdir={workdir}",
       "--split=tset"], capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: --split=tset: tweets has no")


@pytest.mark.slow
def test_attend_names_files_after_the_text_and_prints_the_prediction(tmp_path_factory, tmp_path):
  from flaxattn.train import inference
  workdir, _ = trained("sentiment_tweets", tmp_path_factory)
  config = experiment_config("sentiment_tweets")
  first, second = (inference.attend(config, workdir, [text])[0]
                   for text in ("The flight was late, again!", "great crew"))
  for result, stem in ((first, "the-flight-was-late-again"), (second, "great-crew")):
    assert result.paths and all(os.path.basename(path).startswith(stem + "_")
                                for path in result.paths), result.paths
    assert all(os.path.isfile(path) for path in result.paths)
    label, rest = result.prediction.split(" ", 1)
    probabilities = dict(part.split("=") for part in rest.split("; ")[1].rstrip(")").split())
    assert label in ("negative", "neutral", "positive") and set(probabilities) == {
        "negative", "neutral", "positive"}
    assert sum(map(float, probabilities.values())) == pytest.approx(1, abs=2e-3)
    assert max(probabilities, key=lambda name: float(probabilities[name])) == label
  assert all(os.path.isfile(path) for path in first.paths)  # The second call left them alone.
  # The console script: --out names the files; the prediction and the paths are printed, quietly.
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from flaxattn.main import run; sys.argv[0] = 'flaxattn';"
       " run()", "attend", f"--workdir={workdir}", "--text=great crew",
       f"--out={tmp_path}/maps/crew"], capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-2000:]
  assert not re.search(r"^I\d{4} ", result.stderr, re.MULTILINE), result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == "text:       great crew" and lines[1] == f"prediction: {second.prediction}"
  assert lines[2:] == [f"{tmp_path}/maps/crew_{os.path.basename(path).split('_', 1)[1]}"
                       for path in second.paths]
  assert all(os.path.isfile(path) for path in lines[2:])


@pytest.mark.slow
def test_decode_and_attend_modes(tmp_path_factory):
  from flaxattn.train import inference
  workdir, _ = trained("translate_bible", tmp_path_factory)
  config = experiment_config("translate_bible")
  outputs = inference.decode_lines(config, workdir, ["In the beginning God created the heaven.",
                                                     "And God said, Let there be light."])
  assert len(outputs) == 2 and all(isinstance(line, str) for line in outputs)
  attended = inference.attend(config, workdir, ["And God saw the light."])[0]
  paths = attended.paths
  assert any("align" in os.path.basename(path) or "cross" in path for path in paths), paths
  assert all(os.path.basename(path).startswith("and-god-saw-the-light_") for path in paths)
  assert attended.prediction.endswith("(greedy translation)")
  # The console script's `attend` word reads the run's own config.json.
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from flaxattn.main import run; sys.argv[0] = 'flaxattn';"
       " run()", "attend", f"--workdir={workdir}", "--text=And there was light."],
      capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert any(line.endswith(".png") for line in result.stdout.splitlines()), result.stdout
  assert result.stdout.splitlines()[1].startswith("prediction: ")
  assert not re.search(r"^I\d{4} ", result.stderr, re.MULTILINE), result.stderr[-3000:]


@pytest.mark.slow
def test_attend_draws_short_and_long_maps_from_the_trained_kernel(tmp_path_factory, tmp_path):
  """`flaxattn attend` on the trained lm_ptb smoke run (RoPE, scanned, the blockwise kernel CPU
  picks): a short text gets every weight and the rollout; a text past `FULL_MAP_TOKENS` pooled
  maps and the curves (the per-query statistics and the last query's exact row)."""
  from flaxattn.models.attention_maps import FULL_MAP_TOKENS
  workdir, _ = trained("lm_ptb", tmp_path_factory)
  words = "the company said it expects sales to rise in the third quarter".split()
  long_text = " ".join(words[i % len(words)] for i in range(FULL_MAP_TOKENS + 20))
  result = subprocess.run(
      [sys.executable, "-c", "import sys; from flaxattn.main import run; sys.argv[0] = 'flaxattn';"
       " run()", "attend", f"--workdir={workdir}", "--text=the company said", f"--text={long_text}",
       f"--out={tmp_path}/maps"], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-3000:]
  paths = [line for line in result.stdout.splitlines() if line.endswith(".png")]
  assert [os.path.basename(path) for path in paths] == [
      "maps-1_self_layer0.png", "maps-1_self_rollout.png", "maps-2_self_layer0.png",
      "maps-2_self_curves.png"], result.stdout
  for path in paths:
    image = matplotlib.image.imread(path)
    assert min(image.shape[:2]) > 200 and image[..., :3].std() > 0.05, path
