"""Interventions as data, against a float64 NumPy forward pass: head ablation (zero, mean,
resample), activation and path patching, attention knockout and steering give NumPy's numbers;
patching clean into clean returns clean exactly; a vmapped sweep gives each point's numbers alone;
attribution patching is the first-order term of actual patching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.interpret import (ablate_head, attribution_patching, head_grid, knock_out, patch,
                                patch_every_layer, path_patch, run_with_cache,
                                run_with_interventions, stack_layers, steer, sweep,
                                sweep_by_layer)
from interpret_support import IDS, numpy_forward, tiny_models

TOLERANCE = 2e-5  # float32 logits against float64 NumPy
CORRUPT = IDS.at[:, 1].set(1)  # the second token of each row changed
STEERING = np.random.default_rng(3).standard_normal(16).astype(np.float32)


@pytest.fixture(scope="module")
def models():
  return tiny_models()


def jitted(model, fn):
  """`fn(model, *args)` as one jitted call of `args` (the model's state an argument too)."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: run(state, *args)


def logits_with(model, interventions):
  return run_with_interventions(model, IDS, interventions=interventions)[0]


def numpy_z(model, ids):
  """Every layer's z `[layers, batch, len, heads, value_dim]` from the NumPy pass."""
  acts = numpy_forward(model, ids)
  return np.stack([acts[f"blocks.{i}.attn.z"] for i in range(model.config.num_layers)])


def set_head(head, value):
  """A NumPy edit: z's `head` replaced by `value` (broadcast over `[batch, len, value_dim]`)."""
  def edit(z):
    z[:, :, head] = value
    return z
  return edit


@pytest.mark.parametrize("scanned", [False, True])
def test_interventions_equal_numpy(models, scanned):
  model = models[int(scanned)]
  reference = models[0]
  reference_z = numpy_z(reference, CORRUPT)
  key = jax.random.key(0)
  rows = np.asarray(jax.random.permutation(key, 2))
  edges = np.triu(np.ones((6, 6), bool), -2) & ~np.eye(6, dtype=bool)  # keep self and 3+ back
  cases = {
      "zero": ([ablate_head(1, 2)], dict(edit={"blocks.1.attn.z": set_head(2, 0.0)})),
      "mean": ([ablate_head(0, 3, kind="mean", reference=reference_z)],
               dict(edit={"blocks.0.attn.z": set_head(3, reference_z[0, :, :, 3].mean((0, 1)))})),
      "resample": ([ablate_head(1, 0, kind="resample", reference=reference_z, key=key)],
                   dict(edit={"blocks.1.attn.z": set_head(0, reference_z[1][rows][:, :, 0])})),
      "knockout": ([knock_out(1, edges)], dict(knockout=(1, edges))),
      "steer": ([steer("blocks.0.resid_mid", STEERING, scale=2.0, positions=jnp.asarray([1, 4]))],
                dict(edit={"blocks.0.resid_mid": lambda x: x + 2.0 * STEERING * np.isin(
                    np.arange(6), [1, 4])[:, None]})),
  }
  # One compiled program for every case: each its own run of the model.
  got = jitted(model, lambda m, cases: {k: logits_with(m, v) for k, v in cases.items()})(
      {kind: interventions for kind, (interventions, _) in cases.items()})
  for kind, (_, numpy_args) in cases.items():
    want = numpy_forward(reference, IDS, **numpy_args)["logits"]
    np.testing.assert_allclose(got[kind], want, rtol=0, atol=TOLERANCE, err_msg=kind)


def test_activation_and_path_patching_equal_numpy(models):
  unrolled, scanned = models
  corrupt = numpy_forward(unrolled, CORRUPT)
  # Activation patching: the corrupt residual at position 1 of layer 1's input.
  at_one = lambda x: np.where((np.arange(6) == 1)[:, None], corrupt["blocks.1.resid_pre"], x)
  want = numpy_forward(unrolled, IDS, edit={"blocks.1.resid_pre": at_one})["logits"]
  intervention = patch("blocks.1.resid_pre", corrupt["blocks.1.resid_pre"], positions=1)
  np.testing.assert_allclose(jitted(scanned, logits_with)([intervention]), want, rtol=0,
                             atol=TOLERANCE)
  # Path patching from head 1 of layer 0 to the queries of head 2 of layer 1: layer 0 runs with
  # that head corrupt (the MLP recomputes), layer 1's head-2 queries are taken from there, and the
  # clean run runs with only those queries replaced.
  sender = numpy_forward(unrolled, IDS, edit={
      "blocks.0.attn.z": set_head(1, corrupt["blocks.0.attn.z"][:, :, 1])})
  received = sender["blocks.1.attn.q"][:, :, 2]
  def queries(q):
    q[:, :, 2] = received
    return q
  want = numpy_forward(unrolled, IDS, edit={"blocks.1.attn.q": queries})["logits"]
  clean_z, corrupt_z = numpy_z(unrolled, IDS), numpy_z(unrolled, CORRUPT)
  for model in (unrolled, scanned):
    got = jitted(model, lambda m, clean_z, corrupt_z: path_patch(
        m, (IDS,), clean_z, corrupt_z, sender=(0, 1), receiver=(1, 2))[0])(
            jnp.asarray(clean_z, jnp.float32), jnp.asarray(corrupt_z, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("scanned", [False, True])
def test_patching_clean_into_clean_is_exact(models, scanned):
  model = models[int(scanned)]
  graphdef, state = nnx.split(model)

  @jax.jit
  def both(state):
    model = nnx.merge(graphdef, state)
    (clean, _), cache = run_with_cache(model, IDS, names=["embed", "blocks.*.attn.z",
                                                          "blocks.*.attn.pattern", "blocks.1.resid_mid"])
    patches = [patch("embed", cache["embed"]),
               patch_every_layer("blocks.{layer}.attn.pattern",
                                 stack_layers(cache, "blocks.{layer}.attn.pattern")),
               patch_every_layer("blocks.{layer}.attn.z", stack_layers(cache, "blocks.{layer}.attn.z")),
               patch("blocks.1.resid_mid", cache["blocks.1.resid_mid"], positions=jnp.arange(3))]
    return clean, run_with_interventions(model, IDS, interventions=patches)[0]

  clean, patched = both(state)
  np.testing.assert_array_equal(patched, clean)


def test_every_intervention_gives_the_same_numbers_in_a_sweep(models):
  _, model = models  # scanned: the layer index is traced inside the scan as well
  graphdef, state = nnx.split(model)
  clean_cache, corrupt_cache = jitted(model, lambda m: [run_with_cache(
      m, ids, names=["blocks.*.attn.z", "blocks.*.resid_pre"])[1] for ids in (IDS, CORRUPT)])()
  corrupt_z = stack_layers(corrupt_cache, "blocks.{layer}.attn.z")
  corrupt_resid = stack_layers(corrupt_cache, "blocks.{layer}.resid_pre")
  clean_z = stack_layers(clean_cache, "blocks.{layer}.attn.z")
  edges = jnp.asarray(np.random.default_rng(1).random((6, 6)) < 0.3)
  groups = {  # each group's interventions act together at one (layer, head, position) point
      "ablations, patch, knockout, steer": lambda l, h, p: [
          ablate_head(l, h), ablate_head(l, (h + 1) % 4, kind="mean", reference=corrupt_z),
          ablate_head(1 - l, (h + 2) % 4, kind="resample", reference=corrupt_z,
                      key=jax.random.key(p)),
          patch("blocks.{layer}.resid_pre", corrupt_resid[l], layer=l, positions=p),
          knock_out(1 - l, edges, heads=h),
          steer("blocks.{layer}.resid_post", STEERING, layer=l, positions=p)],
      "path patching": lambda l, h, p: ("path", (l, h), (1, (h + p) % 4)),
  }
  layers, heads = head_grid(2, 4)
  positions = jnp.arange(8) % 6
  for name, make in groups.items():
    def logits_at(state, l, h, p, make=make):
      model = nnx.merge(graphdef, state)
      made = make(l, h, p)
      if made[0] == "path":
        return path_patch(model, (IDS,), clean_z, corrupt_z, sender=made[1], receiver=made[2])[0]
      return run_with_interventions(model, IDS, interventions=made)[0]

    swept = jax.jit(jax.vmap(logits_at, in_axes=(None, 0, 0, 0)))(state, layers, heads, positions)
    alone = jax.jit(logits_at)
    for i in (0, 3, 5):  # a few points: each one a separate call
      np.testing.assert_allclose(swept[i], alone(state, layers[i], heads[i], positions[i]),
                                 rtol=0, atol=1e-5, err_msg=f"{name}, point {i}")


def test_sweep_helpers_equal_numpy(models):
  unrolled, _ = models
  layers, heads = head_grid(2, 4)
  effects = jitted(unrolled, lambda m, layers, heads: sweep(
      m, IDS, make=ablate_head, grid=(layers, heads), metric=lambda out: out[0][:, -1].sum()))(
          layers, heads)
  want = [numpy_forward(unrolled, IDS, edit={f"blocks.{l}.attn.z": set_head(h, 0.0)})["logits"]
          [:, -1].sum() for l, h in zip(np.asarray(layers), np.asarray(heads))]
  np.testing.assert_allclose(effects, want, rtol=0, atol=1e-4)
  by_layer = jitted(unrolled, lambda m: sweep_by_layer(
      m, IDS, make=ablate_head, grid=(jnp.arange(4),), metric=lambda out: out[0][:, -1].sum()))()
  assert by_layer.shape == (2, 4)
  np.testing.assert_allclose(by_layer.reshape(-1), want, rtol=0, atol=1e-4)


def test_attribution_patching_is_the_first_order_term_of_patching(models):
  unrolled, _ = models
  metric = lambda out: out[0][:, -1, 3].mean()
  clean_value, attributions = jitted(unrolled, lambda m: attribution_patching(
      m, (IDS,), (CORRUPT,), metric))()
  assert attributions.shape == (2, 2, 6, 4, 4)
  per_head = attributions.sum(axis=(1, 2, 4)).reshape(-1)
  caches = jitted(unrolled, lambda m: [run_with_cache(m, ids, names="blocks.*.attn.z")[1]
                                       for ids in (IDS, CORRUPT)])()
  clean_z, corrupt_z = (stack_layers(cache, "blocks.{layer}.attn.z") for cache in caches)
  layers, heads = head_grid(2, 4)

  def patch_fraction(m, step):  # each head patched a fraction `step` of the way to the corrupt run
    return sweep(m, IDS, grid=(layers, heads), metric=metric, make=lambda l, h: patch(
        "blocks.{layer}.attn.z", clean_z[l] + step * (corrupt_z[l] - clean_z[l]), layer=l,
        heads=h)) - clean_value

  patched = jitted(unrolled, patch_fraction)

  step = 1e-2  # actual patching of a small step / step -> the linear term, to O(step)
  np.testing.assert_allclose(patched(step) / step, per_head, rtol=0,
                             atol=0.03 * float(jnp.max(jnp.abs(per_head))))
  # The whole step: the linear estimate tracks actual patching (it is an approximation).
  full = patched(1.0)
  assert np.corrcoef(full, per_head)[0, 1] > 0.9
  np.testing.assert_allclose(clean_value, metric(unrolled(IDS)), atol=1e-6)
