"""Kernelized linear attention and Performer FAVOR+ (`flaxattn.attention.linear`) against float64
NumPy formulas written independently as the explicit quadratic form `phi(Q) phi(K)^T` (masked),
Performer's convergence to softmax attention as features grow, the recurrent state, and gradients
against `jax.grad` of the quadratic form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.attention import linear

RNG = np.random.default_rng(7)
BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 37, 4, 2, 8  # 37: not a multiple of the chunk size.


def inputs(length=LENGTH, scale=1.0):
  shape = lambda heads: (BATCH, length, heads, HEAD_DIM)
  return tuple(RNG.normal(size=shape(h)).astype(np.float32) * scale
               for h in (HEADS, KV_HEADS, KV_HEADS))


def numpy_kernelized(phi_q, phi_k, v, visible):
  """float64 `sum_j w_ij v_j / sum_j w_ij`, `w = phi(q).phi(k)` where visible; 0 for empty rows.

  phi_q `[b, t, h, m]`, phi_k `[b, s, kvh, m]`, v `[b, s, kvh, d]`, visible `[b, t, s]`."""
  group = phi_q.shape[2] // phi_k.shape[2]
  phi_k, v = np.repeat(phi_k, group, axis=2), np.repeat(v, group, axis=2)
  weights = np.einsum("bthm,bshm->bhts", phi_q, phi_k) * visible[:, None]
  total = weights.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", weights / np.where(total > 0, total, 1.0), v)
  return out


def numpy_elu(x):
  x = x.astype(np.float64)
  return np.where(x > 0, x + 1.0, np.exp(x))


def numpy_favor(x, projection):
  x = x.astype(np.float64) * x.shape[-1] ** -0.25
  w = projection.astype(np.float64)
  return np.exp(x @ w.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(w.shape[0])


def causal_visible(segments):
  index = np.arange(segments.shape[1])
  return ((index[:, None] >= index[None, :])[None] & (segments[:, :, None] == segments[:, None, :])
          & (segments[:, None, :] > 0))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_matches_numpy(causal):
  q, k, v = inputs()
  valid = np.ones((BATCH, LENGTH), bool)
  valid[1, -5:] = False  # Padding at the end of row 1 ...
  valid[0, 3] = False    # ... and inside row 0.
  if causal:
    segments = valid.astype(np.int32)
    segments[0, 20:] *= 2  # Row 0 packs two documents.
    out = linear.linear_attention(q, k, v, causal=True, segment_ids=segments, chunk_size=8)
    visible = causal_visible(segments)
  else:
    out = linear.linear_attention(q, k, v, kv_valid=valid)
    visible = np.broadcast_to(valid[:, None, :], (BATCH, LENGTH, LENGTH))
  expected = numpy_kernelized(numpy_elu(q), numpy_elu(k), v, visible)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_matches_numpy_for_fixed_features(causal):
  q, k, v = inputs(scale=0.7)
  projection = linear.orthogonal_projection(jax.random.key(0), 24, HEAD_DIM)
  out = linear.performer_attention(q, k, v, projection, causal=causal, chunk_size=16)
  visible = (causal_visible(np.ones((BATCH, LENGTH), np.int32)) if causal
             else np.ones((BATCH, LENGTH, LENGTH), bool))
  expected = numpy_kernelized(numpy_favor(q, np.asarray(projection)),
                              numpy_favor(k, np.asarray(projection)), v, visible)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_orthogonal_projection_rows():
  projection = np.asarray(linear.orthogonal_projection(jax.random.key(3), 20, HEAD_DIM))
  assert projection.shape == (20, HEAD_DIM)
  block = projection[:HEAD_DIM] / np.linalg.norm(projection[:HEAD_DIM], axis=1, keepdims=True)
  np.testing.assert_allclose(block @ block.T, np.eye(HEAD_DIM), atol=1e-5)
  other = np.asarray(linear.orthogonal_projection(jax.random.key(4), 20, HEAD_DIM))
  assert not np.allclose(projection, other), "a new key must redraw the features"


@pytest.mark.slow
def test_performer_approaches_softmax_as_features_grow():
  """Mean absolute error to exact softmax attention (float64), averaged over 4 redraws, falls as
  the number of random features grows 16 -> 64 -> 256 (variance ~ 1/m)."""
  q, k, v = inputs(length=24, scale=0.5)
  qd, kd = (np.repeat(x, 1, axis=2).astype(np.float64) for x in (q, k))
  kd, vd = np.repeat(kd, HEADS // KV_HEADS, axis=2), np.repeat(v, HEADS // KV_HEADS, axis=2)
  logits = np.einsum("bthd,bshd->bhts", qd, kd) / np.sqrt(HEAD_DIM)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  exact = np.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdims=True), vd)
  errors = []
  for features in (16, 64, 256):
    draws = [np.abs(np.asarray(linear.performer_attention(
        q, k, v, linear.orthogonal_projection(jax.random.key(seed), features, HEAD_DIM))) - exact).mean()
             for seed in range(4)]
    errors.append(float(np.mean(draws)))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.5 * errors[0], errors


def test_recurrent_state_continues_the_causal_scan():
  """Attending a sequence in pieces through the state (a prompt, then one token at a time) equals
  one causal call."""
  q, k, v = inputs(length=12)
  qf, kf = linear.elu_log_features(q), linear.elu_log_features(k)
  whole, final = linear.causal_kernelized_attention(qf, kf, v, chunk_size=4)
  ones = lambda n: jnp.ones((BATCH, n), jnp.int32)
  state = linear.RecurrentState.create(BATCH, KV_HEADS, HEAD_DIM, HEAD_DIM)
  pieces = []
  for start, stop in ((0, 7), *((i, i + 1) for i in range(7, 12))):
    out, state = linear.causal_kernelized_attention(
        qf[:, start:stop], kf[:, start:stop], v[:, start:stop], segment_ids=ones(stop - start),
        state=state, chunk_size=4)
    pieces.append(out)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.key_value * jnp.exp(state.log_scale)[..., None, None],
                             final.key_value * jnp.exp(final.log_scale)[..., None, None], rtol=1e-5)


def test_large_logits_stay_finite():
  """Performer features of large inputs would overflow exp without the stabilisers."""
  q, k, v = inputs(scale=30.0)
  projection = linear.orthogonal_projection(jax.random.key(1), 16, HEAD_DIM)
  for causal in (False, True):
    out = linear.performer_attention(q, k, v, projection, causal=causal)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kind", ["linear", pytest.param("performer", marks=pytest.mark.slow)])
def test_gradients_match_quadratic_form(kind):
  q, k, v = inputs(length=20, scale=0.7)
  projection = linear.orthogonal_projection(jax.random.key(2), 16, HEAD_DIM)
  feature = (lambda x: jax.nn.elu(x) + 1.0) if kind == "linear" else (
      lambda x: jnp.exp(performer_feature_logs(x, projection)))
  probe = jnp.asarray(RNG.normal(size=(BATCH, 20, HEADS, HEAD_DIM)), jnp.float32)

  def quadratic(q, k, v):
    group = HEADS // KV_HEADS
    phi_k, vv = jnp.repeat(feature(k), group, axis=2), jnp.repeat(v, group, axis=2)
    weights = jnp.einsum("bthm,bshm->bhts", feature(q), phi_k) * jnp.tril(jnp.ones((20, 20)))
    return jnp.sum(jnp.einsum("bhts,bshd->bthd", weights / weights.sum(-1, keepdims=True), vv) * probe)

  def chunked(q, k, v):
    fn = (linear.linear_attention if kind == "linear" else
          lambda q, k, v, **kw: linear.performer_attention(q, k, v, projection, **kw))
    return jnp.sum(fn(q, k, v, causal=True, chunk_size=8) * probe)

  ours = jax.grad(chunked, argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(quadratic, argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(ours, expected):
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4)


def performer_feature_logs(x, projection):
  x = x * HEAD_DIM ** -0.25
  return x @ projection.T - 0.5 * jnp.sum(x * x, -1, keepdims=True) - 0.5 * jnp.log(projection.shape[0])


def test_errors_name_the_bad_value():
  q, k, v = inputs(length=8)
  with pytest.raises(ValueError, match="chunk_size"):
    linear.linear_attention(q, k, v, causal=True, chunk_size=0)
  with pytest.raises(ValueError, match="segment_ids are only supported with causal"):
    linear.linear_attention(q, k, v, segment_ids=np.ones((BATCH, 8), np.int32))
  with pytest.raises(ValueError, match="multiple of kv_heads"):
    linear.linear_attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="length >= 1"):
    linear.linear_attention(q[:, :0], k[:, :0], v[:, :0], causal=True)
  with pytest.raises(ValueError, match="num_features"):
    linear.orthogonal_projection(jax.random.key(0), 0, HEAD_DIM)


@pytest.mark.parametrize("kind,causal", [("linear", True), ("performer", False)])
def test_compiled_memory_grows_linearly(kind, causal):
  """XLA's memory analysis of forward+backward (arguments, outputs, temporaries): 2k -> 16k tokens
  multiplies the inputs by 8; anything forming `[q_len, kv_len]` would multiply by 64. Allows 10x."""
  projection = linear.orthogonal_projection(jax.random.key(0), 32, 32)

  def compiled_bytes(length):
    shape = jax.ShapeDtypeStruct((1, length, 4, 32), jnp.float32)
    attend = (linear.linear_attention if kind == "linear" else
              lambda *qkv, **kw: linear.performer_attention(*qkv, projection, **kw))
    grad = jax.jit(jax.grad(lambda q, k, v: attend(q, k, v, causal=causal).sum(), argnums=(0, 1, 2)))
    analysis = grad.lower(shape, shape, shape).compile().memory_analysis()
    return analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes

  short, long = compiled_bytes(2048), compiled_bytes(16384)
  assert long / short <= 10.0, f"{long / 2**20:.0f} MiB at 16k vs {short / 2**20:.0f} MiB at 2k"
