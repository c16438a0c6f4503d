"""`run_with_cache`: every canonical activation equals a float64 NumPy forward pass; scanned and
unrolled stacks give the same cache under `jax.jit`; a sharded mesh gives the unsharded values; a call
without hooks traces what a plain call traces, and the O(q * kv) pattern exists only when named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from flaxattn.interpret import hook_names, run_with_cache, stack_layers
from flaxattn.models import EncoderDecoder
from interpret_support import CONFIG, IDS, numpy_forward, random_model, tiny_models

TOLERANCE = 2e-5  # float32 against float64, activations of magnitude ~1-10


@pytest.fixture(scope="module")
def models():
  return tiny_models()


def jitted_cache(model, names):
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, ids: run_with_cache(nnx.merge(graphdef, state), ids, names=names))
  return run(state, IDS)


def test_every_name_equals_numpy(models):
  unrolled, _ = models
  reference = numpy_forward(unrolled, IDS)
  (logits, cache), values = run_with_cache(unrolled, IDS)
  assert cache is None and list(values) == list(reference) == hook_names(unrolled)
  for name, value in values.items():
    assert value.shape == reference[name].shape, name
    np.testing.assert_allclose(value, reference[name], rtol=0, atol=TOLERANCE, err_msg=name)
  np.testing.assert_array_equal(logits, values["logits"])


def test_scanned_and_unrolled_give_the_same_cache_under_jit(models):
  unrolled, scanned = models
  names = ["embed", "blocks.*.attn.pattern", "blocks.1.attn.z", "blocks.*.resid_post", "logits"]
  (_, want), (_, got) = jitted_cache(unrolled, names), jitted_cache(scanned, names)
  assert set(got) == set(want) == {  # jit returns dicts with sorted keys
      "embed", "blocks.0.attn.pattern", "blocks.0.resid_post", "blocks.1.attn.pattern",
      "blocks.1.attn.z", "blocks.1.resid_post", "logits"}
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)
  assert stack_layers(got, "blocks.{layer}.resid_post").shape == (2, 2, 6, 16)


def test_sharded_cache_equals_unsharded(models):
  _, scanned = models
  rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("embed", None),
           ("layers", None), ("kv_heads", None), ("head_dim", None), ("vocab", None),
           ("length", None))
  names = ["blocks.*.attn.z", "blocks.1.mlp.hidden", "logits"]
  graphdef, state = nnx.split(scanned)
  run = jax.jit(lambda state, ids: run_with_cache(nnx.merge(graphdef, state), ids, names=names)[1])
  want = run(state, IDS)
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    specs = nnx.get_partition_spec(state)
    sharded = jax.device_put(state, jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs))
    got = run(sharded, jax.device_put(IDS, NamedSharding(mesh, PartitionSpec("data"))))
  assert len(got["logits"].sharding.device_set) == 8 and len(got) == len(want) == 4
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5, err_msg=name)


def all_shapes(jaxpr):
  """The shapes of every variable bound in `jaxpr` and the jaxprs inside it."""
  shapes = set()
  for eqn in jaxpr.eqns:
    shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (tuple, list)) else [param]):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          shapes |= all_shapes(inner)
  return shapes


@pytest.mark.parametrize("scanned", [False, True])
def test_no_hooks_traces_the_plain_call_and_pattern_only_when_named(scanned):
  # Longer than one blockwise tile (CPU blocks: 256 queries x 512 keys), so the default kernel
  # never holds a [length, length] array; rotary positions need no table of that length.
  model = tiny_models(positions="rope", num_layers=1)[int(scanned)]
  graphdef, state = nnx.split(model)
  ids = jnp.ones((1, 600), jnp.int32)
  plain = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids)[0])(state)
  nothing = jax.make_jaxpr(lambda s: run_with_cache(nnx.merge(graphdef, s), ids, names=[])[0][0])(
      state)
  assert str(nothing) == str(plain)
  square = (1, CONFIG.num_heads, 600, 600)
  asked = lambda names: all_shapes(jax.make_jaxpr(
      lambda s: run_with_cache(nnx.merge(graphdef, s), ids, names=names)[1])(state).jaxpr)
  assert square not in all_shapes(plain.jaxpr)
  assert square not in asked(["blocks.0.attn.q", "blocks.0.attn.z", "logits"])
  assert square in asked(["blocks.0.attn.pattern"])
  # The model itself was never marked: its plain trace is unchanged after the cached calls.
  assert str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids)[0])(state)) == str(plain)


def test_encoder_decoder_names_and_cross_attention_keys():
  config = dataclasses.replace(CONFIG, num_decoder_layers=1)
  model = random_model(lambda: EncoderDecoder(config, rngs=nnx.Rngs(0)), np.random.default_rng(0))
  names = hook_names(model)
  assert names[0] == "encoder.embed" and names[-1] == "logits"
  assert "decoder.blocks.0.cross_attn.pattern" in names and "encoder.blocks.1.resid_post" in names
  source, target = IDS, IDS[:, :3]
  graphdef, state = nnx.split(model)
  logits, values = jax.jit(lambda state: run_with_cache(
      nnx.merge(graphdef, state), source, target,
      names=["encoder.final_norm", "decoder.blocks.0.cross_attn.*"]))(state)
  np.testing.assert_allclose(logits, jax.jit(lambda state: nnx.merge(graphdef, state)(
      source, target))(state), atol=1e-5)
  # The cross-attention keys are the key projection of the encoder's output.
  attention = model.decoder.layers[0].cross_attention
  encoded = np.asarray(values["encoder.final_norm"], np.float64)
  keys = np.einsum("bsd,dhk->bshk", encoded, np.asarray(attention.key.kernel[...], np.float64))
  np.testing.assert_allclose(values["decoder.blocks.0.cross_attn.k"],
                             keys + np.asarray(attention.key.bias[...]), atol=1e-5)
  assert values["decoder.blocks.0.cross_attn.pattern"].shape == (2, 4, 3, 6)


def test_unknown_names_are_refused(models):
  unrolled, _ = models
  with pytest.raises(ValueError, match=r"hook name 'blocks.7.attn.z' matches none of this model's "
                     r"names; they are \['embed', 'blocks.\{i\}.resid_pre'"):
    run_with_cache(unrolled, IDS, names=["blocks.7.attn.z"])
