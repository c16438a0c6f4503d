"""Checkpoints: half-written and corrupted ones are never used; lm_tiny trains end to end; a run
killed (SIGKILL) or preempted (SIGTERM) and restarted ends bit for bit like an uninterrupted one."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from flax import nnx

from flaxattn import parallel
from flaxattn.config import validate
from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig
from flaxattn.train import Checkpointer, init_train_state, load_params
from flaxattn.train.checkpoint import abstract_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from experiments import lm_tiny  # noqa: E402  (the experiment file, as flaxattn.main loads it)


def test_half_written_and_corrupted_checkpoints_are_skipped(tmp_path, caplog):
  state = {"w": jnp.arange(4.0), "step": jnp.asarray(0)}
  checkpointer = Checkpointer(tmp_path, keep=3)
  for step in (1, 2):
    checkpointer.save(step, jax.tree.map(lambda x: x + step, state), data_state=10 * step)
  checkpointer.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, position = checkpointer.restore_latest(abstract)
  assert position == 20 and np.array_equal(restored["w"], np.arange(4.0) + 2)
  # A save killed before its final rename leaves only a temporary directory: never a candidate.
  os.makedirs(tmp_path / "3.orbax-checkpoint-tmp" / "state")
  # Step 2's array data lost: restoring it fails, and step 1 is used instead, with a warning naming
  # it; step 2 is moved aside (not deleted), so that the resumed run can save step 2 anew.
  for path in glob.glob(str(tmp_path / "2" / "state" / "**" / "*"), recursive=True):
    if os.path.isfile(path) and "metadata" not in os.path.basename(path):
      os.remove(path)
  checkpointer.close()
  checkpointer = Checkpointer(tmp_path, keep=3)
  restored, position = checkpointer.restore_latest(abstract)
  assert position == 10 and np.array_equal(restored["w"], np.arange(4.0) + 1)
  aside = tmp_path.parent / f"{tmp_path.name}.corrupt" / "2"
  assert "checkpoint 2" in caplog.text and "cannot be read" in caplog.text
  assert str(aside) in caplog.text
  assert os.path.isdir(aside / "state") and checkpointer.steps() == [1]
  checkpointer.save(2, state, data_state=30)
  checkpointer.wait()
  assert checkpointer.restore_latest(abstract)[1] == 30
  checkpointer.close()


@pytest.mark.slow
def test_restore_onto_another_mesh_and_load_params(tmp_path):
  config = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, mlp_dim=64, num_layers=2,
                             max_length=16, scan_layers=True)
  make_model = lambda rngs: DecoderLM(config, rngs=rngs)
  tx = optax.adamw(1e-3)
  saved_mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, saved, _ = init_train_state(make_model, tx, 0, saved_mesh, parallel.make_rules("fsdp_tp"))
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=1)
  checkpointer.save(7, saved, data_state=7)
  checkpointer.wait()
  mesh = parallel.make_mesh({"fsdp": 8})
  # Another mesh, other rules, another seed: the restored values must be the saved ones.
  _, other, shardings = init_train_state(make_model, tx, 1, mesh, parallel.make_rules("fsdp"))
  restored, position = checkpointer.restore_latest(abstract_like(other, shardings))
  checkpointer.close()
  assert position == 7
  embedding = restored.params["embedder"]["token"]["embedding"]
  assert embedding.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  params = load_params(tmp_path)
  model = nnx.eval_shape(lambda: make_model(nnx.Rngs(2)))
  state = nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), params)
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(saved.params)):
    np.testing.assert_array_equal(got, np.asarray(want))
  with pytest.raises(ValueError, match="holds no checkpoint"):
    load_params(tmp_path / "checkpoints" / "7" / "progress")


def test_keeps_the_last_checkpoints_and_the_best(tmp_path):
  state = {"w": jnp.zeros(2)}
  checkpointer = Checkpointer(tmp_path, keep=2, best_metric="eval_loss", best_mode="min")
  for step, loss in zip(range(1, 7), [3.0, 1.0, 2.0, None, 4.0, 5.0]):
    checkpointer.save(step, state, step, metrics=None if loss is None else {"eval_loss": loss})
    checkpointer.wait()
  assert checkpointer.manager.all_steps() == [2, 5, 6]
  checkpointer.close()
  # A resumed run still knows step 2 is the best (its metrics are on disk): it keeps it.
  checkpointer = Checkpointer(tmp_path, keep=2, best_metric="eval_loss", best_mode="min")
  assert checkpointer.select("best") == 2 and checkpointer.select("latest") == 6
  for step, loss in ((7, 2.5), (8, None)):
    checkpointer.save(step, state, step, metrics=None if loss is None else {"eval_loss": loss})
    checkpointer.wait()
  assert checkpointer.steps() == [2, 7, 8] and checkpointer.select(7) == 7
  with pytest.raises(ValueError,
                     match=r"^no checkpoint at step 5 .*\(available steps: \[2, 7, 8\]\)$"):
    checkpointer.select(5)
  checkpointer.close()
  reader = Checkpointer(tmp_path, keep=1, best_metric="eval_accuracy", best_mode="max",
                        read_only=True)
  with pytest.raises(ValueError, match="no checkpoint has a eval_accuracy"):
    reader.select("best")
  with pytest.raises(ValueError, match="'best' needs config.best_checkpoint_metric"):
    Checkpointer(tmp_path, keep=1, read_only=True).select("best")


def tensorboard_scalars(logdir):
  """`{tag: [(step, value), ...]}` from TFRecord event files (u64 length, u32 crc, data, u32 crc)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(glob.glob(str(logdir / "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    offset = 0
    while offset < len(data):
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  # Throughput differs run to run; everything else must not.
  return [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "mfu"} for r in records]


def final_params(workdir, step):
  restored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, restored["params"])


def resume_config(steps=80):
  config = lm_tiny.get_config()
  config.steps = steps
  config.log_every = 5
  config.checkpoint_every = 20
  config.eval_every = 40
  validate(config)
  return config


@pytest.mark.slow
def test_lm_tiny_trains_end_to_end(tmp_path):
  from flaxattn.train.loop import train_and_evaluate
  config = lm_tiny.get_config()
  validate(config)
  final = train_and_evaluate(config, str(tmp_path))
  records = read_metrics(tmp_path)
  # A line every log_every=25 steps and at every evaluation (eval_every=30).
  assert [r["step"] for r in records] == sorted({*range(25, 301, 25), *range(30, 301, 30)})
  assert sum("eval_loss" in r for r in records) == 10  # Enough points for a curve.
  # log(256) = 5.55 at the start; the corpus' entropy rate is 1.09 nats.
  assert records[0]["loss"] > 4.0 and final["loss"] < 1.6 and final["eval_loss"] < 1.6
  assert final["tokens_per_s"] > 0 and 0 < final["mfu"] < 1
  # Unpacked, unpadded windows: every input position is a real token.
  assert final["padded_tokens_per_s"] == pytest.approx(final["tokens_per_s"])
  assert json.load(open(tmp_path / "config.json"))["model"]["num_layers"] == 2
  losses = tensorboard_scalars(tmp_path / "tensorboard")["loss"]
  assert losses == [(r["step"], pytest.approx(r["loss"])) for r in records]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["100", "200", "300"]


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_finite_checkpoints(tmp_path):
  from flaxattn.train.loop import train_and_evaluate
  config = lm_tiny.get_config()
  # Plain SGD at a huge rate, unclipped: the weights blow up within a few steps.
  config.optimizer.update(name="sgd", learning_rate=1e6, clip_norm=0.0, momentum=0.0)
  config.update(steps=60, log_every=2, checkpoint_every=1, eval_every=0)
  config.schedule.update(name="constant", warmup_steps=0)
  validate(config)
  stopped = r"(loss is (nan|inf) at|parameters are not finite after) step \d+"
  with pytest.raises(FloatingPointError, match=stopped):
    train_and_evaluate(config, str(tmp_path))
  steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
  assert steps and steps[-1] < 60
  for step in steps:
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(final_params(tmp_path, step)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  from flaxattn.train.loop import train_and_evaluate
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train_and_evaluate(resume_config(), workdir)
  return read_metrics(workdir), final_params(workdir, 80)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_resumes_exactly(tmp_path, uninterrupted, kill):
  from flaxattn.train.loop import train_and_evaluate
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  overrides = ["--config.steps=80", "--config.log_every=5", "--config.checkpoint_every=20",
               "--config.eval_every=40"]
  process = subprocess.Popen(
      [sys.executable, "-m", "flaxattn.main", "--config=experiments/lm_tiny.py",
       f"--workdir={tmp_path}", *overrides], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 300
    while not os.path.isdir(tmp_path / "checkpoints" / "20") and time.time() < deadline:
      assert process.poll() is None, "the run ended before its first checkpoint"
      time.sleep(0.05)
    process.send_signal(kill)
    returncode = process.wait(timeout=120)
  finally:
    if process.poll() is None:
      process.kill()
  saved = sorted(int(step) for step in os.listdir(tmp_path / "checkpoints") if step.isdigit())
  if kill == signal.SIGTERM:
    # A clean exit right after saving the step it was on (not a multiple of checkpoint_every).
    assert returncode == 0 and 20 <= saved[-1] < 80
    assert read_metrics(tmp_path)[-1]["step"] == saved[-1]
  else:
    assert returncode == -signal.SIGKILL and saved[-1] < 80
  train_and_evaluate(resume_config(), str(tmp_path))
  metrics, params = uninterrupted
  # After SIGTERM the first run also logged the step it stopped at, off the log_every grid.
  assert [r for r in read_metrics(tmp_path) if r["step"] % 5 == 0] == metrics
  for got, want in zip(jax.tree.leaves(final_params(tmp_path, 80)), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, want)
