"""Attention weights leave the modules through `nnx.sow` (`capture_attention_weights`), scanned and
unrolled, under `jax.jit` and remat, equal to the dense reference kernel's; and every module returns
one structure with or without a cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.attention import Mask, dot_product_attention
from flaxattn.models import DecoderLM, EncoderDecoder
from flaxattn.nn import MultiHeadAttention, TransformerConfig, capture_attention_weights

CONFIG = TransformerConfig(vocab_size=23, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32,
                           num_layers=2, positions="learned", max_length=8, tie_embeddings=True)
IDS = jnp.asarray([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 1]], jnp.int32)


def reference_weights(attention, h, mask):
  """The 'reference' kernel's weights `[batch, heads, q, kv]` from `attention`'s own projections."""
  _, weights = dot_product_attention(attention.query(h), attention.key(h), attention.value(h),
                                     mask=mask, implementation="reference", return_weights=True)
  return weights


def test_bare_attention_sows_the_reference_weights_and_nothing_unasked():
  module = MultiHeadAttention(4, 16, kv_heads=2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  mask = Mask(causal=True)
  (out, cache), weights = capture_attention_weights(module, x, mask=mask)
  assert cache is None and list(weights) == [""] and len(weights[""]) == 1
  np.testing.assert_allclose(weights[""][0], reference_weights(module, x, mask), atol=1e-6)
  np.testing.assert_allclose(out, module(x, mask=mask)[0], atol=1e-6)
  assert module.sow_weights is False  # the helper worked on a copy
  # Without the flag a capture finds nothing: no weights are computed.
  _, sown = nnx.capture(module, nnx.Intermediate)(x, mask=mask)
  assert not jax.tree.leaves(sown)


@pytest.mark.parametrize("scan,remat", [(False, "none"),
                                        pytest.param(True, "full", marks=pytest.mark.slow)])
def test_stack_weights_under_jit_scanned_and_unrolled(scan, remat):
  unrolled = DecoderLM(CONFIG, rngs=nnx.Rngs(0))
  model = DecoderLM(dataclasses.replace(CONFIG, scan_layers=scan, remat=remat), rngs=nnx.Rngs(0))
  if scan:  # The same weights as the unrolled model, stacked on the layers axis.
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[nnx.state(b) for b in unrolled.decoder.layers])
    nnx.update(model.decoder.layers, stacked)
    for name in ("embedder", "decoder"):
      nnx.update(getattr(model, name), nnx.state(getattr(unrolled, name), nnx.Not(
          nnx.PathContains("layers"))))
  graphdef, state = nnx.split(model)
  (logits, cache), weights = jax.jit(
      lambda state, ids: capture_attention_weights(nnx.merge(graphdef, state), ids))(state, IDS)
  assert cache is None and list(weights) == ["decoder/layers/attention"]
  layers = weights["decoder/layers/attention"]
  assert len(layers) == 2 and all(w.shape == (2, 4, 6, 6) for w in layers)
  np.testing.assert_allclose(logits, model(IDS)[0], atol=1e-5)
  # Each layer's weights are the reference kernel's on that layer's own input.
  positions = jnp.broadcast_to(jnp.arange(6), IDS.shape)
  x = unrolled.embedder(IDS, positions)
  for block, got in zip(unrolled.decoder.layers, layers):
    expected = reference_weights(block.attention, block.attention_norm(x), Mask(causal=True))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    x, _ = block(x, positions=positions, mask=Mask(causal=True))


def test_attention_returns_one_structure_with_and_without_cache():
  module = MultiHeadAttention(4, 16, kv_heads=2, positions="rope", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  out, none = module(x, mask=Mask(causal=True))
  cached, cache = module(x, cache=module.init_cache(2, 4))
  assert none is None and cache is not None
  np.testing.assert_allclose(cached, out, atol=1e-5)
  linear = MultiHeadAttention(4, 16, attention_kind="linear", rngs=nnx.Rngs(0))
  assert linear(x)[1] is None and linear(x, cache=linear.init_cache(2, 4))[1] is not None


@pytest.mark.slow  # Eager model calls; test_nn_models covers the cached paths in depth.
def test_models_return_one_structure_with_and_without_cache():
  model = DecoderLM(CONFIG, rngs=nnx.Rngs(0))
  logits, none = model(IDS)
  cached, cache = model(IDS, cache=model.init_cache(2, 8))
  assert none is None and cache is not None
  np.testing.assert_allclose(cached, logits, atol=1e-5)
  seq2seq = EncoderDecoder(dataclasses.replace(CONFIG, num_decoder_layers=1), rngs=nnx.Rngs(0))
  encoded = seq2seq.encode(IDS)
  logits, none = seq2seq.decode(IDS[:, :3], encoded)
  cached, cache = seq2seq.decode(IDS[:, :3], encoded, cache=seq2seq.init_cache(2, 8))
  assert none is None and cache is not None
  np.testing.assert_allclose(cached, logits, atol=1e-5)
  np.testing.assert_allclose(seq2seq(IDS, IDS[:, :3]), logits, atol=1e-5)
