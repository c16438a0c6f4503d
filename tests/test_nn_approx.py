"""Efficient attention as model options: `TransformerConfig.window` (sliding window, training and
KV-cache decoding) and `attention_kind` 'linear'/'performer' (recurrent-state decoding == full
forward, Performer redraws, parameter-only state), against explicit references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.attention import Mask
from flaxattn.attention.linear import RecurrentState
from flaxattn.models import DecoderLM, EncoderModel
from flaxattn.nn import MultiHeadAttention, TransformerConfig, capture_attention_weights
from test_nn_models import (LLAMA, NEW, PROMPT_MASK, PROMPTS, call, check_against_unpadded,
                            decode_incrementally)

RNG = np.random.default_rng(5)


def cached_and_full(config, tol):
  """Decodes PROMPTS/NEW through the cache and compares with the padded full forward pass and with
  a row run alone without padding."""
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, ids, mask, cache: nnx.merge(graphdef, state)(ids, mask, cache=cache))
  incremental = decode_incrementally(functools.partial(step, state), model.init_cache(3, 12))
  ids = np.concatenate([PROMPTS, NEW], 1)
  valid = np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1)
  padded = np.asarray(call(model, ids, valid)[0])
  np.testing.assert_allclose(incremental[valid.astype(bool)], padded[valid.astype(bool)], **tol)
  check_against_unpadded(incremental, lambda ids: np.asarray(call(model, ids)[0]))
  return model


@pytest.mark.parametrize("kind,scan", [
    ("linear", False), pytest.param("performer", True, marks=pytest.mark.slow)])
def test_kernelized_decoding_matches_full_forward(kind, scan):
  config = dataclasses.replace(LLAMA, attention_kind=kind, scan_layers=scan, performer_features=32,
                               linear_chunk_size=4)
  model = cached_and_full(config, dict(rtol=1e-4, atol=1e-4))
  cache = model.init_cache(3, 12)
  assert isinstance(cache.self_attention, (RecurrentState, tuple))
  # The state's size does not depend on max_length.
  assert jax.tree.map(jnp.shape, model.init_cache(3, 12)) == jax.tree.map(
      jnp.shape, model.init_cache(3, 16))


def test_windowed_decoding_matches_full_forward():
  cached_and_full(dataclasses.replace(LLAMA, window=3), dict(rtol=1e-5, atol=1e-5))


def explicit_band(length, window, causal):
  index = np.arange(length)
  band = np.abs(index[:, None] - index[None, :]) < window
  return band & (index[:, None] >= index[None, :]) if causal else band


@pytest.mark.parametrize("causal", [False, True])
def test_window_equals_explicit_band_mask(causal):
  """MultiHeadAttention(window=w) == the same weights with an explicit band mask (reference)."""
  kwargs = dict(kv_heads=2, attention_impl="reference")
  windowed = MultiHeadAttention(4, 16, window=3, rngs=nnx.Rngs(1), **kwargs)
  plain = MultiHeadAttention(4, 16, rngs=nnx.Rngs(1), **kwargs)
  x = jnp.asarray(RNG.normal(size=(2, 9, 16)), jnp.float32)
  mask = Mask(causal=True) if causal else None
  got, _ = windowed(x, mask=mask)
  expected, _ = plain(x, mask=Mask(array=jnp.asarray(explicit_band(9, 3, causal))))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  # The blockwise kernel skips tiles outside the window and agrees.
  blockwise = MultiHeadAttention(4, 16, window=3, kv_heads=2, attention_impl="blockwise",
                                 rngs=nnx.Rngs(1))
  np.testing.assert_allclose(blockwise(x, mask=mask)[0], expected, rtol=1e-5, atol=1e-5)


def numpy_linear_attention(x, module, causal, valid):
  """float64 elu+1 attention from the module's own weights: the explicit quadratic form."""
  w = lambda dense: np.asarray(dense.kernel[...], np.float64)
  x = np.asarray(x, np.float64)
  q, k, v = (np.einsum("bte,ehd->bthd", x, w(d)) for d in (module.query, module.key, module.value))
  phi = lambda a: np.where(a > 0, a + 1, np.exp(a))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, 2), np.repeat(v, group, 2)
  weights = np.einsum("bthd,bshd->bhts", phi(q), phi(k)) * valid[:, None, None, :]
  if causal:
    weights = weights * np.tril(np.ones(weights.shape[-2:]))
  weights = weights / weights.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", weights, v)
  return np.einsum("bthd,hde->bte", out, w(module.out)), weights


@pytest.mark.parametrize("causal", [False, True])
def test_linear_module_matches_numpy(causal):
  module = MultiHeadAttention(4, 16, kv_heads=2, attention_kind="linear", use_bias=False,
                              linear_chunk_size=4, rngs=nnx.Rngs(2))
  x = jnp.asarray(RNG.normal(size=(2, 9, 16)), jnp.float32)
  valid = np.ones((2, 9), bool)
  valid[1, 6:] = False
  positions = jnp.where(valid, jnp.arange(9), -1)
  mask = Mask(causal=causal, q_segment_ids=jnp.asarray(valid, jnp.int32))
  (got, _), weights = capture_attention_weights(module, x, mask=mask, positions=positions)
  weights = weights[""][0]
  expected, expected_weights = numpy_linear_attention(x, module, causal, valid)
  np.testing.assert_allclose(np.asarray(got)[valid], expected[valid], rtol=2e-4, atol=2e-5)
  query_rows = np.broadcast_to(valid[:, None, :, None], expected_weights.shape)
  np.testing.assert_allclose(np.asarray(weights)[query_rows], expected_weights[query_rows],
                             rtol=2e-4, atol=1e-6)


def test_performer_redraws_without_stored_state():
  config = dataclasses.replace(LLAMA, attention_kind="performer", performer_features=16,
                               num_layers=1)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  _, params, rest = nnx.split(model, nnx.Param, ...)
  assert not jax.tree.leaves(rest), "Performer features must not be module state"
  ids = jnp.asarray(RNG.integers(1, 37, size=(2, 10)))

  def runner(model):
    graphdef, state = nnx.split(model)
    evaluate = jax.jit(lambda ids: nnx.merge(graphdef, state)(ids)[0])
    train = jax.jit(lambda ids, rng: nnx.merge(graphdef, state)(ids, deterministic=False,
                                                                  dropout_rng=rng)[0])
    return evaluate, lambda seed: np.asarray(train(ids, jax.random.key(seed)))

  evaluate, train = runner(model)
  fixed = np.asarray(evaluate(ids))
  np.testing.assert_array_equal(fixed, np.asarray(evaluate(ids)))
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2)), "a new key must redraw the features"
  assert not np.allclose(train(1), fixed)
  _, no_redraw = runner(
      DecoderLM(dataclasses.replace(config, performer_redraw=False), rngs=nnx.Rngs(0)))
  np.testing.assert_allclose(no_redraw(1), fixed, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", pytest.param("performer", marks=pytest.mark.slow)])
def test_kernelized_encoder_ignores_padding_and_has_finite_gradients(kind):
  config = dataclasses.replace(LLAMA, attention_kind=kind, performer_features=16, num_layers=1)
  model = EncoderModel(config, rngs=nnx.Rngs(0))
  ids = jnp.asarray(RNG.integers(1, 37, size=(2, 8)))
  mask = jnp.ones((2, 8), jnp.int32).at[1, 5:].set(0)
  padded = np.asarray(model(ids.at[1, 5:].set(3), mask))
  alone = np.asarray(model(ids[1:, :5]))
  np.testing.assert_allclose(padded[1, :5], alone[0], rtol=1e-4, atol=1e-5)
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(ids, mask) ** 2)))(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_config_rejects_what_kernelized_attention_cannot_do():
  with pytest.raises(ValueError, match="attention_kind must be one of"):
    dataclasses.replace(LLAMA, attention_kind="cosine")
  with pytest.raises(ValueError, match="window=4 does not apply to attention_kind='linear'"):
    dataclasses.replace(LLAMA, attention_kind="linear", window=4)
  with pytest.raises(ValueError, match="positions='alibi' does not apply"):
    dataclasses.replace(LLAMA, attention_kind="performer", positions="alibi")
  with pytest.raises(ValueError, match="window must be a positive int"):
    dataclasses.replace(LLAMA, window=0)
  module = MultiHeadAttention(4, 16, attention_kind="linear", rngs=nnx.Rngs(0))
  x = jnp.ones((1, 4, 16))
  with pytest.raises(ValueError, match="mask kinds \\['array'\\]"):
    module(x, mask=Mask(array=jnp.ones((1, 1, 4, 4), bool)))
  with pytest.raises(ValueError, match="returns no attention weights with a RecurrentState"):
    capture_attention_weights(module, x, cache=module.init_cache(1, 4))
  with pytest.raises(ValueError, match="decodes with a RecurrentState"):
    module(x, cache=MultiHeadAttention(4, 16, rngs=nnx.Rngs(0)).init_cache(1, 4))
