"""Probes (`attention_rows`, `attention_statistics`) against a float64 NumPy oracle written here.

The lse comes from the kernel (`flex_attention(..., return_lse=True)`, once from
`blockwise.forward_with_lse`), as a user would get it; the oracle recomputes everything densely in
float64 from the same query/key with NumPy index grids: softmax weights, entropy `-sum p log p`,
sink mass, max weight and the top-k keys by `np.argsort`. Cases: causal, documents (captured
ids, once through a per-row block mask), ALiBi, an empty row, a window over 21 queries x 45 keys, a
`Mask` (causal, window, documents, lengths) with blockwise's lse, a `Mask` aligned at the end.
Shapes: batch 2, 4 query heads over 2 key heads (GQA), head_dim 8, 37 positions in tiles of 16 (a
ragged last tile). Random normal inputs, so weights have no ties. Memory: the traced program at 4k
is walked for any `q_len * kv_len` intermediate. ~17 s on 2 shared cores (one compile per test).

Tolerances: weights and statistics are float32 recomputations of O(1) values from a float32 lse:
2e-5 absolute + 1e-5 relative (entropy 1e-4, it sums ~37 terms of p log p).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.attention import (Mask, and_masks, attention_rows, attention_statistics,
                                create_block_mask, flex_attention)
from flaxattn.attention import blockwise, flex
from attention_support import largest_intermediate

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 2, 37, 4, 2, 8, 16
TOL = dict(atol=2e-5, rtol=1e-5)
ENTROPY_TOL = dict(atol=1e-4, rtol=1e-5)
TOP_K, SINK_KEYS, EMPTY_ROW = 4, 2, 5
SLOPES = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)
# Two documents per row, split at different places (ids captured by the mask_mod).
DOC_IDS = np.stack([np.arange(LENGTH) >= 11, np.arange(LENGTH) >= 23]).astype(np.int32)


def _inputs(q_len=LENGTH, kv_len=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((BATCH, q_len, HEADS, HEAD_DIM)).astype(np.float32),
          rng.standard_normal((BATCH, kv_len, KV_HEADS, HEAD_DIM)).astype(np.float32))


def _grids(q_len, kv_len):
  return (np.arange(BATCH)[:, None, None, None], np.arange(HEADS)[None, :, None, None],
          np.arange(q_len)[None, None, :, None], np.arange(kv_len)[None, None, None, :])


def _case(name, q_len, kv_len):
  """`(score_mod, mask_mod, numpy score(s, b, h, i, j), numpy visible(b, h, i, j))`."""
  ids = jnp.asarray(DOC_IDS)
  slopes = jnp.asarray(SLOPES)
  causal = lambda b, h, i, j: j <= i
  np_causal = lambda b, h, i, j: j <= i
  if name == "causal":
    return None, causal, None, np_causal
  if name == "documents":
    return (None, and_masks(causal, lambda b, h, i, j: ids[b, i] == ids[b, j]), None,
            lambda b, h, i, j: (j <= i) & (DOC_IDS[:, None, :, None] == DOC_IDS[:, None, None, :]))
  if name == "alibi":
    return (lambda s, b, h, i, j: s - slopes[h] * (i - j), causal,
            lambda s, b, h, i, j: s - SLOPES[h] * (i - j), np_causal)
  if name == "empty_row":
    return (None, lambda b, h, i, j: (j <= i) & (i != EMPTY_ROW), None,
            lambda b, h, i, j: (j <= i) & (i != EMPTY_ROW))
  if name == "cross":  # 21 queries over 45 keys, no causal alignment: a window on raw indices.
    return (None, lambda b, h, i, j: jnp.abs(2 * i - j) <= 6, None,
            lambda b, h, i, j: np.abs(2 * i - j) <= 6)
  raise ValueError(name)


def _oracle(q, k, score, visible):
  """Float64 weights `[batch, heads, q_len, kv_len]` (0 where hidden and on rows without keys)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k_rep = np.repeat(k, HEADS // k.shape[2], axis=2)
  s = np.einsum("bihd,bjhd->bhij", q, k_rep) * q.shape[-1] ** -0.5
  b, h, i, j = _grids(q.shape[1], k.shape[1])
  if score is not None:
    s = score(s, b, h, i, j)
  seen = np.broadcast_to(visible(b, h, i, j), s.shape)
  s = np.where(seen, s, -np.inf)
  row_max = s.max(-1, keepdims=True)
  e = np.where(seen, np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0)), 0.0)
  total = e.sum(-1, keepdims=True)
  return e / np.where(total > 0, total, 1.0), seen


def _oracle_statistics(p, seen):
  logs = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), 0.0)
  order = np.argsort(-np.where(seen, p, -1.0), axis=-1, kind="stable")[..., :TOP_K]
  keys = np.where(np.take_along_axis(seen, order, -1), order, -1)
  return {"entropy": -(p * logs).sum(-1), "sink_mass": p[..., :SINK_KEYS].sum(-1),
          "max_weight": p.max(-1), "total_weight": p.sum(-1),
          "top_k_weights": np.take_along_axis(p, order, -1) * (keys >= 0), "top_k_keys": keys}


CASES = [("causal", LENGTH, LENGTH), ("documents", LENGTH, LENGTH), ("alibi", LENGTH, LENGTH),
         ("empty_row", LENGTH, LENGTH), ("cross", 21, 45)]


@pytest.mark.parametrize("name,q_len,kv_len", CASES, ids=[c[0] for c in CASES])
def test_rows_and_statistics_match_oracle(name, q_len, kv_len):
  q, k = _inputs(q_len, kv_len)
  score_mod, mask_mod, np_score, np_visible = _case(name, q_len, kv_len)
  p, seen = _oracle(q, k, np_score, np_visible)
  rows = (0, EMPTY_ROW, 17, q_len - 1)

  @jax.jit
  def run(q, k):
    _, lse = flex_attention(q, k, k, score_mod, mask_mod, return_lse=True)
    weights = attention_rows(q, k, lse, rows, score_mod=score_mod, mask_mod=mask_mod)
    if name == "documents":  # A per-row block mask; the mask_mod comes from it.
      tiles = dict(block_mask=create_block_mask(mask_mod, BATCH, None, q_len, kv_len, BLOCK))
    else:
      tiles = dict(mask_mod=mask_mod, block_size=BLOCK)
    stats = attention_statistics(q, k, lse, score_mod=score_mod, top_k=TOP_K, sink_keys=SINK_KEYS,
                                 **tiles)
    return weights, stats

  weights, stats = run(q, k)
  np.testing.assert_allclose(weights, p[:, :, list(rows)], **TOL)
  want = _oracle_statistics(p, seen)
  assert set(stats) == set(want)
  for stat in ("sink_mass", "max_weight", "top_k_weights"):
    np.testing.assert_allclose(stats[stat], want[stat], **TOL, err_msg=stat)
  np.testing.assert_allclose(stats["entropy"], want["entropy"], **ENTROPY_TOL)
  np.testing.assert_allclose(stats["total_weight"], seen.any(-1).astype(float), **TOL)
  np.testing.assert_array_equal(stats["top_k_keys"], want["top_k_keys"])
  if name == "empty_row":
    assert not seen[:, :, EMPTY_ROW].any()
    for stat in ("entropy", "sink_mass", "max_weight", "total_weight", "top_k_weights"):
      np.testing.assert_array_equal(stats[stat][:, :, EMPTY_ROW], 0.0, err_msg=stat)
    np.testing.assert_array_equal(stats["top_k_keys"][:, :, EMPTY_ROW], -1)
    np.testing.assert_array_equal(weights[:, :, 1], 0.0)


def test_traced_rows_and_mask_from_blockwise_lse():
  """A `Mask` (causal, a window, documents, lengths: padded queries see nothing) with blockwise's
  lse `[b, q, h]`, +inf on the padded rows; rows passed as a traced array; default tiles."""
  q, k = _inputs()
  lengths = np.array([30, 37], np.int32)
  mask = Mask(causal=True, window=(15, 0), q_segment_ids=jnp.asarray(DOC_IDS),
              q_lengths=jnp.asarray(lengths), kv_lengths=jnp.asarray(lengths))
  docs = DOC_IDS[:, None, :, None] == DOC_IDS[:, None, None, :]
  p, seen = _oracle(q, k, None, lambda b, h, i, j: (j <= i) & (j >= i - 15) & docs
                    & (i < lengths[b]) & (j < lengths[b]))

  @jax.jit
  def run(q, k, rows):
    _, lse = blockwise.forward_with_lse(q, k, k, mask=mask, scale=HEAD_DIM ** -0.5, block_q=BLOCK,
                                        block_kv=BLOCK)
    lse = jnp.swapaxes(lse, 1, 2)
    stats = attention_statistics(q, k, lse, mask=mask, sink_keys=SINK_KEYS)
    return attention_rows(q, k, lse, rows, mask=mask), stats

  rows = np.array([3, 33, 36], np.int32)
  weights, stats = run(q, k, rows)
  np.testing.assert_allclose(weights, p[:, :, rows], **TOL)
  np.testing.assert_array_equal(weights[0, :, 1:], 0.0)  # Rows 33, 36 of batch row 0 are padding.
  want = _oracle_statistics(p, seen)
  np.testing.assert_allclose(stats["entropy"], want["entropy"], **ENTROPY_TOL)
  np.testing.assert_allclose(stats["sink_mass"], want["sink_mass"], **TOL)
  assert "top_k_keys" not in stats


def test_mask_aligns_queries_at_the_end():
  """`Mask(causal=True, array=...)` with 21 queries over 45 keys: query i sits at position i + 24
  (as Mask and blockwise align them), through the mask_mod the probes build from it."""
  q, k = _inputs(21, 45)
  array = np.random.default_rng(1).random((HEADS, 21, 45)) < 0.7  # Broadcast over the batch.
  mask = Mask(causal=True, array=jnp.asarray(array))
  p, _ = _oracle(q, k, None, lambda b, h, i, j: (j <= i + 24) & array[None])
  _, lse = blockwise.forward_with_lse(q, k, k, mask=mask, scale=HEAD_DIM ** -0.5)
  weights = attention_rows(q, k, jnp.swapaxes(lse, 1, 2), (0, 20), mask=mask)
  np.testing.assert_allclose(weights, p[:, :, [0, 20]], **TOL)


def test_bad_arguments_raise():
  q, k = _inputs()
  lse = jnp.zeros((BATCH, HEADS, LENGTH))
  with pytest.raises(ValueError, match="rows must be"):
    attention_rows(q, k, lse, (0, LENGTH))
  with pytest.raises(ValueError, match="lse must have shape"):
    attention_rows(q, k, jnp.swapaxes(lse, 1, 2), (0,))
  with pytest.raises(ValueError, match="top_k must be"):
    attention_statistics(q, k, lse, top_k=LENGTH + 1)
  with pytest.raises(ValueError, match="mask_mod or mask"):
    attention_rows(q, k, lse, (0,), mask_mod=lambda b, h, i, j: j <= i, mask=Mask(causal=True))


# ------------------------------------------------------------------------------------------------
# Memory: no intermediate of q_len * kv_len elements, checked on the traced program (no timing).

def test_no_quadratic_intermediate_at_4k():
  n = 4096
  q = jax.ShapeDtypeStruct((1, n, 2, 4), jnp.float32)
  k = jax.ShapeDtypeStruct((1, n, 1, 4), jnp.float32)
  lse = jax.ShapeDtypeStruct((1, 2, n), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, n), jnp.int32)

  def mods(ids):
    return (lambda s, b, h, i, j: s - 0.1 * (i - j),
            and_masks(lambda b, h, i, j: j <= i, lambda b, h, i, j: ids[b, i] == ids[b, j]))

  def stats(q, k, lse, ids):
    score_mod, mask_mod = mods(ids)
    return attention_statistics(q, k, lse, score_mod=score_mod, mask_mod=mask_mod, top_k=8)

  def rows(q, k, lse, ids):
    score_mod, mask_mod = mods(ids)
    return attention_rows(q, k, lse, (0, 1000, n - 1), score_mod=score_mod, mask_mod=mask_mod)

  def dense(q, k, lse, ids):  # The walk does see a quadratic array where there is one.
    return flex_attention(q, k, k, mods(ids)[0], implementation="reference")

  # The largest is create_block_mask's step over a chunk of tiles (bounded by _MASK_CHUNK elements).
  largest, nested = largest_intermediate(jax.make_jaxpr(stats)(q, k, lse, ids).jaxpr)
  assert nested > 0 and 0 < largest <= flex._MASK_CHUNK < n * n, (largest, nested)
  largest, _ = largest_intermediate(jax.make_jaxpr(rows)(q, k, lse, ids).jaxpr)
  assert largest <= 16 * n, largest  # [batch, heads, 3 rows, kv_len] and the inputs.
  assert largest_intermediate(jax.make_jaxpr(dense)(q, k, lse, ids).jaxpr)[0] >= n * n
