"""Every registered attention implementation against the float64 NumPy oracle: outputs and gradients.

Inputs are drawn with hypothesis from a small fixed pool of shapes (JAX compiles once per shape and
call structure, and compiling dominates the run time). Each case runs on every implementation whose
declaration in `describe_implementations()` covers it.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attention_support import MaskParts, assert_close, numpy_attention, numpy_visible, supporting
from flaxattn.attention import MASK_KINDS, Mask, dot_product_attention

# (batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim). Odd lengths, q_len != kv_len both ways,
# a single query token, GQA and MQA, value_dim != head_dim.
FAST_SHAPES = (
    (2, 7, 7, 4, 2, 8, 8),
    (1, 1, 9, 2, 1, 8, 8),
    (2, 5, 12, 2, 2, 4, 6),
    (1, 12, 5, 4, 1, 8, 8),
)
# Longer, unaligned lengths for the slow sweep: they cross the tile edges of blockwise kernels
# (hundreds of positions per tile on CPU).
SWEEP_SHAPES = FAST_SHAPES + (
    (1, 67, 67, 4, 2, 16, 16),
    (2, 33, 130, 2, 1, 8, 8),
    (1, 130, 33, 2, 2, 8, 8),
    (1, 520, 520, 2, 1, 16, 16),
    (1, 300, 1030, 2, 2, 8, 8),
)

# Tolerances, as a fraction of the compared tensor's scale (see `assert_close`; plus the same relative
# tolerance per element). float32: a few ulp per op over reductions of at most a few hundred terms
# (worst seen over 40 sweep cases on CPU: 6e-7). bfloat16: the inputs are bfloat16 and exact in the
# float64 oracle, so the error is the rounding inside the implementation: softmax weights and outputs
# keep 8 significant bits (half an ulp = 2^-9 = 2e-3 relative), summed over keys; a gradient passes
# through more such roundings (worst seen: 3e-3 output, 5.4e-3 gradients, on reference and xla).
# float16 keeps 11 significant bits, 8x finer (worst seen over 30 sweep cases: 6e-4 and 7e-4).
TOLERANCES = {
    "float32": dict(out=1e-5, grad=1e-5),
    "bfloat16": dict(out=2e-2, grad=4e-2),
    "float16": dict(out=3e-3, grad=5e-3),
    "float64": dict(out=1e-12, grad=1e-12),
}


@dataclasses.dataclass(frozen=True)
class Case:
  shape: tuple[int, ...]
  dtype: str
  parts: MaskParts
  bias_shape: tuple[int, ...] | None
  softcap: float | None
  scale: float | None
  seed: int


def _mask_parts(draw, rng, batch, heads, q_len, kv_len) -> MaskParts:
  side = st.sampled_from([None, 0, 1, 3])
  window = draw(st.one_of(st.none(), st.tuples(side, side)))
  q_segment_ids = kv_segment_ids = q_lengths = kv_lengths = array = None
  if draw(st.booleans()):
    # Unsorted ids on purpose: the contract is equality of ids, not contiguous packed runs.
    q_segment_ids = rng.integers(0, 3, (batch, q_len), dtype=np.int32)
    kv_segment_ids = rng.integers(0, 3, (batch, kv_len), dtype=np.int32)
    if q_len == kv_len and draw(st.booleans()):
      kv_segment_ids = None  # The Mask default: keys share the query ids.
  lengths = draw(st.sampled_from(["none", "q", "kv", "both"]))
  if lengths in ("q", "both"):
    q_lengths = rng.integers(0, q_len + 1, (batch,), dtype=np.int32)
  if lengths in ("kv", "both"):
    kv_lengths = rng.integers(0, kv_len + 1, (batch,), dtype=np.int32)
  if draw(st.booleans()):
    shape = draw(st.sampled_from([(batch, heads, q_len, kv_len), (batch, 1, q_len, kv_len),
                                  (q_len, kv_len), (1, heads, 1, kv_len)]))
    array = rng.random(shape) < 0.7
  return MaskParts(causal=draw(st.booleans()), window=window, q_segment_ids=q_segment_ids,
                   kv_segment_ids=kv_segment_ids, q_lengths=q_lengths, kv_lengths=kv_lengths,
                   array=array)


@st.composite
def cases(draw, shapes, dtypes):
  shape = draw(st.sampled_from(shapes))
  batch, q_len, kv_len, heads = shape[:4]
  seed = draw(st.integers(0, 2**31 - 1))
  parts = _mask_parts(draw, np.random.default_rng(seed), batch, heads, q_len, kv_len)
  bias_shape = draw(st.sampled_from([None, (batch, heads, q_len, kv_len), (1, heads, q_len, kv_len),
                                     (q_len, kv_len), (batch, 1, 1, kv_len)]))
  return Case(shape=shape, dtype=draw(st.sampled_from(dtypes)), parts=parts,
              bias_shape=bias_shape, softcap=draw(st.sampled_from([None, 2.0])),
              scale=draw(st.sampled_from([None, 0.3])), seed=seed)


def _to_mask(parts: MaskParts) -> Mask | None:
  if not parts.kinds:
    return None
  arrays = {field: None if value is None else jnp.asarray(value)
            for field, value in dataclasses.asdict(parts).items()
            if field not in ("causal", "window")}
  return Mask(causal=parts.causal, window=parts.window, **arrays)


def _forward_and_vjp(query, key, value, bias, mask, d_out, *, implementation, scale, softcap,
                     with_weights):
  """Output, weights (or None) and input gradients for cotangent `d_out`.

  Run eagerly on purpose: op-by-op dispatch reuses each small compiled op across cases, where jit
  would compile every new combination of shape and mask structure (about 0.5 s each). jit, vmap and
  shard_map are checked against the same oracle in test_attention_api.py.
  """
  def attend(query, key, value, bias):
    result = dot_product_attention(query, key, value, mask=mask, bias=bias, scale=scale,
                                   softcap=softcap, implementation=implementation,
                                   return_weights=with_weights)
    return result if with_weights else (result, None)

  out, vjp, weights = jax.vjp(attend, query, key, value, bias, has_aux=True)
  return out, weights, dict(zip(("query", "key", "value", "bias"), vjp(d_out)))


def check_against_numpy(case: Case, implementation: str) -> None:
  """Runs `implementation` on `case` and compares output, weights and gradients with the oracle."""
  batch, q_len, kv_len, heads, kv_heads, head_dim, value_dim = case.shape
  rng = np.random.default_rng(case.seed)
  dtype = jnp.dtype(case.dtype)
  shapes = dict(query=(batch, q_len, heads, head_dim), key=(batch, kv_len, kv_heads, head_dim),
                value=(batch, kv_len, kv_heads, value_dim), d_out=(batch, q_len, heads, value_dim))
  if case.bias_shape is not None:
    shapes["bias"] = case.bias_shape
  inputs = {name: jnp.asarray(rng.normal(size=shape), dtype) for name, shape in shapes.items()}
  # The oracle sees exactly the (rounded) values the implementation sees.
  exact = {name: np.asarray(x, np.float64) for name, x in inputs.items()}
  visible = numpy_visible(case.parts, batch, heads, q_len, kv_len)
  expected = numpy_attention(exact["query"], exact["key"], exact["value"], visible=visible,
                             bias=exact.get("bias"), scale=case.scale, softcap=case.softcap,
                             d_out=exact["d_out"])

  with_weights = implementation in supporting(weights=True, dtype=case.dtype)
  out, weights, grads = _forward_and_vjp(
      inputs["query"], inputs["key"], inputs["value"], inputs.get("bias"), _to_mask(case.parts),
      inputs["d_out"], implementation=implementation, scale=case.scale, softcap=case.softcap,
      with_weights=with_weights)

  tolerance = TOLERANCES[case.dtype]
  where = f"{implementation} on {case}"
  assert out.shape == shapes["d_out"] and out.dtype == dtype, where
  assert_close(out, expected["out"], tolerance["out"], f"output of {where}")
  if with_weights:
    assert weights.shape == (batch, heads, q_len, kv_len), where
    assert_close(weights, expected["weights"], tolerance["out"], f"weights of {where}")
  for name in ("query", "key", "value", "bias"):
    if name in shapes:
      assert grads[name].shape == shapes[name], f"d{name} of {where}"
      assert_close(grads[name], expected[name], tolerance["grad"], f"d{name} of {where}")

  # A query that sees no key: exactly zero output and zero gradient, whatever the tolerance.
  empty = ~visible.any(axis=-1)  # [batch, heads, q_len]
  assert not np.any(np.swapaxes(np.asarray(out), 1, 2)[empty]), f"empty rows not zero: {where}"
  assert not np.any(np.swapaxes(np.asarray(grads["query"]), 1, 2)[empty]), (
      f"empty rows pass gradient: {where}")


def _check_all(case: Case) -> None:
  names = supporting(masks=case.parts.kinds, bias=case.bias_shape is not None,
                     softcap=case.softcap is not None, dtype=case.dtype)
  assert "reference" in names, f"the reference must support every call, not {case}"
  for implementation in names:
    check_against_numpy(case, implementation)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(FAST_SHAPES, ("float32", "bfloat16")))
def test_matches_numpy(case):
  _check_all(case)


@pytest.mark.parametrize("kinds", [(), *((kind,) for kind in MASK_KINDS), MASK_KINDS],
                         ids=lambda kinds: "+".join(kinds) or "no_mask")
@pytest.mark.parametrize("shape", [FAST_SHAPES[0], FAST_SHAPES[3]], ids=["square", "q_longer"])
def test_each_mask_kind_alone_and_all_combined(kinds, shape):
  """Hypothesis picks combinations at random; this pins each kind alone and all of them at once."""
  batch, q_len, kv_len, heads = shape[:4]
  rng = np.random.default_rng(len(kinds))
  parts = MaskParts(
      causal="causal" in kinds,
      window=(2, None) if "window" in kinds else None,
      q_segment_ids=rng.integers(0, 2, (batch, q_len)) if "segment_ids" in kinds else None,
      kv_segment_ids=rng.integers(0, 2, (batch, kv_len)) if "segment_ids" in kinds else None,
      q_lengths=np.array([q_len - 2, 0][:batch]) if "lengths" in kinds else None,
      kv_lengths=np.array([kv_len, kv_len - 3][:batch]) if "lengths" in kinds else None,
      array=rng.random((q_len, kv_len)) < 0.7 if "array" in kinds else None)
  _check_all(Case(shape=shape, dtype="float32", parts=parts, bias_shape=None, softcap=None,
                  scale=None, seed=7))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(FAST_SHAPES[:2], ("float64",)))
def test_float64_matches_numpy(case):
  """Implementations that declare float64 agree with the oracle to ~1e-12 (x64 only inside)."""
  with jax.enable_x64(True):
    _check_all(case)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(SWEEP_SHAPES, ("float32", "bfloat16", "float16")))
def test_matches_numpy_sweep(case):
  _check_all(case)
