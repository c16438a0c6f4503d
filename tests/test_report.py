"""Run reports: learning curves from metrics.jsonl, report.md / report.json, TensorBoard images."""

import io
import json
import os
import struct

import matplotlib.image
import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from flaxattn.train.report import (is_metric, log_images, plot_learning_curves, read_metrics,
                                   smoothed, write_report)


def write_metrics(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")


RECORDS = ([{"step": step, "loss": 3.0 / step, "tokens_per_s": 100.0} for step in range(1, 11)]
           + [{"step": 10, "loss": 0.3, "eval_loss": 0.5, "eval_accuracy": 0.7,
               "eval_macro_f1": 0.6, "eval_z_loss": 0.0, "eval_examples": 64.0}])
# Counters (`eval_examples`, `eval_tokens`) and always-zero series (`eval_z_loss`) get no panel.
RECORDS[4].update(eval_loss=0.9, eval_accuracy=0.4, eval_macro_f1=0.3, eval_z_loss=0.0,
                  eval_tokens=500.0)


def test_learning_curves_png(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  write_metrics(metrics, RECORDS)
  png = plot_learning_curves(str(metrics), str(tmp_path / "plots" / "curves.png"), log_loss=True)
  image = matplotlib.image.imread(png)
  # Three panels (loss + eval_loss, eval_accuracy, eval_macro_f1) in a row of 4.5 x 3.9 inch ones.
  assert image.shape[:2] == (390, 1350), image.shape
  assert image[..., :3].std() > 0.05  # something is drawn
  assert os.listdir(tmp_path / "plots") == ["curves.png"]  # no temporary file left behind


def test_smoothing_and_metric_names():
  assert np.array_equal(smoothed(np.arange(16.0)), np.arange(16.0))  # Few points: drawn as they are.
  np.testing.assert_allclose(smoothed(np.full(50, 2.5)), 2.5, rtol=1e-12)  # Debiased: no ramp.
  noisy = np.random.default_rng(0).normal(size=400)
  assert smoothed(noisy)[100:].std() < 0.4 * noisy.std()
  assert [name for name in ("eval_accuracy", "eval_examples", "test_tokens", "test_bleu",
                            "eval_decoded_examples", "loss") if is_metric(name)] == [
      "eval_accuracy", "test_bleu", "loss"]


def test_learning_curves_reject_bad_input(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": \n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:3: not JSON"):
    read_metrics(str(metrics))
  metrics.write_text('{"step": 1, "tokens_per_s": 5.0}\n')
  with pytest.raises(ValueError, match="no numeric 'loss' or 'eval_"):
    plot_learning_curves(str(metrics), str(tmp_path / "x.png"))
  metrics.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match=r":1: expected a JSON object with a 'step'"):
    read_metrics(str(metrics))


def test_write_report(tmp_path):
  workdir = tmp_path / "run"
  image = tmp_path / "run" / "figures" / "curve (final).png"
  image.parent.mkdir(parents=True)
  matplotlib.image.imsave(image, np.zeros((4, 4, 3)))
  metrics = {"eval_accuracy": np.float32(0.8125), "steps": np.int64(300), "eval_loss": float("nan"),
             "name": "tiny|encoder"}
  tables = {"Baselines": [{"model": "tf-idf + logreg", "accuracy": 0.61},
                          {"model": "flaxattn", "accuracy": 0.8125, "macro_f1": 0.79}]}
  md = write_report(str(workdir), title="Sentiment", metrics=metrics, tables=tables,
                    images=[str(image)], notes=["trained on 2 CPU cores"])
  assert md == str(workdir / "report.md")
  text = (workdir / "report.md").read_text()
  for expected in ("# Sentiment", "| metric | value |", "| eval_accuracy | 0.8125 |",
                   "| steps | 300 |",
                   "| eval_loss | nan |", "| name | tiny\\|encoder |", "## Baselines",
                   "| model | accuracy | macro_f1 |", "| tf-idf + logreg | 0.61 |  |",
                   "| flaxattn | 0.8125 | 0.79 |", "![curve (final)](<figures/curve (final).png>)",
                   "## Notes", "- trained on 2 CPU cores"):
    assert expected in text, expected
  assert json.loads((workdir / "report.json").read_text()) == {
      "eval_accuracy": 0.8125, "steps": 300, "eval_loss": "nan", "name": "tiny|encoder"}
  assert sorted(os.listdir(workdir)) == ["figures", "report.json", "report.md"]
  with pytest.raises(FileNotFoundError, match="missing.png"):
    write_report(str(workdir), title="x", metrics={}, images=[str(tmp_path / "missing.png")])
  with pytest.raises(ValueError, match=r"tables\['t'\]\[0\] must be a dict"):
    write_report(str(workdir), title="x", metrics={}, tables={"t": [[1, 2]]})


def read_events(directory):
  """Every `Event` in the TensorBoard event files of `directory` (TFRecord framing: length, its
  CRC, the data, its CRC)."""
  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event()
      event.ParseFromString(payload)
      events.append(event)
  return events


def test_log_images_to_tensorboard(tmp_path):
  png = tmp_path / "map.png"
  pixels = np.zeros((30, 50, 3), np.uint8)
  pixels[:, :25, 0] = 255  # left half red
  matplotlib.image.imsave(png, pixels)
  writer = SummaryWriter(str(tmp_path / "tb"))
  log_images(writer, {"attention/layer0": str(png)}, step=7)
  writer.close()
  images = [(event.step, value) for event in read_events(tmp_path / "tb")
            for value in event.summary.value if value.HasField("image")]
  assert [(step, value.tag) for step, value in images] == [(7, "attention/layer0")]
  stored = images[0][1].image
  assert (stored.height, stored.width) == (30, 50)
  decoded = matplotlib.image.imread(io.BytesIO(stored.encoded_image_string), format="png")
  np.testing.assert_array_equal(np.rint(decoded[..., :3] * 255).astype(np.uint8), pixels)
