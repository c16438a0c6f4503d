"""ALiBi, T5 relative bias, soft-cap and learned sinks through flex_attention inside the nn modules.

The dense-bias path (`attention_impl='reference'`: the bias materialised and added by
`dot_product_attention`) is the independent reference for the flex path (`attention_impl=None`,
which on CPU runs the biases as score_mods): same weights, outputs and parameter gradients to
rtol 1e-5. Sinks have no dense path; they are checked against a float64 NumPy softmax with one
extra logit per head, and their gradient against central differences of that oracle.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.attention import Mask
from flaxattn.nn import (Decoder, MultiHeadAttention, PositionBias, TransformerConfig,
                         capture_attention_weights)
from attention_support import largest_intermediate

BATCH, LENGTH, D_MODEL, HEADS, KV_HEADS = 2, 11, 16, 4, 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _config(positions, attention_impl, **overrides):
  knobs = dict(vocab_size=13, d_model=D_MODEL, num_heads=HEADS, kv_heads=KV_HEADS, mlp_dim=32,
               num_layers=2, positions=positions, attention_impl=attention_impl, softcap=4.0,
               relative_buckets=8, relative_max_distance=16)
  knobs.update(overrides)
  return TransformerConfig(**knobs)


def _inputs():
  x = jax.random.normal(jax.random.key(1), (BATCH, LENGTH, D_MODEL))
  positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
  # Two packed documents in row 1, so the mask has causal and segment-id parts.
  segments = jnp.asarray([[1] * LENGTH, [1] * 6 + [2] * (LENGTH - 6)], jnp.int32)
  return x, positions, Mask(causal=True, q_segment_ids=segments)


def _forward_and_grads(config):
  model = Decoder(config, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, positions, mask = _inputs()
  weights = jax.random.normal(jax.random.key(2), (BATCH, LENGTH, D_MODEL))

  def loss(params):
    out, _ = nnx.merge(graphdef, params, rest)(x, positions=positions, mask=mask)
    return jnp.sum(out * weights), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return out, grads


@pytest.mark.parametrize("positions", ["alibi", "relative"])
def test_decoder_flex_path_matches_dense_bias(positions):
  flex_out, flex_grads = _forward_and_grads(_config(positions, None))
  dense_out, dense_grads = _forward_and_grads(_config(positions, "reference"))
  np.testing.assert_allclose(flex_out, dense_out, **TOL)
  flat_flex, flat_dense = jax.tree.leaves_with_path(flex_grads), jax.tree.leaves(dense_grads)
  assert len(flat_flex) == len(flat_dense)
  for (path, got), want in zip(flat_flex, flat_dense):
    np.testing.assert_allclose(got, want, **TOL, err_msg=jax.tree_util.keystr(path))
  if positions == "relative":  # The captured table gets its gradient through the score_mod.
    assert np.abs(flex_grads["relative_bias"]["embedding"][...]).max() > 1e-3


@pytest.mark.parametrize("positions", ["alibi", "relative"])
def test_cache_decoding_matches_full_forward(positions):
  # ALiBi with a sliding window: the cache's mask_mod applies it by position too.
  window = 4 if positions == "alibi" else None
  model = Decoder(_config(positions, None, softcap=None, window=window), rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, D_MODEL))
  positions_all = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
  full, _ = model(x, positions=positions_all, mask=Mask(causal=True))
  prompt = 6
  step = jax.jit(lambda x, positions, cache: model(x, positions=positions, cache=cache))
  out, cache = step(x[:, :prompt], positions_all[:, :prompt], model.init_cache(BATCH, 16))
  outs = [out]
  for t in range(prompt, LENGTH):  # One token at a time: queries at offset positions.
    out, cache = step(x[:, t:t + 1], positions_all[:, t:t + 1], cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, **TOL)


# ------------------------------------------------------------------------------------------------
# Sinks against float64 NumPy.

def _sink_module(sinks, **kwargs):
  module = MultiHeadAttention(HEADS, D_MODEL, kv_heads=KV_HEADS, use_bias=False,
                              attention_sinks=True, rngs=nnx.Rngs(0), **kwargs)
  module.sinks[...] = jnp.asarray(sinks, jnp.float32)
  return module


def _numpy_sink_attention(module, x, sinks, causal=True):
  """float64: softmax over the visible keys plus one virtual key of logit `sinks[h]`, value 0.
  Returns (out [batch, length, d_model], weights on the real keys [batch, heads, q, kv])."""
  kernel = lambda dense: np.asarray(dense.kernel[...], np.float64)
  x = np.asarray(x, np.float64)
  q = np.einsum("bte,ehd->bthd", x, kernel(module.query))
  k = np.repeat(np.einsum("bte,ehd->bthd", x, kernel(module.key)), HEADS // KV_HEADS, axis=2)
  v = np.repeat(np.einsum("bte,ehd->bthd", x, kernel(module.value)), HEADS // KV_HEADS, axis=2)
  scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  if causal:
    scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
  sink = np.broadcast_to(np.asarray(sinks, np.float64)[None, :, None, None], scores.shape[:3] + (1,))
  logits = np.concatenate([scores, sink], axis=-1)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True))[..., :-1]
  attended = np.einsum("bhts,bshd->bthd", weights, v)
  return np.einsum("bthd,hde->bte", attended, kernel(module.out)), weights


def test_sinks_match_numpy_softmax_with_extra_logit():
  sinks = np.asarray([-1.0, 0.0, 1.5, 3.0])
  module = _sink_module(sinks)
  x = jax.random.normal(jax.random.key(4), (BATCH, LENGTH, D_MODEL))
  # attention_impl=None keeps the blockwise flex kernel (weights recomputed from its lse).
  (out, _), weights = capture_attention_weights(module, x, mask=Mask(causal=True),
                                                attention_impl=None)
  weights = weights[""][0]
  want_out, want_weights = _numpy_sink_attention(module, x, sinks)
  np.testing.assert_allclose(out, want_out, **TOL)
  np.testing.assert_allclose(weights, want_weights, **TOL)
  # The sink takes mass: the first query (one key) gives sigmoid(-s_h)-ish weight to its key.
  assert np.all(np.asarray(weights).sum(-1) < 1.0)

  # Gradient of a scalar loss w.r.t. the sink logits against central differences in float64.
  direction = np.asarray(jax.random.normal(jax.random.key(5), out.shape), np.float64)
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)

  def loss(params):
    out, _ = nnx.merge(graphdef, params, rest)(x, mask=Mask(causal=True))
    return jnp.sum(out * direction)

  got = jax.jit(jax.grad(loss))(params)["sinks"][...]
  eps, want = 1e-5, []
  for h in range(HEADS):
    step = np.eye(HEADS)[h] * eps
    plus = np.sum(_numpy_sink_attention(module, x, sinks + step)[0] * direction)
    minus = np.sum(_numpy_sink_attention(module, x, sinks - step)[0] * direction)
    want.append((plus - minus) / (2 * eps))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sinks_knob_rules():
  with pytest.raises(ValueError, match="attention_sinks=True runs through flex_attention"):
    TransformerConfig(attention_sinks=True, attention_impl="xla")
  with pytest.raises(ValueError, match="attention_sinks=True does not apply to attention_kind"):
    TransformerConfig(attention_sinks=True, attention_kind="linear")
  with pytest.raises(ValueError, match="attention_sinks must be a bool"):
    TransformerConfig(attention_sinks=1)
  module = _sink_module(np.zeros(HEADS))
  with pytest.raises(ValueError, match="takes no bias= array"):
    module(jnp.ones((1, 3, D_MODEL)), bias=jnp.zeros((1, HEADS, 3, 3)))
  assert TransformerConfig(attention_sinks=True, num_layers=1, d_model=16, num_heads=4,
                           mlp_dim=16).attention_sinks


# ------------------------------------------------------------------------------------------------
# Memory, on the traced program.

@pytest.mark.parametrize("positions, sinks", [("relative", False), ("alibi", True)])
def test_flex_path_has_no_quadratic_intermediate(positions, sinks):
  # 4096 rather than 2048: create_block_mask evaluates up to flex._MASK_CHUNK = 2^22 = 2048^2 mask
  # entries per step (a chunk of tiles, not a [q, kv] array), so at 2048 a size bound cannot tell
  # the two apart.
  n = 4096
  config = _config(positions, None, num_layers=1, d_model=8, num_heads=2, kv_heads=1,
                   mlp_dim=8, attention_sinks=sinks)
  dense_config = _config(positions, "reference", num_layers=1, d_model=8, num_heads=2, kv_heads=1,
                         mlp_dim=8)
  x = jax.ShapeDtypeStruct((1, n, 8), jnp.float32)
  positions = jnp.arange(n, dtype=jnp.int32)[None]

  def traced(config):
    model = Decoder(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, x):
      out, _ = nnx.merge(graphdef, params, rest)(x, positions=positions, mask=Mask(causal=True))
      return jnp.sum(out)

    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr

  largest, nested = largest_intermediate(traced(config))
  assert nested > 0 and largest < n * n, (largest, n * n)
  assert largest_intermediate(traced(dense_config))[0] >= n * n  # The walk sees the dense bias.


def test_layer_across_tiles_matches_dense_bias():
  # 300 queries cross the CPU blockwise tile of 256 rows: tile offsets map to the right positions.
  n, table = 300, jax.random.normal(jax.random.key(6), (8, HEADS))
  relative = PositionBias(table=table, kind="relative", bidirectional=False, num_buckets=8,
                          max_distance=64)
  x = jax.random.normal(jax.random.key(7), (1, n, D_MODEL))
  positions = jnp.arange(n, dtype=jnp.int32)[None] + 5  # Not starting at 0: positions, not indices.

  def run(attention_impl):
    module = MultiHeadAttention(HEADS, D_MODEL, kv_heads=KV_HEADS, positions="alibi", softcap=4.0,
                                window=100, attention_impl=attention_impl, rngs=nnx.Rngs(0))

    def loss(x, table):
      bias = dataclasses.replace(relative, table=table)
      out, _ = module(x, mask=Mask(causal=True), positions=positions, position_bias=bias)
      return jnp.sum(out * jnp.cos(jnp.arange(D_MODEL))), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, table)

  (_, flex_out), flex_grads = run(None)
  (_, dense_out), dense_grads = run("reference")
  np.testing.assert_allclose(flex_out, dense_out, **TOL)
  for got, want in zip(flex_grads, dense_grads):
    np.testing.assert_allclose(got, want, **TOL)
