"""The blockwise kernel against the reference where tiling matters.

Small explicit block sizes (8 query x 16 key positions) make every case span several tiles, with lengths
that are not multiples of the blocks, so padding, block skipping and the online softmax are all
exercised. The broad property-based comparison of every implementation lives in the shared suite.

Oracles: `flaxattn.attention.reference` (dense float32 scores, plain autodiff; it shares only the mask's
visibility rule `Mask.tile` with the kernel), and for one case a float64 NumPy softmax with its own
causal mask, written here.
Tolerances: float32 outputs and gradients to 2e-5 absolute + 2e-5 relative (values are O(1); the
online softmax reorders sums); bfloat16 to 3e-2, against the reference on the same bfloat16 inputs.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.attention import blockwise, dot_product_attention, reference
from flaxattn.attention.mask import Mask

BATCH, Q_LEN, KV_LEN, HEADS, KV_HEADS, HEAD_DIM, VALUE_DIM = 2, 37, 45, 4, 2, 8, 6
BLOCKS = dict(block_q=8, block_kv=16)
F32_TOL = dict(atol=2e-5, rtol=2e-5)


def _inputs(q_len=Q_LEN, kv_len=KV_LEN, heads=HEADS, kv_heads=KV_HEADS, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  query = rng.standard_normal((BATCH, q_len, heads, HEAD_DIM))
  key = rng.standard_normal((BATCH, kv_len, kv_heads, HEAD_DIM))
  value = rng.standard_normal((BATCH, kv_len, kv_heads, VALUE_DIM))
  cotangent = rng.standard_normal((BATCH, q_len, heads, VALUE_DIM))
  return tuple(jnp.asarray(x, dtype) for x in (query, key, value)) + (jnp.asarray(cotangent),)


def _output_and_grads(implementation, query, key, value, cotangent, *, mask=None, bias=None,
                      softcap=None):
  """Output and gradients of `sum(out * cotangent)` w.r.t. query, key, value (and bias if given)."""

  def loss(query, key, value, bias):
    out = implementation(query, key, value, mask=mask, bias=bias, scale=HEAD_DIM ** -0.5,
                         softcap=softcap, dropout_rate=0.0, dropout_rng=None,
                         return_weights=False)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums, has_aux=True))(query, key, value, bias)
  return (out,) + grads


def _assert_matches_reference(inputs, tolerance=F32_TOL, **kwargs):
  got = _output_and_grads(functools.partial(blockwise.attention, **BLOCKS), *inputs, **kwargs)
  want = _output_and_grads(reference.attention, *inputs, **kwargs)
  for name, g, w in zip(("out", "d_query", "d_key", "d_value", "d_bias"), got, want):
    assert g.shape == w.shape and g.dtype == w.dtype, name
    assert not np.any(np.isnan(np.asarray(g, np.float32))), name
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), **tolerance,
                               err_msg=name)
  return got


@pytest.fixture(scope="module")
def inputs():
  return _inputs()


def test_forward_matches_float64_numpy(inputs):
  query, key, value, _ = inputs
  out = blockwise.attention(query, key, value, mask=Mask(causal=True), bias=None,
                            scale=HEAD_DIM ** -0.5, softcap=None, dropout_rate=0.0,
                            dropout_rng=None, return_weights=False, **BLOCKS)
  q, k, v = (np.asarray(x, np.float64) for x in (query, key, value))
  group = HEADS // KV_HEADS
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, k) * HEAD_DIM ** -0.5
  offset = KV_LEN - Q_LEN  # End-aligned causal: query i sits at key position i + offset.
  visible = np.arange(KV_LEN)[None, :] <= np.arange(Q_LEN)[:, None] + offset
  logits = np.where(visible, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", weights, v), **F32_TOL)


def test_unmasked_gqa_with_broadcast_bias(inputs):
  bias = jnp.asarray(np.random.default_rng(1).standard_normal((1, HEADS, 1, KV_LEN)), jnp.float32)
  _assert_matches_reference(inputs, bias=bias)


@pytest.mark.parametrize("mask", [
    Mask(causal=True),
    Mask(window=(5, 3)),
    Mask(causal=True, window=(9, None)),
    Mask(window=(None, 2)),
], ids=["causal", "window", "causal_window", "right_window"])
def test_causal_and_window_across_block_boundaries(inputs, mask):
  _assert_matches_reference(inputs, mask=mask)


def test_causal_with_more_queries_than_keys():
  # q_len > kv_len: the first queries sit before key 0 and see nothing.
  _assert_matches_reference(_inputs(q_len=50, kv_len=21), mask=Mask(causal=True))


def test_segments_lengths_and_fully_masked_rows(inputs):
  rng = np.random.default_rng(2)
  segments = jnp.asarray(np.sort(rng.integers(0, 4, (BATCH, Q_LEN)), axis=1), jnp.int32)
  kv_segments = jnp.asarray(np.sort(rng.integers(0, 4, (BATCH, KV_LEN)), axis=1), jnp.int32)
  # Batch row 1 has no valid query at all; batch row 0 has keys only in its first 20 positions.
  mask = Mask(q_segment_ids=segments, kv_segment_ids=kv_segments,
              q_lengths=jnp.array([30, 0]), kv_lengths=jnp.array([20, KV_LEN]))
  out, d_query, _, _ = _assert_matches_reference(inputs, mask=mask)
  assert np.all(np.asarray(out[1]) == 0.0) and np.all(np.asarray(d_query[1]) == 0.0)
  assert np.all(np.asarray(out[0, 30:]) == 0.0)


def test_explicit_array_with_full_bias_and_softcap(inputs):
  rng = np.random.default_rng(3)
  array = jnp.asarray(rng.random((BATCH, 1, Q_LEN, KV_LEN)) > 0.6)
  bias = jnp.asarray(rng.standard_normal((BATCH, HEADS, Q_LEN, KV_LEN)), jnp.float32)
  _assert_matches_reference(inputs, mask=Mask(array=array), bias=bias, softcap=2.0)


def test_single_query_multi_query_attention():
  _assert_matches_reference(_inputs(q_len=1, heads=4, kv_heads=1),
                            mask=Mask(causal=True, window=(20, 0)))


def test_bfloat16(inputs):
  bf16 = tuple(x.astype(jnp.bfloat16) for x in inputs[:3]) + inputs[3:]
  got = _assert_matches_reference(bf16, tolerance=dict(atol=3e-2, rtol=3e-2), mask=Mask(causal=True))
  assert all(x.dtype == jnp.bfloat16 for x in got)


def _visible_tiles(mask: Mask, q_len, kv_len, block_q, block_kv):
  """`[q_blocks, kv_blocks]`: whether a tile holds any visible entry, from the dense mask."""
  visible = np.asarray(mask.materialize(q_len, kv_len))
  visible = np.broadcast_to(visible, visible.shape[:2] + (q_len, kv_len))
  q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
  padded = np.zeros((q_blocks * block_q, kv_blocks * block_kv), bool)
  padded[:q_len, :kv_len] = visible.any(axis=(0, 1))
  return padded.reshape(q_blocks, block_q, kv_blocks, block_kv).any(axis=(1, 3))


@pytest.mark.parametrize("mask, q_len, kv_len", [
    (Mask(causal=True), 64, 64),
    (Mask(causal=True), 24, 64),
    (Mask(causal=True, window=(16, 0)), 64, 64),
    (Mask(window=(8, 20)), 64, 40),
], ids=["causal", "causal_decode", "sliding", "two_sided"])
def test_skips_exactly_the_invisible_tiles(mask, q_len, kv_len):
  # Causal/window masks leave a contiguous band of visible tiles per query block: the loop must
  # visit exactly that band (no invisible tile computed, no visible tile skipped).
  plan = blockwise._Plan(q_len=q_len, kv_len=kv_len, block_q=8, block_kv=8, group=1, softcap=None)
  tiles = _visible_tiles(mask, q_len, kv_len, 8, 8)
  for q_block in range(plan.q_blocks):
    lo, hi = (int(x) for x in blockwise._kv_block_range(mask, plan, jnp.int32(q_block)))
    visited = np.zeros(plan.kv_blocks, bool)
    visited[lo:hi] = True
    np.testing.assert_array_equal(visited, tiles[q_block], err_msg=f"query block {q_block}")


def test_segment_and_length_bounds_cover_visible_tiles():
  segments = jnp.asarray(np.repeat(np.arange(4), 16)[None].repeat(2, 0), jnp.int32)
  mask = Mask(q_segment_ids=segments, kv_lengths=jnp.array([40, 50]),
              q_lengths=jnp.array([56, 20]))
  plan = blockwise._Plan(q_len=64, kv_len=64, block_q=8, block_kv=8, group=1, softcap=None)
  tiles = _visible_tiles(mask, 64, 64, 8, 8)
  for q_block in range(plan.q_blocks):
    lo, hi = (int(x) for x in blockwise._kv_block_range(mask, plan, jnp.int32(q_block)))
    visible = np.flatnonzero(tiles[q_block])
    assert np.all((visible >= lo) & (visible < hi)), f"query block {q_block} misses a tile"
    # Segments of 16 tokens: a query block meets at most the two key blocks of its segment; the last
    # one is past every query length.
    assert hi - lo <= (2 if q_block < 7 else 0), f"query block {q_block}: [{lo}, {hi})"


_CAUSAL = functools.partial(blockwise.attention, mask=Mask(causal=True), bias=None, scale=0.5,
                            softcap=None, dropout_rate=0.0, dropout_rng=None, return_weights=False,
                            **BLOCKS)


def _loss_and_grads(attend, query, key, value, cotangent):
  loss = lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)
  return jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(query, key, value)


@pytest.fixture(scope="module")
def causal_loss_and_grads(inputs):
  return _loss_and_grads(_CAUSAL, *inputs)


def _assert_close(got, want):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, **F32_TOL)


def test_vmap(inputs, causal_loss_and_grads):
  # vmap over the batch: each call sees batch 1.
  batched = jax.vmap(lambda q, k, v: _CAUSAL(q[None], k[None], v[None])[0])
  _assert_close(_loss_and_grads(batched, *inputs), causal_loss_and_grads)


def test_shard_map(inputs, causal_loss_and_grads):
  # Batch split over two devices; loop carries must vary over the mesh axis like the shards.
  query, key, value, cotangent = inputs
  mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:2])
  spec = jax.sharding.PartitionSpec("data")
  query, key, value = jax.device_put((query, key, value), jax.sharding.NamedSharding(mesh, spec))
  sharded = jax.shard_map(_CAUSAL, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
  _assert_close(_loss_and_grads(sharded, query, key, value, cotangent), causal_loss_and_grads)


def test_dispatcher_rejects_dropout_and_weights(inputs):
  query, key, value, _ = inputs
  with pytest.raises(ValueError, match="dropout"):
    dot_product_attention(query, key, value, dropout_rate=0.1, dropout_rng=jax.random.key(0),
                          implementation="blockwise")
  with pytest.raises(ValueError, match="return_weights"):
    dot_product_attention(query, key, value, return_weights=True, implementation="blockwise")


@pytest.mark.parametrize("blocks", [dict(block_q=0), dict(block_kv=2.5)])
def test_rejects_bad_block_sizes(inputs, blocks):
  query, key, value, _ = inputs
  with pytest.raises(ValueError, match=next(iter(blocks))):
    blockwise.attention(query, key, value, mask=None, bias=None, scale=1.0, softcap=None,
                        dropout_rate=0.0, dropout_rng=None, return_weights=False, **blocks)


def test_no_keys_gives_zeros():
  query, key, value, _ = _inputs(kv_len=0)
  out = blockwise.attention(query, key, value, mask=None, bias=None, scale=1.0, softcap=None,
                            dropout_rate=0.0, dropout_rng=None, return_weights=False)
  assert out.shape == (BATCH, Q_LEN, HEADS, VALUE_DIM) and not np.any(np.asarray(out))
