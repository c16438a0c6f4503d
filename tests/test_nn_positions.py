"""Position encodings against float64 NumPy formulas written here, and RoPE's relative property."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.nn import positions as P

RNG = np.random.default_rng(0)


def test_sinusoidal_matches_paper_formula():
  pos = np.array([[0, 1, 5, 17], [3, 2, 1, 0]])
  d = 8
  want = np.zeros(pos.shape + (d,))
  for i in range(d // 2):
    angle = pos / 10000.0 ** (2 * i / d)
    want[..., 2 * i], want[..., 2 * i + 1] = np.sin(angle), np.cos(angle)
  np.testing.assert_allclose(P.sinusoidal(jnp.asarray(pos), d), want, atol=1e-5)  # float32 sin/cos


def rope_numpy(x, pos, base, rotary_dim):
  """HF Llama rotate_half form, float64."""
  half = rotary_dim // 2
  inv_freq = base ** (-np.arange(half) * 2.0 / rotary_dim)
  ang = pos[:, :, None, None] * inv_freq
  cos, sin = np.concatenate([np.cos(ang)] * 2, -1), np.concatenate([np.sin(ang)] * 2, -1)
  rot = x[..., :rotary_dim]
  rotate_half = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
  return np.concatenate([rot * cos + rotate_half * sin, x[..., rotary_dim:]], -1)


@pytest.mark.parametrize("rotary_dim", [8, 4])  # full and partial rotation
def test_rope_matches_rotate_half(rotary_dim):
  x = RNG.normal(size=(2, 5, 3, 8))
  pos = np.array([[0, 1, 2, 3, 4], [7, 9, 11, 100, 1000]])
  got = P.apply_rope(jnp.asarray(x, jnp.float32), jnp.asarray(pos), base=100.0, rotary_dim=rotary_dim)
  np.testing.assert_allclose(got, rope_numpy(x, pos, 100.0, rotary_dim), atol=1e-4)  # float32 angles at position 1000


def test_rope_dot_product_depends_only_on_offset():
  q = jnp.asarray(RNG.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(RNG.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    rq = P.apply_rope(q, jnp.array([[m]]), base=10000.0)
    rk = P.apply_rope(k, jnp.array([[n]]), base=10000.0)
    return float(jnp.sum(rq * rk))

  for offset in (0, 3, 11):
    scores = [score(start + offset, start) for start in (0, 5, 40)]
    np.testing.assert_allclose(scores, scores[0], atol=1e-4)
  assert abs(score(3, 0) - score(0, 0)) > 1e-3  # the offset does matter


def test_alibi_slopes_hand_derived():
  np.testing.assert_allclose(P.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
  # 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads (2^-0.5, 2^-1.5, ...).
  want = [2.0 ** -(i + 1) for i in range(8)] + [2.0 ** -(0.5 + i) for i in range(4)]
  np.testing.assert_allclose(P.alibi_slopes(12), want, rtol=1e-6)


def test_alibi_bias():
  q, k = np.array([[2, 3]]), np.array([[0, 1, 2, 3]])
  got = P.alibi_bias(4, jnp.asarray(q), jnp.asarray(k))
  slopes = np.array([2.0 ** (-2 * (i + 1)) for i in range(4)])  # 2^(-8/4 * (i+1))
  want = -slopes[None, :, None, None] * np.abs(q[0][:, None] - k[0][None, :])[None, None]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def t5_bucket(rel, bidirectional, num_buckets, max_distance):
  """T5's rule for one offset, written as scalar Python."""
  bucket = 0
  if bidirectional:
    num_buckets //= 2
    if rel > 0:
      bucket += num_buckets
    n = abs(rel)
  else:
    n = max(-rel, 0)
  exact = num_buckets // 2
  if n < exact:
    return bucket + n
  val = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return bucket + min(val, num_buckets - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets(bidirectional):
  rel = np.arange(-300, 301)
  got = np.asarray(P.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=32, max_distance=128))
  want = [t5_bucket(int(r), bidirectional, 32, 128) for r in rel]
  np.testing.assert_array_equal(got, want)


def test_relative_position_bias_reads_table_by_bucket():
  module = P.RelativePositionBias(3, num_buckets=8, max_distance=16, bidirectional=True,
                                  rngs=nnx.Rngs(0))
  table = np.asarray(module.embedding[...])
  q, k = np.array([[0, 4]]), np.array([[0, 1, 9]])
  got = np.asarray(module(jnp.asarray(q), jnp.asarray(k)))
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(got[0, :, i, j], table[t5_bucket(k[0, j] - q[0, i], True, 8, 16)])


def test_learned_positions_lookup():
  module = P.LearnedPositions(6, 4, rngs=nnx.Rngs(0))
  pos = np.array([[0, 5, 2]])
  np.testing.assert_array_equal(module(jnp.asarray(pos)), np.asarray(module.embedding[...])[pos])
  with pytest.raises(ValueError, match="sequence length 7 exceeds max_length=6"):
    module(jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="positions must be integer"):
    module(jnp.zeros((1, 3), jnp.float32))
