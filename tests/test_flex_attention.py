"""flex_attention against a float64 NumPy oracle written here, and against torch's FlexAttention.

Shapes: batch 2, 4 query heads over 2 key heads (GQA), head_dim 8, 37 positions in tiles of 16, so
most calls have 3 x 3 tiles with a ragged last one (one case: 21 queries over 45 keys, MQA). The
oracle (`_oracle`) is dense NumPy in float64: softmax attention with the mod's scores and visibility
written with NumPy index grids, and its gradients by hand (the softmax backward, the score_mod's slope, and each captured tensor's gradient
summed from d(loss)/d(score)). The loss is `sum(out * d_out) + sum(lse * d_lse)` over the rows that
see a key, so the log-sum-exp's gradient is checked too.

Tolerances (float32 kernel, O(1) values, reordered sums in the online softmax): outputs and lse to
2e-5 absolute + 1e-5 relative, gradients to 1e-4.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flaxattn.attention import (and_masks, create_block_mask, flex_attention, or_masks)
from flaxattn.attention.flex import EMPTY, FULL, PARTIAL

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 37, 4, 2, 8
BLOCK = 16
FWD_TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
SOFTCAP, WINDOW, BUCKETS, MAX_DISTANCE = 2.0, 9, 8, 20


def _inputs(q_len=LENGTH, kv_len=LENGTH, heads=HEADS, kv_heads=KV_HEADS, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(BATCH, q_len, heads, HEAD_DIM), (BATCH, kv_len, kv_heads, HEAD_DIM),
            (BATCH, kv_len, kv_heads, HEAD_DIM), (BATCH, q_len, heads, HEAD_DIM),
            (BATCH, heads, q_len)]
  return [rng.standard_normal(shape).astype(np.float32) for shape in shapes]


def _grids(batch, heads, q_len, kv_len):
  """NumPy index grids b, h, i, j broadcasting to `[batch, heads, q_len, kv_len]`."""
  return (np.arange(batch)[:, None, None, None], np.arange(heads)[None, :, None, None],
          np.arange(q_len)[None, None, :, None], np.arange(kv_len)[None, None, None, :])


def _oracle(q, k, v, d_out, d_lse, *, score, visible):
  """Float64 attention and its gradients.

  `score(s_raw) -> (s, slope)`: the modified scores and d s / d s_raw, `[batch, heads, q, kv]`;
  `visible`: bool broadcasting to the same shape. Returns `(out, lse, dq, dk, dv, ds)` with `ds` the
  loss's gradient w.r.t. the modified scores (for captured tensors' gradients).
  """
  q, k, v, d_out, d_lse = (np.asarray(x, np.float64) for x in (q, k, v, d_out, d_lse))
  group = q.shape[2] // k.shape[2]
  k_rep, v_rep = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  scale = q.shape[-1] ** -0.5
  s_raw = np.einsum("bihd,bjhd->bhij", q, k_rep) * scale
  s, slope = score(s_raw)
  visible = np.broadcast_to(visible, s.shape)
  s = np.where(visible, s, -np.inf)
  row_max = np.max(s, axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  e = np.where(visible, np.exp(s - row_max), 0.0)
  total = e.sum(-1, keepdims=True)
  sees = total > 0
  p = e / np.where(sees, total, 1.0)
  lse = np.where(sees, row_max + np.log(np.where(sees, total, 1.0)), -np.inf)[..., 0]
  out = np.einsum("bhij,bjhd->bihd", p, v_rep)
  d_out_h = d_out.transpose(0, 2, 1, 3)  # [b, h, i, d]
  dp = np.einsum("bhid,bjhd->bhij", d_out_h, v_rep)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True) + np.where(sees[..., 0], d_lse, 0.0)[..., None])
  ds_raw = np.where(visible, ds * slope, 0.0)
  dq = np.einsum("bhij,bjhd->bihd", ds_raw, k_rep) * scale
  fold = lambda x: x.reshape(x.shape[0], x.shape[1], k.shape[2], group, -1).sum(3)
  dk = fold(np.einsum("bhij,bihd->bjhd", ds_raw, q) * scale)
  dv = fold(np.einsum("bhij,bihd->bjhd", p, d_out))
  return out, lse, dq, dk, dv, ds


def _t5_bucket(relative, xp):
  """T5's bidirectional relative-position bucket of `kv - q` (exact near 0, log-spaced far)."""
  half = BUCKETS // 2
  exact = half // 2
  distance = xp.abs(relative)
  far = exact + (xp.log(xp.maximum(distance, 1) / exact) / np.log(MAX_DISTANCE / exact)
                 * (half - exact)).astype(np.int32)
  bucket = xp.where(distance < exact, distance, xp.minimum(far, half - 1))
  return bucket + xp.where(relative > 0, half, 0)


def _case_params(rng):
  """Captured tensors of every case: ALiBi slopes, a T5 bias table, document ids, lengths, prefixes."""
  documents = np.sort(rng.integers(0, 5, (BATCH, LENGTH)), axis=1).astype(np.int32)
  return dict(slopes=rng.uniform(0.1, 1.0, HEADS).astype(np.float32),
              table=rng.standard_normal((HEADS, BUCKETS)).astype(np.float32),
              documents=documents, valid=np.array([LENGTH, 30], np.int32),
              prefix=np.array([5, 20], np.int32))


# Each case: (JAX mods built from the captured tensors, NumPy scores/visibility, the captured float
# tensor's gradient from ds). The JAX mods are written on scalars, as a user would.
def _alibi_jax(p):
  score = lambda s, b, h, i, j: s - p["slopes"][h] * jnp.abs(i - j).astype(jnp.float32)
  return score, lambda b, h, i, j: j <= i


def _alibi_numpy(p, b, h, i, j):
  distance = np.abs(i - j)
  score = lambda s: (s - p["slopes"][h] * distance, np.ones_like(s))
  grad = lambda ds: -(ds * distance).sum(axis=(0, 2, 3))
  return score, j <= i, "slopes", grad


def _t5_jax(p):
  return lambda s, b, h, i, j: s + p["table"][h, _t5_bucket(j - i, jnp)], None


def _t5_numpy(p, b, h, i, j):
  bucket = np.broadcast_to(_t5_bucket(j - i, np), (BATCH, HEADS, LENGTH, LENGTH))
  heads = np.broadcast_to(h, bucket.shape)

  def grad(ds):
    table = np.zeros((HEADS, BUCKETS))
    np.add.at(table, (heads, bucket), ds)
    return table

  return lambda s: (s + p["table"][heads, bucket], np.ones_like(s)), True, "table", grad


def _documents_jax(p):
  docs, valid = p["documents"], p["valid"]
  same = lambda b, h, i, j: docs[b, i] == docs[b, j]
  real = lambda b, h, i, j: (i < valid[b]) & (j < valid[b])  # Rows past valid[b] see nothing.
  return None, and_masks(same, lambda b, h, i, j: j <= i, real)


def _documents_numpy(p, b, h, i, j):
  docs, valid = p["documents"], p["valid"]
  visible = ((docs[b, i] == docs[b, j]) & (j <= i) & (i < valid[b])
             & (j < valid[b]))
  return lambda s: (s, np.ones_like(s)), visible, None, None


def _prefix_jax(p):
  prefix = p["prefix"]
  return None, or_masks(lambda b, h, i, j: j <= i, lambda b, h, i, j: j < prefix[b])


def _prefix_numpy(p, b, h, i, j):
  return (lambda s: (s, np.ones_like(s)), (j <= i) | (j < p["prefix"][b]),
          None, None)


def _window_jax(p):
  return None, lambda b, h, i, j: (j <= i) & (i - j < WINDOW)


def _window_numpy(p, b, h, i, j):
  return lambda s: (s, np.ones_like(s)), (j <= i) & (i - j < WINDOW), None, None


def _softcap_jax(p):
  return lambda s, b, h, i, j: SOFTCAP * jnp.tanh(s / SOFTCAP), lambda b, h, i, j: j <= i


def _softcap_numpy(p, b, h, i, j):
  score = lambda s: (SOFTCAP * np.tanh(s / SOFTCAP), 1.0 - np.tanh(s / SOFTCAP) ** 2)
  return score, j <= i, None, None


CASES = {"alibi": (_alibi_jax, _alibi_numpy), "t5_buckets": (_t5_jax, _t5_numpy),
         "documents": (_documents_jax, _documents_numpy), "prefix_lm": (_prefix_jax, _prefix_numpy),
         "sliding_window": (_window_jax, _window_numpy),
         "causal_softcap": (_softcap_jax, _softcap_numpy)}


def _run(build, inputs, params, *, implementation=None, grad_param=None):
  """Out, lse and gradients (query, key, value, and `params[grad_param]`) of the flex call, jitted
  with the captured tensors as traced arguments."""

  def loss(q, k, v, param, params):
    params = dict(params, **({grad_param: param} if grad_param else {}))
    score_mod, mask_mod = build(params)
    block_mask = None if mask_mod is None else create_block_mask(
        mask_mod, BATCH, None, q.shape[1], k.shape[1], block_size=BLOCK)
    if block_mask is None:  # Plain attention still tiles at BLOCK: an all-true mask's block mask.
      block_mask = create_block_mask(lambda b, h, i, j: True, None, None, q.shape[1], k.shape[1],
                                     block_size=BLOCK)
    out, lse = flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod,
                              block_mask=block_mask, implementation=implementation,
                              return_lse=True)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out * d_out) + jnp.sum(finite * d_lse), (out, lse)

  q, k, v, d_out, d_lse = inputs
  param = params[grad_param] if grad_param else jnp.zeros(())
  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(
      q, k, v, param, params)
  return out, lse, *grads


@pytest.fixture(scope="module")
def params():
  return _case_params(np.random.default_rng(1))


@pytest.fixture(scope="module")
def inputs():
  return _inputs()


@pytest.fixture(scope="module")
def case_results(inputs, params):
  """`results(name)`: `_run` of a case, computed once per module (each case compiles once)."""
  memo = {}

  def results(name):
    if name not in memo:
      grad_param = CASES[name][1](params, *_grids(BATCH, HEADS, LENGTH, LENGTH))[2]
      memo[name] = _run(CASES[name][0], inputs, params, grad_param=grad_param)
    return memo[name]

  return results


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64_oracle(name, inputs, params, case_results):
  build, numpy_case = CASES[name]
  score, visible, grad_param, param_grad = numpy_case(params, *_grids(BATCH, HEADS, LENGTH, LENGTH))
  out, lse, dq, dk, dv, d_param = case_results(name)
  want = _oracle(*inputs, score=score, visible=visible)
  for label, got, expected, tol in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv),
                                       want, (FWD_TOL, FWD_TOL, GRAD_TOL, GRAD_TOL, GRAD_TOL)):
    np.testing.assert_allclose(np.asarray(got), expected, **tol, err_msg=label)
  if grad_param:
    np.testing.assert_allclose(np.asarray(d_param), param_grad(want[-1]), **GRAD_TOL,
                               err_msg=f"d_{grad_param}")


def test_fully_masked_rows_give_zeros_and_minus_inf(params, case_results):
  out, lse, dq = case_results("documents")[:3]
  hidden = LENGTH > params["valid"]  # Batch row 1 has rows 30.. that see no key.
  assert hidden[1] and not hidden[0]
  assert np.all(np.asarray(out)[1, 30:] == 0) and np.all(np.asarray(dq)[1, 30:] == 0)
  assert np.all(np.isneginf(np.asarray(lse)[1, :, 30:]))
  assert np.all(np.isfinite(np.asarray(lse)[0]))


def test_reference_implementation_matches_oracle(inputs, params):
  score, visible, _, slope_grad = _alibi_numpy(params, *_grids(BATCH, HEADS, LENGTH, LENGTH))
  got = _run(_alibi_jax, inputs, params, implementation="reference", grad_param="slopes")
  want = _oracle(*inputs, score=score, visible=visible)
  for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), w, **GRAD_TOL, err_msg=label)
  np.testing.assert_allclose(np.asarray(got[-1]), slope_grad(want[-1]), **GRAD_TOL)


def test_query_and_key_lengths_differ():
  """21 queries over 45 keys (indices are not aligned: q_idx and kv_idx both count from 0)."""
  inputs = _inputs(q_len=21, kv_len=45, heads=2, kv_heads=1, seed=3)
  slopes = np.array([0.3, 0.7], np.float32)
  build = lambda p: (lambda s, b, h, i, j: s - p["slopes"][h] * jnp.abs(i - j), None)
  out, lse, dq, dk, dv, d_slopes = _run(build, inputs, dict(slopes=slopes), grad_param="slopes")
  b, h, i, j = _grids(BATCH, 2, 21, 45)
  want = _oracle(*inputs, score=lambda s: (s - slopes[h] * np.abs(i - j), np.ones_like(s)),
                 visible=True)
  for label, g, w in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv), want):
    np.testing.assert_allclose(np.asarray(g), w, **GRAD_TOL, err_msg=label)
  np.testing.assert_allclose(np.asarray(d_slopes), -(want[-1] * np.abs(i - j)).sum((0, 2, 3)),
                             **GRAD_TOL)


def _numpy_kinds(visible, block_q, block_kv):
  """Dense classification of `visible` `[batch, heads, q, kv]`: EMPTY/PARTIAL/FULL per tile; a key
  tile running past kv_len is never FULL."""
  batch, heads, q_len, kv_len = visible.shape
  q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_kv)
  kinds = np.zeros((batch, heads, q_blocks, kv_blocks), np.int8)
  for qb in range(q_blocks):
    for kb in range(kv_blocks):
      tile = visible[:, :, qb * block_q:(qb + 1) * block_q, kb * block_kv:(kb + 1) * block_kv]
      ragged = (kb + 1) * block_kv > kv_len
      kinds[:, :, qb, kb] = np.where(tile.all((2, 3)) & ~ragged, FULL,
                                     np.where(tile.any((2, 3)), PARTIAL, EMPTY))
  return kinds


def test_create_block_mask_matches_dense_classification(params):
  docs = params["documents"]
  b, h, i, j = _grids(BATCH, HEADS, LENGTH, LENGTH)
  visible = np.broadcast_to((docs[b, i] == docs[b, j]) & (j <= i) | (h == 3) & (j < 4),
                            (BATCH, HEADS, LENGTH, LENGTH))

  @jax.jit
  def kinds(docs):
    mask_mod = or_masks(lambda b, h, i, j: (docs[b, i] == docs[b, j]) & (j <= i),
                        lambda b, h, i, j: (h == 3) & (j < 4))
    return create_block_mask(mask_mod, BATCH, HEADS, LENGTH, LENGTH, block_size=(8, 16)).kinds

  np.testing.assert_array_equal(np.asarray(kinds(docs)), _numpy_kinds(visible, 8, 16))
  causal = create_block_mask(lambda b, h, i, j: j <= i, None, None, LENGTH, LENGTH, block_size=16)
  assert causal.shape == (1, 1, 3, 3)
  np.testing.assert_array_equal(
      np.asarray(causal.kinds)[0, 0],
      [[PARTIAL, EMPTY, EMPTY], [FULL, PARTIAL, EMPTY], [FULL, FULL, PARTIAL]])


def test_kernel_skips_empty_tiles_and_does_not_mask_full_ones(inputs):
  """Timing-free: a block mask that lies shows what the kernel evaluated. Marking a visible tile
  EMPTY removes its keys (the tile is never visited); marking a partial tile FULL makes all its keys
  visible (the mask is not evaluated there). Per batch row: the lie about EMPTY is told for row 1
  only, so row 0 must keep those keys (each row follows its own tile list)."""
  q, k, v, d_out, d_lse = inputs
  causal = lambda b, h, i, j: j <= i
  block_mask = create_block_mask(causal, None, None, LENGTH, LENGTH, block_size=BLOCK)
  kinds = np.repeat(np.asarray(block_mask.kinds), BATCH, axis=0)
  assert kinds[1, 0, 1, 0] == FULL and kinds[0, 0, 0, 0] == PARTIAL
  kinds[1, 0, 1, 0] = EMPTY
  kinds[:, 0, 0, 0] = FULL
  lying = dataclasses.replace(block_mask, kinds=jnp.asarray(kinds))
  out = flex_attention(q, k, v, block_mask=lying)
  b, _, i, j = _grids(BATCH, 1, LENGTH, LENGTH)
  visible = (j <= i) | (i < BLOCK) & (j < BLOCK)
  visible = visible & ~((b == 1) & (i >= BLOCK) & (i < 2 * BLOCK) & (j < BLOCK))
  want = _oracle(*inputs, score=lambda s: (s, np.ones_like(s)), visible=visible)[0]
  np.testing.assert_allclose(np.asarray(out), want, **FWD_TOL)


def test_new_document_ids_do_not_recompile(inputs):
  q, k, v = inputs[:3]
  traces = []

  @jax.jit
  def attend(q, k, v, docs):
    traces.append(1)
    mask_mod = lambda b, h, i, j: docs[b, i] == docs[b, j]
    block_mask = create_block_mask(mask_mod, BATCH, None, LENGTH, LENGTH, block_size=BLOCK)
    return flex_attention(q, k, v, block_mask=block_mask)

  rng = np.random.default_rng(5)
  b, _, i, j = _grids(BATCH, 1, LENGTH, LENGTH)
  for _ in range(2):
    docs = np.sort(rng.integers(0, 6, (BATCH, LENGTH)), axis=1).astype(np.int32)
    want = _oracle(*inputs, score=lambda s: (s, np.ones_like(s)), visible=docs[b, i] == docs[b, j])
    np.testing.assert_allclose(np.asarray(attend(q, k, v, docs)), want[0], **FWD_TOL)
  assert len(traces) == 1 and attend._cache_size() == 1


@st.composite
def _tile_structured_masks(draw):
  """Random `[batch, heads, q, kv]` masks whose tiles are drawn empty, full or random."""
  rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
  q_blocks = kv_blocks = -(-LENGTH // BLOCK)
  kind = rng.integers(0, 3, (BATCH, 2, q_blocks, kv_blocks))
  density = draw(st.floats(0.05, 0.95))
  random = rng.random((BATCH, 2, q_blocks * BLOCK, kv_blocks * BLOCK)) < density
  tiles = np.repeat(np.repeat(kind, BLOCK, axis=2), BLOCK, axis=3)
  mask = np.where(tiles == 0, False, np.where(tiles == 2, True, random))
  return mask[:, :, :LENGTH, :LENGTH]


@pytest.fixture(scope="module")
def table_attention():
  """Jitted flex_attention with a mask_mod that looks up a captured `[batch, heads, q, kv]` table:
  one compile for every drawn table."""

  def loss(q, k, v, table, d_out):
    mask_mod = lambda b, h, i, j: table[b, h, i, j]
    block_mask = create_block_mask(mask_mod, BATCH, 2, LENGTH, LENGTH, block_size=BLOCK)
    out = flex_attention(q, k, v, block_mask=block_mask)
    return jnp.sum(out * d_out), (out, block_mask.kinds)

  return jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=_tile_structured_masks())
def test_random_mask_mods_match_oracle(table_attention, mask):
  q, k, v, d_out, _ = _inputs(heads=2, kv_heads=1, seed=7)
  (_, (out, kinds)), grads = table_attention(q, k, v, mask, d_out)
  np.testing.assert_array_equal(np.asarray(kinds), _numpy_kinds(mask, BLOCK, BLOCK))
  want = _oracle(q, k, v, d_out, np.zeros((BATCH, 2, LENGTH)), score=lambda s: (s, np.ones_like(s)),
                 visible=mask)
  for label, g, w in zip(("out", "dq", "dk", "dv"), (out, *grads), (want[0], *want[2:5])):
    np.testing.assert_allclose(np.asarray(g), w, **GRAD_TOL, err_msg=label)


@pytest.mark.parametrize("call, message", [
    (lambda x: flex_attention(x, x, x, score_mod=lambda s, b, h: s), "score_mod must take 5"),
    (lambda x: flex_attention(x, x, x, mask_mod=lambda b, h, i, j: i - j), "mask_mod must return"),
    (lambda x: flex_attention(x, x, x, score_mod=lambda s, b, h, i, j: i), "score_mod must return"),
    (lambda x: flex_attention(x, x, x, implementation="splash"), "implementation='splash'"),
    (lambda x: flex_attention(x, x[:, :, :3], x[:, :, :3]), "query heads"),
    (lambda x: flex_attention(x, x, x, block_mask=create_block_mask(
        lambda b, h, i, j: j <= i, None, None, 8, 8)), "block_mask was built for"),
    (lambda x: create_block_mask(lambda b, h, i, j: j <= i, 0, None, 8, 8), "batch must be"),
    (lambda x: create_block_mask(lambda b, h, i, j: j <= i, 1, 1, 8, 8, block_size=(0, 4)),
     "block_size must be"),
])
def test_bad_input_raises_one_clear_line(call, message):
  x = jnp.zeros((1, 12, 4, 8))
  with pytest.raises(ValueError, match=message) as error:
    call(x)
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_forward_matches_torch_flex_attention(inputs, params):
  """torch's FlexAttention, compiled (it runs on CPU only under torch.compile, forward only): one
  score_mod and mask_mod over captured tensors serve three cases, so torch compiles once."""
  torch = pytest.importorskip("torch")
  flex = pytest.importorskip("torch.nn.attention.flex_attention")
  q, k, v = inputs[:3]
  to_torch = lambda x: torch.tensor(np.asarray(x).transpose(0, 2, 1, 3))
  compiled = torch.compile(flex.flex_attention)
  docs = params["documents"]
  cases = {  # slopes, softcap, documents (one id: no document mask)
      "alibi_causal": (params["slopes"], 1e6, np.zeros_like(docs)),
      "softcap_causal": (np.zeros(HEADS, np.float32), SOFTCAP, np.zeros_like(docs)),
      "documents_causal": (np.zeros(HEADS, np.float32), 1e6, docs)}
  for name, (slopes, cap, ids) in cases.items():
    t_slopes, t_cap, t_ids = torch.tensor(slopes), torch.tensor(cap), torch.tensor(ids)

    def torch_score(s, b, h, i, j):
      return t_cap * torch.tanh((s - t_slopes[h] * (i - j).abs()) / t_cap)

    def torch_mask(b, h, i, j):
      return (j <= i) & (t_ids[b, i] == t_ids[b, j])

    block_mask = flex.create_block_mask(torch_mask, BATCH, None, LENGTH, LENGTH, device="cpu")
    want = compiled(to_torch(q), to_torch(k), to_torch(v), score_mod=torch_score,
                    block_mask=block_mask, enable_gqa=True).numpy().transpose(0, 2, 1, 3)
    slopes, ids = jnp.asarray(slopes), jnp.asarray(ids)  # NumPy arrays cannot take traced indices.
    score_mod = lambda s, b, h, i, j: cap * jnp.tanh((s - slopes[h] * jnp.abs(i - j)) / cap)
    mask_mod = lambda b, h, i, j: (j <= i) & (ids[b, i] == ids[b, j])
    got = flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5, err_msg=name)
