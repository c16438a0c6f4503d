"""Norms, MLPs, Dense, Embed against float64 NumPy; config validation; logical axis names."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.nn import MLP, Dense, Embed, LayerNorm, RMSNorm, TransformerConfig, constrain
from flaxattn.models import DecoderLM

RNG = np.random.default_rng(1)
X = RNG.normal(size=(2, 3, 8)) * 3 + 1
TOL = dict(atol=1e-5, rtol=1e-5)  # float32 compute vs float64 NumPy


def randomize(module):
  """Non-trivial parameter values (scales are 1, biases 0 at init)."""
  for path, variable in nnx.iter_graph(module):
    if isinstance(variable, nnx.Param):
      variable[...] = jnp.asarray(RNG.normal(size=variable.shape), variable[...].dtype)
  return module


def params64(module):
  return {"/".join(map(str, path)): np.asarray(v[...], np.float64)
          for path, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


def test_layernorm():
  norm = randomize(LayerNorm(8, eps=1e-5, rngs=nnx.Rngs(0)))
  p = params64(norm)
  want = (X - X.mean(-1, keepdims=True)) / np.sqrt(X.var(-1, keepdims=True) + 1e-5) * p["scale"] + p["bias"]
  np.testing.assert_allclose(norm(jnp.asarray(X, jnp.float32)), want, **TOL)


def test_rmsnorm():
  norm = randomize(RMSNorm(8, eps=1e-6, rngs=nnx.Rngs(0)))
  want = X / np.sqrt((X ** 2).mean(-1, keepdims=True) + 1e-6) * params64(norm)["scale"]
  np.testing.assert_allclose(norm(jnp.asarray(X, jnp.float32)), want, **TOL)


def gelu_exact(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


NUMPY_ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
    "relu": lambda x: np.maximum(x, 0),
    "silu": lambda x: x / (1 + np.exp(-x)),
}


@pytest.mark.parametrize("activation,gated", [("gelu", False), ("gelu_tanh", False), ("relu", False),
                                              ("silu", True), ("gelu", True)])
def test_mlp(activation, gated):
  mlp = randomize(MLP(8, 16, activation=activation, gated=gated, rngs=nnx.Rngs(0)))
  p, act = params64(mlp), NUMPY_ACTIVATIONS[activation]
  up = X @ p["up/kernel"] + p["up/bias"]
  hidden = act(X @ p["gate/kernel"] + p["gate/bias"]) * up if gated else act(up)
  want = hidden @ p["down/kernel"] + p["down/bias"]
  np.testing.assert_allclose(mlp(jnp.asarray(X, jnp.float32)), want, atol=1e-3, rtol=1e-4)


def test_dense_multi_axis_and_embed_attend():
  dense = randomize(Dense((2, 4), 3, in_axes=("heads", "head_dim"), out_axes=("embed",),
                          rngs=nnx.Rngs(0)))
  x = RNG.normal(size=(5, 2, 4))
  p = params64(dense)
  want = x.reshape(5, 8) @ p["kernel"].reshape(8, 3) + p["bias"]
  np.testing.assert_allclose(dense(jnp.asarray(x, jnp.float32)), want, **TOL)
  with pytest.raises(ValueError, match=r"\(2, 4\)"):
    dense(jnp.zeros((5, 4, 2)))

  embed = Embed(10, 8, rngs=nnx.Rngs(0))
  table = params64(embed)["embedding"]
  np.testing.assert_allclose(embed(jnp.array([[3, 9]])), table[[[3, 9]]], **TOL)
  np.testing.assert_allclose(embed.attend(jnp.asarray(X, jnp.float32)), X @ table.T, atol=1e-4)
  with pytest.raises(ValueError, match="integer"):
    embed(jnp.zeros((2,), jnp.float32))
  for bad in ([3, 10], [-1, 3]):  # past the table, and negative (NumPy-style take would wrap it)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 10\)"):
      embed(jnp.array(bad))
    # Under jit the values are unknown: the bad row is NaN, not another token's embedding.
    rows = np.asarray(jax.jit(embed.__call__)(jnp.array(bad)))
    assert np.isnan(rows[0 if bad[0] < 0 else 1]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=6, kv_heads=4), "kv_heads"),
    (dict(d_model=30, num_heads=4), "d_model"),
    (dict(activation="swish"), "activation"),
    (dict(norm="batchnorm"), "norm"),
    (dict(positions="rotary"), "positions"),
    (dict(remat="some"), "remat"),
    (dict(rotary_dim=0), "rotary_dim"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(attention_impl="flash9"), "attention_impl"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype=jnp.int32), "dtype"),
    (dict(softcap=-1.0), "softcap"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    TransformerConfig(**kwargs)


def test_config_derived_sizes():
  config = TransformerConfig(d_model=64, num_heads=8, kv_heads=2, positions="rope",
                             rotary_dim=4)
  assert (config.kv_heads, config.features_per_head, config.rotary_dim) == (2, 8, 4)


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
  config = TransformerConfig(vocab_size=11, d_model=8, num_heads=2, mlp_dim=16, num_layers=2,
                             scan_layers=scan, tie_embeddings=False, max_length=8)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  allowed = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "layers", None}
  for path, variable in nnx.iter_graph(model):
    if isinstance(variable, nnx.Param):
      axes = variable.get_metadata()["out_sharding"]
      assert len(axes) == variable.ndim and set(axes) <= allowed, (path, axes)
      assert (axes[0] == "layers") == (scan and "layers" in path), (path, axes)
  kernel = model.decoder.layers[0].attention.query.kernel if not scan else (
      model.decoder.layers.attention.query.kernel)
  assert kernel.get_metadata()["out_sharding"][-3:] == ("embed", "heads", "head_dim")


def test_constrain_is_noop_without_rules_and_shards_with_them():
  x = jnp.ones((8, 4))
  assert constrain(x, ("batch", "embed")) is x
  for kind in (jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(kind,))
    with jax.set_mesh(mesh), nnx.logical_axis_rules((("batch", "data"),)):
      y = jax.jit(lambda x: constrain(x * 2, ("batch", "embed")))(x)
    want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    assert y.sharding.is_equivalent_to(want, 2), (kind, y.sharding)
  with pytest.raises(ValueError, match="logical_axes"):
    constrain(x, ("batch",))
