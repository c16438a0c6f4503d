"""Multi-host runs: which rows of a batch each process feeds (by data-parallel rank), batches the
processes cannot split, and whole experiments on 2 processes x 4 devices (`launch/local.py`) giving
the report of 1 process x 8 devices, with the eval / decode / attend modes on their workdirs."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxattn import parallel
from flaxattn.config import validate
from flaxattn.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import listops, sequence_tasks  # noqa: E402

AUTO = (jax.sharding.AxisType.Auto,) * 4
# fsdp 2 x tensor 2 x data 2: the mesh of the issue.
MESH_FLAGS = ["--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.mesh.data=2"]


def reference_blocks(mesh, processes):
  """Per simulated process, the batch shards (data-major, then fsdp) its devices sit at in the
  mesh's device array: the rows a batch sharded over ('data', 'fsdp') puts on them."""
  fsdp = mesh.shape["fsdp"]
  blocks = []
  for devices in processes:
    ids = {device.id for device in devices}
    held = sorted({int(d) * fsdp + int(f) for (d, f, _, _), device in np.ndenumerate(mesh.devices)
                   if device.id in ids})
    blocks.append(held)
  return blocks


@pytest.mark.parametrize("order", ["processes_outer", "tensor_across_processes"])
def test_row_block_follows_the_data_parallel_rank(order):
  devices = jax.devices()
  processes = [devices[:4], devices[4:]]  # Two simulated processes of 4 devices.
  if order == "processes_outer":
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  else:  # Each tensor pair joins one device of each process: both hold every row.
    mesh = jax.make_mesh((2, 2, 2, 1), parallel.MESH_AXES, axis_types=AUTO,
                         devices=[devices[i] for i in (0, 4, 1, 5, 2, 6, 3, 7)])
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  for devices_of, shards in zip(processes, reference_blocks(mesh, processes)):
    index, count = parallel.row_block(sharding, devices_of)
    size = 4 // count  # Batch shards per block.
    assert list(range(index * size, (index + 1) * size)) == shards
  blocks = [parallel.row_block(sharding, group) for group in processes]
  assert blocks == ([(0, 2), (1, 2)] if order == "processes_outer" else [(0, 1), (0, 1)])
  # One process (this one) holds everything.
  assert parallel.row_block(sharding) == (0, 1)
  assert parallel.local_rows(sharding, 8) == slice(0, 8)
  # A batch not sharded at all: every process feeds all of it.
  assert parallel.row_block(NamedSharding(mesh, P()), processes[1]) == (0, 1)


def test_batches_the_processes_cannot_split_are_one_line_errors():
  devices = jax.devices()
  # Batch shards 0 and 2 on the first simulated process: not one block.
  mesh = jax.make_mesh((4, 1, 2, 1), parallel.MESH_AXES, axis_types=AUTO,
                       devices=[devices[i] for i in (0, 1, 4, 5, 2, 3, 6, 7)])
  with pytest.raises(ValueError, match=r"the devices hold batch shards \[0, 2\] of 4 .* not one "
                                       "contiguous block"):
    parallel.row_block(NamedSharding(mesh, P(("data", "fsdp"))), devices[:4])
  config = listops.get_config("smoke")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.eval.batch_size = 6
  with pytest.raises(ValueError, match=r"config.eval.batch_size=6 must be divisible by the 4 "
                                       "batch shards"):
    validate(config)
  config.eval.batch_size, config.batch_size = None, 6
  with pytest.raises(ValueError, match=r"config.batch_size=6 must be divisible by the 4 batch"):
    validate(config)


EXAMPLES = [{"tokens": np.arange(3 + i % 5, dtype=np.int32) + 4, "label": i % 3} for i in range(23)]


@pytest.mark.parametrize("packing", [False, True])
def test_training_batches_do_not_depend_on_the_process_count(packing):
  kind = "lm" if packing else "classification"
  examples = [{"tokens": e["tokens"]} for e in EXAMPLES] if packing else EXAMPLES
  make = lambda index, count: iter(pipeline.make_dataset(
      examples, format=kind, lengths={"tokens": 8}, batch_size=6 // count, train=True, bos_id=1,
      seed=5, process_index=index, process_count=count, packing=packing))
  whole = make(0, 1)
  parts = [make(index, 3) for index in range(3)]
  for _ in range(9):  # More than two epochs.
    want = next(whole)
    got = [next(part) for part in parts]
    for key in want:
      np.testing.assert_array_equal(np.concatenate([batch[key] for batch in got]), want[key])


# --- Whole experiments: 2 processes x 4 devices against 1 process x 8 -------------------------

def launch(args, timeout=900):
  result = subprocess.run(
      [sys.executable, "launch/local.py", "--processes=2", "--devices_per_process=4", "--", *args],
      cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
      timeout=timeout)
  assert result.returncode == 0, result.stdout[-4000:]
  return result.stdout


def report_test_metrics(workdir):
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  metrics = report.get("metrics", report)
  return {key: value for key, value in metrics.items() if key.startswith("test_")}


def train_both(tmp_path_factory, module, variant, overrides):
  """Trains `experiments/<module>:<variant>` with `overrides` on 2 x 4 (launched) and 1 x 8 (this
  process). Returns both workdirs."""
  from flaxattn.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp(module.__name__.split(".")[-1])
  multi, single = root / "two_processes", root / "one_process"
  path = os.path.relpath(module.__file__, REPO)
  launch([f"--config={path}:{variant}", f"--workdir={multi}", *MESH_FLAGS, *overrides])
  config = module.get_config(variant)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  for flag in overrides:
    key, value = flag.removeprefix("--config.").split("=", 1)
    section, name = key.rsplit(".", 1) if "." in key else ("", key)
    target = config if not section else config[section]
    target[name] = target.get_type(name)(value)  # get_type: also for None placeholders.
  validate(config)
  train_and_evaluate(config, str(single))
  return multi, single


def assert_same_report(multi, single):
  got, want = report_test_metrics(multi), report_test_metrics(single)
  assert set(got) == set(want) and len(got) >= 3
  for key in want:
    # Cross-process all-reduces add in another order: float32 rounding only (relative for
    # perplexity, the exponential of the loss).
    assert abs(got[key] - want[key]) <= 1e-3 * max(1.0, abs(want[key])), (key, got[key], want[key])
  assert os.listdir(multi / "attention" / "final"), "the report's attention maps"


@pytest.fixture(scope="module")
def listops_runs(tmp_path_factory):
  # ListOps' 19 token ids cannot be split over tensor=2: the vocabulary stays whole.
  return train_both(tmp_path_factory, listops, "smoke", [
      "--config.steps=10", "--config.eval_every=10", "--config.sharding.overrides=vocab="])


@pytest.fixture(scope="module")
def reverse_runs(tmp_path_factory):
  return train_both(tmp_path_factory, sequence_tasks, "smoke",
                    ["--config.steps=10", "--config.data.eval_examples=16",
                     "--config.eval.batch_size=8"])


@pytest.mark.slow
def test_classification_two_processes_match_one(listops_runs):
  multi, single = listops_runs
  assert_same_report(multi, single)
  examples = listops.get_config("smoke").data.eval_examples
  assert f"- test: {examples} of {examples} examples seen" in (single / "report.md").read_text()
  # The eval mode on the 2-process workdir gives the report's test metrics.
  output = launch(["--mode=eval", f"--workdir={multi}", "--split=test"])
  lines = [json.loads(line.split("] ", 1)[1]) for line in output.splitlines()
           if line.startswith("[0] {")]
  assert len(lines) == 1 and not any(line.startswith("[1] {") for line in output.splitlines())
  for key, value in report_test_metrics(multi).items():
    assert abs(lines[0][key.removeprefix("test_")] - value) <= 1e-3, key


@pytest.mark.slow
def test_seq2seq_two_processes_match_one(reverse_runs):
  multi, single = reverse_runs
  assert_same_report(multi, single)
  assert "- test: 16 of 16 examples seen" in (single / "report.md").read_text()


@pytest.mark.slow
def test_decode_and_attend_modes_on_two_processes(reverse_runs, tmp_path):
  from flaxattn.train import inference  # pylint: disable=import-outside-toplevel
  from ml_collections import config_dict  # pylint: disable=import-outside-toplevel
  multi, _ = reverse_runs
  lines = ["4 5 6 7 8 9 10 11 12 13", "13 12 11 10 9 8 7 6 5 4", "7 7 7 7 7 7 7 7 7 7"]
  (tmp_path / "in.txt").write_text("".join(line + "\n" for line in lines))
  launch(["--mode=decode", f"--workdir={multi}", f"--input={tmp_path / 'in.txt'}",
          f"--output={tmp_path / 'out.txt'}"])
  with open(multi / "config.json") as f:
    config = config_dict.ConfigDict(json.load(f))
  # The same checkpoint decoded by this one process (8 devices, the same mesh).
  want = inference.decode_lines(config, str(multi), lines)
  assert (tmp_path / "out.txt").read_text().splitlines() == want
  output = launch(["--mode=attend", f"--workdir={multi}", f"--text={lines[0]}"])
  paths = [line.split("] ", 1)[1] for line in output.splitlines() if line.endswith(".png")]
  assert paths and all(line.startswith("[0] ") for line in output.splitlines()
                       if line.endswith(".png"))
  assert all(os.path.getsize(path) > 0 for path in paths)
