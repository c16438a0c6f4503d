"""Losses and schedules against float64 NumPy; optimizers' weight-decay mask; the train step on
meshes (8,1,1,1), (2,2,2,1), (1,2,2,2), with gradient accumulation, and with ring attention over a
context axis of 4, against one device."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn import parallel, train
from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig

CONFIG = TransformerConfig(vocab_size=64, d_model=32, num_heads=4, kv_heads=2, mlp_dim=64,
                           num_layers=2, max_length=16, positions="rope", norm="rmsnorm",
                           scan_layers=True)
STEPS = 3


def numpy_token_sums(logits, labels, weights, smoothing, z):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  lse = np.log(np.exp(shifted).sum(-1)) + logits.max(-1)
  log_probs = logits - lse[..., None]
  target = np.eye(logits.shape[-1])[labels] * (1 - smoothing) + smoothing / logits.shape[-1]
  loss = -(target * log_probs).sum(-1) + z * lse**2
  nll = -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  return {"loss": (loss * weights).sum(), "nll": (nll * weights).sum(),
          "z_loss": (z * lse**2 * weights).sum(),
          "correct": ((logits.argmax(-1) == labels) * weights).sum(), "weight": weights.sum()}


def test_token_sums_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  labels = rng.integers(0, 11, (3, 5))
  weights = (rng.random((3, 5)) > 0.3).astype(np.float32)
  got = train.token_sums(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), labels, weights,
                         label_smoothing=0.1, z_loss=1e-3)
  want = numpy_token_sums(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(np.float32)), labels,
                          weights, 0.1, 1e-3)
  for name in want:  # float32 sums of ~15 terms of size ~5: a few ulps.
    np.testing.assert_allclose(float(got[name]), want[name], rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="label_smoothing must be in"):
    train.token_sums(logits, labels, weights, label_smoothing=1.0)
  with pytest.raises(ValueError, match=r"labels \(3, 4\)"):
    train.token_sums(logits, labels[:, :4], weights)


def test_schedules_match_formulas():
  steps, warmup, peak = 100, 10, 2e-3
  at = np.arange(steps + 1)
  progress = np.clip((at - warmup) / (steps - warmup), 0, 1)
  ramp = peak * at / warmup
  want = {
      "warmup_cosine": np.where(at < warmup, ramp,
                                peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * progress)))),
      "warmup_linear": np.where(at < warmup, ramp, peak * (1 - 0.9 * progress)),
      "constant": np.where(at < warmup, ramp, peak),
      # Vaswani et al. with steps counted from 1 and lr = (d_model * warmup)**-0.5 * ... rescaled.
      "inverse_sqrt": peak * np.minimum(at / warmup, np.sqrt(warmup / np.maximum(at, 1))),
  }
  for name, values in want.items():
    schedule = train.make_schedule(name, peak, steps=steps, warmup_steps=warmup, end_factor=0.1)
    got = np.asarray(jax.vmap(schedule)(jnp.asarray(at)))
    np.testing.assert_allclose(got, values, rtol=1e-5, atol=1e-9, err_msg=name)
  d_model = 512
  paper = lambda s: d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)
  schedule = train.make_schedule("inverse_sqrt", (d_model * warmup)**-0.5, steps=steps,
                                 warmup_steps=warmup)
  assert math.isclose(float(schedule(50)), paper(50), rel_tol=1e-6)
  with pytest.raises(ValueError, match="config.schedule.name must be one of"):
    train.make_schedule("cosine", 1.0, steps=10, warmup_steps=0)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd", "lion"])
def test_weight_decay_skips_norm_scales_and_biases(name):
  params = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))},
            "norm": {"scale": jnp.ones((4,))}}
  assert train.decay_mask(params) == {"dense": {"kernel": True, "bias": False},
                                      "norm": {"scale": False}}
  tx = train.make_optimizer(name, lambda step: 0.1, weight_decay=0.5, clip_norm=1.0)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only the decay moves a parameter: kernels shrink, the rest stay.
  assert float(jnp.max(updates["dense"]["kernel"])) < 0
  assert float(jnp.max(jnp.abs(updates["dense"]["bias"]))) == 0
  assert float(jnp.max(jnp.abs(updates["norm"]["scale"]))) == 0


@pytest.fixture(scope="module")
def setup():
  schedule = train.make_schedule("warmup_cosine", 0.1, steps=10, warmup_steps=2)
  # SGD: its update is linear in the gradient, so float32 rounding stays rounding. (Adam divides by
  # sqrt(v) + eps, which turns a 1e-9 difference in a near-zero gradient into 1e-1 of its step.)
  tx = train.make_optimizer("sgd", schedule, weight_decay=0.1, momentum=0.9, clip_norm=1.0)
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 17)).astype(np.int32)
  weights = np.ones((8, 16), np.float32)
  weights[1, 10:] = 0  # A padded row: per-token normalisation must not count it.
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
  loss_fn = functools.partial(train.LOSSES["lm"], label_smoothing=0.1, z_loss=1e-4)
  return schedule, tx, batch, loss_fn


def run_steps(setup, sizes, devices=None, grad_accum_steps=1, config=CONFIG):
  schedule, tx, batch, loss_fn = setup
  mesh = parallel.make_mesh(sizes, devices)
  rules = parallel.make_rules("context")
  graphdef, state, shardings = train.init_train_state(
      lambda rngs: DecoderLM(config, rngs=rngs), tx, 0, mesh, rules)
  batch_shardings = parallel.batch_shardings({k: v.shape for k, v in batch.items()}, mesh, rules)
  train_step, _ = train.jit_steps(
      train.make_train_step(graphdef, tx, loss_fn, schedule, grad_accum_steps=grad_accum_steps),
      train.make_eval_step(graphdef, loss_fn), shardings, batch_shardings, mesh, rules)
  global_batch = parallel.global_batch(batch, batch_shardings)
  # Compiled ahead of time (under the mesh and rules, as `jit_steps` runs it) to keep its program
  # text; the jitted function is what `jit_steps` wraps.
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    compiled = train_step.__wrapped__.lower(state, global_batch).compile()
  losses = []
  for _ in range(STEPS):
    state, metrics = compiled(state, global_batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.tree.map(np.asarray, state.params), compiled.as_text()


@pytest.fixture(scope="module")
def one_device(setup):
  return run_steps(setup, {}, jax.devices()[:1])


def assert_same_training(got, want):
  # Float32 rounding: sums in another order across shards; three steps keep it ~1e-6.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [{"data": 8}, {"data": 2, "fsdp": 2, "tensor": 2},
                                   {"fsdp": 2, "tensor": 2, "context": 2}])
def test_train_step_on_mesh_equals_one_device(setup, one_device, sizes):
  assert_same_training(run_steps(setup, sizes), one_device)


@pytest.mark.slow
def test_train_step_fsdp_tp_and_accumulation_equal_one_device(setup, one_device):
  losses = one_device[0]
  assert losses[-1] < losses[0]
  assert_same_training(run_steps(setup, {"data": 2, "fsdp": 2, "tensor": 2}, grad_accum_steps=2),
                       one_device)


@pytest.mark.slow
def test_ring_attention_context_parallel_equals_one_device(setup, one_device):
  # The sequence (16 tokens) split over 4 devices: 2 x 4 zig-zag chunks of 2 tokens; the batch over
  # 2. One device runs the default (blockwise) kernel on the whole sequence.
  ring_config = dataclasses.replace(CONFIG, attention_impl="ring")
  ring = run_steps(setup, {"data": 2, "context": 4}, config=ring_config)
  assert_same_training(ring, one_device)
  # Parameters are replicated on this mesh, so an all-gather could only gather activations: keys
  # and values move by collective-permutes around the ring instead.
  assert "collective-permute" in ring[2] and "all-gather" not in ring[2]
