"""Fused kernels inside the real, sharded train step run on each device's batch/heads shard.

The training mesh has Auto axes, so the arrays' types carry no sharding; `flaxattn.nn` attention
tells the kernel the layout its logical-axis rules give (`placement.activation_layout`). Checked
with splash (the Pallas TPU kernel, in interpret mode on this CPU, forced by reporting a 'tpu'
platform to the dispatcher), for the dp, fsdp and fsdp_tp presets:
* the compiled 8-device program all-gathers no `[batch, length, heads, head_dim]` activation and
  the kernel is traced with per-device shapes;
* one step on a multi-device mesh gives the loss, gradient norm and updated parameters of the same
  step on one device. These run on 4 devices: jax 0.10.2's TPU interpreter meets every device at a
  `threading.Barrier` in each kernel call, and the backward pass on 8 simulated CPU devices hangs
  there (also with the old, gathered placement), while 4 complete.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from flax import nnx

from flaxattn import parallel, train
from flaxattn.attention import api, splash
from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 8, 16, 4, 2, 8
CONFIG = TransformerConfig(vocab_size=64, d_model=32, num_heads=HEADS, kv_heads=KV_HEADS,
                           mlp_dim=64, num_layers=1, max_length=LENGTH, positions="rope",
                           norm="rmsnorm", scan_layers=True, attention_impl="splash")
# preset -> (8-device mesh, 4-device mesh); batch over data x fsdp, heads over tensor.
MESHES = {
    "dp": ({"data": 8}, {"data": 4}),
    "fsdp": ({"fsdp": 4, "data": 2}, {"fsdp": 2, "data": 2}),
    "fsdp_tp": ({"fsdp": 2, "tensor": 2, "data": 2}, {"fsdp": 2, "tensor": 2}),
}


@pytest.fixture
def on_tpu(monkeypatch):
  """Splash forced (the dispatcher sees a 'tpu'), interpreted; yields the query and key shapes
  each kernel call was traced with."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(api, "_platform", lambda: "tpu")
  shapes = []
  on_device = splash._attention_on_device

  def recording(query, key, *args, **kwargs):
    shapes.append((query.shape, key.shape))
    return on_device(query, key, *args, **kwargs)

  monkeypatch.setattr(splash, "_attention_on_device", recording)
  with pltpu.force_tpu_interpret_mode():
    yield shapes


def _batch():
  tokens = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (BATCH, LENGTH + 1))
  weights = np.ones((BATCH, LENGTH), np.float32)
  weights[1, 10:] = 0
  return {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
          "weights": weights}


def build_steps(preset: str, sizes: dict, devices=None):
  """`(compile, state, batch)` for the train and eval steps of `jit_steps` on a mesh of `sizes`
  with the `preset` rules: `compile('train')` / `compile('eval')` gives that step compiled."""
  schedule = train.make_schedule("constant", 0.5, steps=1, warmup_steps=0)
  # Plain SGD: the update is the gradient times the rate, so the parameters compare the gradients.
  tx = train.make_optimizer("sgd", schedule, weight_decay=0.0, clip_norm=None)
  loss_fn = train.LOSSES["lm"]
  mesh = parallel.make_mesh(sizes, devices)
  rules = parallel.make_rules(preset)
  graphdef, state, shardings = train.init_train_state(
      lambda rngs: DecoderLM(CONFIG, rngs=rngs), tx, 0, mesh, rules)
  batch = _batch()
  batch_shardings = parallel.batch_shardings({k: v.shape for k, v in batch.items()}, mesh, rules)
  steps = dict(zip(("train", "eval"), train.jit_steps(
      train.make_train_step(graphdef, tx, loss_fn, schedule), train.make_eval_step(graphdef, loss_fn),
      shardings, batch_shardings, mesh, rules)))
  batch = parallel.global_batch(batch, batch_shardings)

  def compile_step(name):
    # Ahead of time under the mesh and rules, as `jit_steps` runs them, to read the program.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
      return steps[name].__wrapped__.lower(state if name == "train" else state.params,
                                           batch).compile()

  return compile_step, state, batch


def gathered_activations(hlo: str) -> list[str]:
  """The all-gathers in `hlo` whose result is shaped like queries/keys/values `[b, LENGTH, h,
  HEAD_DIM]` (at any batch or head count: a partial gather is a gather too)."""
  found = []
  for line in hlo.splitlines():
    match = re.search(r"= (.*?) all-gather(-start)?\(", line)
    if match:
      for dims in re.findall(r"\[([\d,]*)\]", match.group(1)):
        shape = tuple(int(d) for d in dims.split(",") if d)
        if len(shape) == 4 and shape[1] == LENGTH and shape[3] == HEAD_DIM:
          found.append(line.strip()[:160])
  return found


def _per_device(sizes: dict) -> tuple[int, int, int]:
  """(batch, heads, kv_heads) on one device of a mesh of `sizes` under the presets' rules."""
  batch_ways = sizes.get("data", 1) * sizes.get("fsdp", 1)
  tensor = sizes.get("tensor", 1)
  return BATCH // batch_ways, HEADS // tensor, KV_HEADS // tensor


def _check_placement(compiled, shapes, sizes):
  batch, heads, kv_heads = _per_device(sizes)
  assert shapes and set(shapes) == {((batch, LENGTH, heads, HEAD_DIM),
                                     (batch, LENGTH, kv_heads, HEAD_DIM))}, shapes
  assert gathered_activations(compiled.as_text()) == []


def test_eval_step_runs_the_kernel_on_device_shards(on_tpu):
  sizes = MESHES["fsdp_tp"][0]
  compile_step, _, _ = build_steps("fsdp_tp", sizes)
  _check_placement(compile_step("eval"), on_tpu, sizes)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(MESHES))
def test_train_step_runs_the_kernel_on_device_shards(on_tpu, preset):
  # The shapes are those of the forward pass; splash's backward runs its own kernels on the same
  # per-device arrays (inside the same shard_map's transpose).
  sizes = MESHES[preset][0]
  compile_step, _, _ = build_steps(preset, sizes)
  _check_placement(compile_step("train"), on_tpu, sizes)


@pytest.mark.slow
@pytest.mark.parametrize("preset", list(MESHES))
def test_sharded_step_equals_one_device(on_tpu, preset):
  results = []
  for sizes, devices in ((MESHES[preset][1], jax.devices()[:4]), ({}, jax.devices()[:1])):
    compile_step, state, batch = build_steps(preset, sizes, devices)
    state, metrics = compile_step("train")(state, batch)
    results.append((jax.tree.map(float, metrics), jax.tree.map(np.asarray, state.params)))
  (sharded, sharded_params), (single, single_params) = results
  assert _per_device(MESHES[preset][1])[0] < BATCH  # The sharded run did split the batch.
  for name in ("loss", "grad_norm", "accuracy"):
    np.testing.assert_allclose(sharded[name], single[name], rtol=1e-5, err_msg=name)
  # Float32 rounding: the sharded step sums the gradient over devices in another order.
  for a, b in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(single_params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
