"""MultiHeadAttention: parity with torch.nn.MultiheadAttention (copied weights), a float64 NumPy
reference for GQA / QK-norm / soft-capping, the KV cache, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.attention import Mask
from flaxattn.nn import ContextCache, KVCache, MultiHeadAttention, capture_attention_weights
from flaxattn.nn.attention import mask_from_keras, mask_from_torch

RNG = np.random.default_rng(2)


def torch_and_ours(embed, heads, kdim=None):
  torch = pytest.importorskip("torch", reason="torch is the reference for MultiheadAttention")
  torch.manual_seed(0)
  ref = torch.nn.MultiheadAttention(embed, heads, bias=True, batch_first=True, kdim=kdim, vdim=kdim)
  with torch.no_grad():
    ref.in_proj_bias.normal_()
    ref.out_proj.bias.normal_()
  ours = MultiHeadAttention.from_torch_args(embed, heads, kdim=kdim, vdim=kdim, rngs=nnx.Rngs(0))
  head_dim = embed // heads
  if kdim is None:
    wq, wk, wv = ref.in_proj_weight.detach().numpy().reshape(3, embed, embed)
  else:
    wq, wk, wv = (getattr(ref, f"{n}_proj_weight").detach().numpy() for n in "qkv")
  bq, bk, bv = ref.in_proj_bias.detach().numpy().reshape(3, embed)
  for proj, w, b in ((ours.query, wq, bq), (ours.key, wk, bk), (ours.value, wv, bv)):
    proj.kernel[...] = jnp.asarray(w.T.reshape(-1, heads, head_dim))
    proj.bias[...] = jnp.asarray(b.reshape(heads, head_dim))
  ours.out.kernel[...] = jnp.asarray(ref.out_proj.weight.detach().numpy().T.reshape(heads, head_dim, embed))
  ours.out.bias[...] = jnp.asarray(ref.out_proj.bias.detach().numpy())
  return torch, ref, ours


@pytest.mark.parametrize("masking", ["none", "key_padding", "causal", "both", "float"])
def test_self_attention_matches_torch(masking):
  torch, ref, ours = torch_and_ours(16, 4)
  x = RNG.normal(size=(3, 6, 16)).astype(np.float32)
  lengths = np.array([6, 4, 1])
  padding = np.arange(6)[None, :] >= lengths[:, None]  # torch: True = ignore
  causal = np.triu(np.ones((6, 6), bool), 1)  # torch: True = blocked
  kwargs = {}
  if masking in ("key_padding", "both"):
    kwargs["key_padding_mask"] = padding
  if masking in ("causal", "both"):
    kwargs["attn_mask"] = causal
  if masking == "float":  # additive float masks: a key-padding penalty and a distance bias
    kwargs["key_padding_mask"] = np.where(padding, -1e4, 0.0).astype(np.float32)
    kwargs["attn_mask"] = -0.3 * np.abs(np.subtract.outer(np.arange(6), np.arange(6))).astype(np.float32)
  xt = torch.from_numpy(x)
  want_out, want_weights = ref(xt, xt, xt, need_weights=True, average_attn_weights=False,
                               **{k: torch.from_numpy(v) for k, v in kwargs.items()})
  mask, bias = mask_from_torch(**{k: jnp.asarray(v) for k, v in kwargs.items()})
  (out, _), weights = capture_attention_weights(ours, jnp.asarray(x), mask=mask, bias=bias,
                                               attention_impl=None)
  weights = weights[""][0]
  np.testing.assert_allclose(out, want_out.detach().numpy(), atol=1e-5)  # float32 both sides
  np.testing.assert_allclose(weights, want_weights.detach().numpy(), atol=1e-6)
  if masking == "both":  # the same visibility as a structured mask
    structured, _ = ours(jnp.asarray(x),
                         mask=Mask(causal=True, kv_lengths=jnp.asarray(lengths, jnp.int32)))
    np.testing.assert_allclose(structured, out, atol=1e-6)


def test_keras_masks():
  attend = RNG.random((2, 3, 3)) > 0.3
  mask = mask_from_keras(jnp.asarray(attend), use_causal_mask=True)
  want = attend[:, None] & np.tril(np.ones((3, 3), bool))
  np.testing.assert_array_equal(mask.materialize(3, 3), want)
  assert mask_from_keras() is None
  with pytest.raises(ValueError, match="attention_mask"):
    mask_from_keras(jnp.ones((3, 3), bool))


def test_cross_attention_with_kdim_matches_torch():
  torch, ref, ours = torch_and_ours(16, 2, kdim=10)
  x = RNG.normal(size=(2, 3, 16)).astype(np.float32)
  context = RNG.normal(size=(2, 5, 10)).astype(np.float32)
  padding = np.array([[False] * 5, [False, False, True, True, True]])
  want_out, want_weights = ref(torch.from_numpy(x), torch.from_numpy(context), torch.from_numpy(context),
                               key_padding_mask=torch.from_numpy(padding), average_attn_weights=False)
  (out, _), weights = capture_attention_weights(
      ours, jnp.asarray(x), jnp.asarray(context),
      mask=Mask(array=jnp.asarray(~padding)[:, None, None, :]), attention_impl=None)
  weights = weights[""][0]
  np.testing.assert_allclose(out, want_out.detach().numpy(), atol=1e-5)
  np.testing.assert_allclose(weights, want_weights.detach().numpy(), atol=1e-6)


def numpy_attention(module, x, softcap=None, qk_norm=False, eps=1e-6):
  """Float64 GQA attention from the module's parameters (no mask)."""
  p = lambda v: np.asarray(v[...], np.float64)
  q = np.einsum("btd,dhk->bthk", x, p(module.query.kernel))
  k = np.einsum("btd,dhk->bthk", x, p(module.key.kernel))
  v = np.einsum("btd,dhk->bthk", x, p(module.value.kernel))
  if qk_norm:
    rms = lambda a, s: a / np.sqrt((a ** 2).mean(-1, keepdims=True) + eps) * s
    q, k = rms(q, p(module.query_norm.scale)), rms(k, p(module.key_norm.scale))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
  if softcap is not None:
    logits = softcap * np.tanh(logits / softcap)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhts,bshk,hkd->btd", w, v, p(module.out.kernel))


@pytest.mark.parametrize("kv_heads,softcap,qk_norm", [(2, None, False), (1, 2.0, True)])
def test_gqa_softcap_qknorm_vs_numpy(kv_heads, softcap, qk_norm):
  module = MultiHeadAttention(4, 12, kv_heads=kv_heads, head_dim=5, use_bias=False, softcap=softcap,
                              qk_norm=qk_norm, rngs=nnx.Rngs(1))
  if qk_norm:
    module.query_norm.scale[...] = jnp.asarray(RNG.normal(size=5), jnp.float32)
    module.key_norm.scale[...] = jnp.asarray(RNG.normal(size=5), jnp.float32)
  x = RNG.normal(size=(2, 7, 12))
  got, _ = module(jnp.asarray(x, jnp.float32))
  np.testing.assert_allclose(got, numpy_attention(module, x, softcap, qk_norm), atol=1e-5)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_cache_matches_full_causal_pass(positions):
  module = MultiHeadAttention(4, 16, kv_heads=2, positions=positions, rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.normal(size=(2, 7, 16)), jnp.float32)
  graphdef, state = nnx.split(module)
  full, _ = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, mask=Mask(causal=True)))(state, x)
  step = jax.jit(lambda s, x, pos, cache: nnx.merge(graphdef, s)(x, positions=pos, cache=cache))
  cache = module.init_cache(2, 9)
  pieces = []
  for start, stop in ((0, 3), (3, 4), (4, 7)):
    pos = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    out, cache = step(state, x[:, start:stop], pos, cache)
    pieces.append(out)
  np.testing.assert_allclose(jnp.concatenate(pieces, 1), full, atol=1e-5)  # float32
  assert int(cache.index) == 7
  np.testing.assert_array_equal(cache.next_positions(), [7, 7])


def test_context_cache_cross_attention_matches_uncached():
  module = MultiHeadAttention(4, 16, kv_heads=2, kv_features=6, qk_norm=True, rngs=nnx.Rngs(2))
  x = jnp.asarray(RNG.normal(size=(2, 3, 16)), jnp.float32)
  context = jnp.asarray(RNG.normal(size=(2, 5, 6)), jnp.float32)
  mask = Mask(array=jnp.array([[True] * 5, [True] * 2 + [False] * 3])[:, None, None, :])
  expected, no_cache = module(x, context, mask=mask)
  assert no_cache is None
  out, cache = module(x[:, :2], context, mask=mask, cache=module.init_context_cache(2))
  assert cache.filled and cache.key.shape == (2, 5, 2, 4)
  np.testing.assert_allclose(out, expected[:, :2], atol=1e-6)  # the same float32 operations
  # Filled: the context is no longer needed, and its keys/values are the cached ones.
  out, _ = module(x[:, 2:], mask=mask, cache=cache)
  np.testing.assert_allclose(out, expected[:, 2:], atol=1e-6)
  with pytest.raises(ValueError, match="context of length 5"):
    module(x, context[:, :4], cache=cache)
  with pytest.raises(ValueError, match="needs the context"):
    module(x, cache=ContextCache.create(2, 2, 4))
  with pytest.raises(ValueError, match="length >= 1"):
    module(x, context[:, :0])


def test_keras_args_and_errors():
  module = MultiHeadAttention.from_keras_args(2, 3, in_features=8, value_dim=5, output_shape=6,
                                              kv_features=4, rngs=nnx.Rngs(0))
  assert module.query.kernel.shape == (8, 2, 3) and module.value.kernel.shape == (4, 2, 5)
  assert module.out.kernel.shape == (2, 5, 6)
  out, _ = module(jnp.ones((1, 2, 8)), jnp.ones((1, 3, 4)), mask=Mask(causal=True))
  assert out.shape == (1, 2, 6)
  with pytest.raises(ValueError, match="x must be"):
    module(jnp.ones((1, 2, 7)))
  with pytest.raises(ValueError, match="context must be"):
    module(jnp.ones((1, 2, 8)), jnp.ones((1, 3, 5)))
  with pytest.raises(ValueError, match="kv_heads"):
    MultiHeadAttention(4, 8, kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="batch_first"):
    MultiHeadAttention.from_torch_args(8, 2, batch_first=False, rngs=nnx.Rngs(0))
  self_attention = MultiHeadAttention(2, 8, attention_impl="xla", attention_dropout_rate=0.5,
                                      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="return_weights"):
    capture_attention_weights(self_attention, jnp.ones((1, 2, 8)), attention_impl=None)
  with pytest.raises(ValueError, match="dropout_rng"):
    self_attention(jnp.ones((1, 2, 8)), deterministic=False)
  with pytest.raises(ValueError, match="mask must be None"):
    self_attention(jnp.ones((1, 2, 8)), mask=Mask(causal=True), cache=self_attention.init_cache(1, 4))


def test_attention_dropout_changes_output_and_is_deterministic_per_key():
  module = MultiHeadAttention(2, 8, attention_dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = jnp.asarray(RNG.normal(size=(1, 6, 8)), jnp.float32)
  key = jax.random.key(3)
  a, _ = module(x, deterministic=False, dropout_rng=key)
  b, _ = module(x, deterministic=False, dropout_rng=key)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, module(x)[0])


def test_kvcache_is_a_pytree():
  cache = KVCache.create(2, 5, 1, 4)
  leaves = jax.tree.leaves(cache)
  assert len(leaves) == 4
  moved = jax.jit(lambda c: c.update(jnp.ones((2, 2, 1, 4)), jnp.ones((2, 2, 1, 4)),
                                     jnp.array([[0, 1], [-1, 0]])))(cache)
  np.testing.assert_array_equal(moved.positions, [[0, 1, -1, -1, -1], [-1, 0, -1, -1, -1]])
  np.testing.assert_array_equal(moved.next_positions(), [2, 1])
  with pytest.raises(ValueError, match="3 new tokens do not fit a cache of max_length=2"):
    KVCache.create(1, 2, 1, 4).update(jnp.ones((1, 3, 1, 4)), jnp.ones((1, 3, 1, 4)),
                                      jnp.zeros((1, 3), jnp.int32))
