"""The `dot_product_attention` contract: weights, dropout, transformations, validation, dispatch."""

from __future__ import annotations

import dataclasses
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_support import MaskParts, assert_close, numpy_attention, numpy_visible, supporting
from flaxattn.attention import (MASK_KINDS, Mask, api, describe_implementations, dot_product_attention,
                                implementations)

# The float32 bound of the oracle tests (see attention_support.assert_close).
TOLERANCE = 1e-5


def _normal(rng, *shape, dtype=jnp.float32):
  return jnp.asarray(rng.normal(size=shape), dtype)


def _assert_close(actual, expected, what=""):
  assert_close(actual, expected, TOLERANCE, what)


# ------------------------------------------------------------------------------------------------
# return_weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_return_weights(dtype):
  batch, q_len, kv_len, heads, kv_heads = 2, 6, 9, 4, 2
  rng = np.random.default_rng(0)
  query = _normal(rng, batch, q_len, heads, 8, dtype=dtype)
  key, value = _normal(rng, batch, kv_len, kv_heads, 8, dtype=dtype), _normal(
      rng, batch, kv_len, kv_heads, 8, dtype=dtype)
  # Batch 1 is all padding queries (rows that see nothing); in batch 0 query i sees keys 0..i+3
  # (causal, end-aligned).
  parts = MaskParts(causal=True, q_lengths=np.array([q_len, 0], np.int32),
                    kv_lengths=np.array([kv_len, 5], np.int32))
  mask = Mask(causal=True, q_lengths=jnp.asarray(parts.q_lengths),
              kv_lengths=jnp.asarray(parts.kv_lengths))
  visible = numpy_visible(parts, batch, heads, q_len, kv_len)
  names = supporting(masks=parts.kinds, weights=True, dtype=dtype)
  assert names, "the reference returns weights"
  for implementation in [*names, None]:
    def attend(query, key, value, mask, return_weights, implementation=implementation):
      return dot_product_attention(query, key, value, mask=mask, implementation=implementation,
                                   return_weights=return_weights)

    attend = jax.jit(attend, static_argnames="return_weights")
    out, weights = attend(query, key, value, mask, return_weights=True)
    assert weights.shape == (batch, heads, q_len, kv_len) and weights.dtype == jnp.float32
    weights = np.asarray(weights)
    row_sums = weights.sum(axis=-1)
    np.testing.assert_allclose(row_sums[visible.any(-1)], 1.0, rtol=1e-6)
    assert not np.any(row_sums[~visible.any(-1)]), "a row that sees no key must weigh nothing"
    assert not np.any(weights[~visible]), "masked keys must get zero weight"
    # The same output, up to a few ulp: asking for the weights changes how XLA fuses the graph.
    plain = np.asarray(attend(query, key, value, mask, return_weights=False), np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), plain, rtol=0,
                               atol=4 * jnp.finfo(dtype).eps * np.abs(plain).max())


# ------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("implementation", supporting(dropout=True, masks=["causal"]))
def test_dropout(implementation):
  """Dropout of the weights: reproducible per rng, rate ~ dropout_rate, expectation unchanged.

  A one-hot value makes the output show the dropped weights themselves: with
  `value[b, s, h, e] = (s == e)`, `out[b, t, h, s]` is the dropped, rescaled weight of key s. The
  batch holds 1000 copies of one problem, each dropped independently: one call (vmapping over rngs
  takes seconds to compile), with 'rbg' keys (threefry for a million draws compiles for seconds on
  CPU; any JAX key is a valid dropout_rng).
  """
  copies, length, heads, rate = 1000, 16, 4, 0.3
  rng = np.random.default_rng(1)
  query, key = _normal(rng, 1, length, heads, 8), _normal(rng, 1, length, heads, 8)
  value = jnp.eye(length)[None, :, None, :].repeat(heads, axis=2)
  visible = numpy_visible(MaskParts(causal=True), 1, heads, length, length)
  weights = np.swapaxes(numpy_attention(query, key, value, visible=visible)["weights"], 1, 2)[0]

  @jax.jit
  def dropped(rng):
    return dot_product_attention(*(x.repeat(copies, axis=0) for x in (query, key, value)),
                                 mask=Mask(causal=True), dropout_rate=rate, dropout_rng=rng,
                                 implementation=implementation)

  many = np.asarray(dropped(jax.random.key(0, impl="rbg")))  # [copies, q_len, heads, kv_len]
  np.testing.assert_array_equal(many, np.asarray(dropped(jax.random.key(0, impl="rbg"))))
  assert not np.array_equal(many, np.asarray(dropped(jax.random.key(1, impl="rbg"))))

  # Kept weights are rescaled by 1 / (1 - rate); masked keys stay at zero.
  kept = many != 0
  _assert_close(many[kept], np.broadcast_to(weights / (1.0 - rate), many.shape)[kept],
                "kept weights rescaled")
  assert not np.any(many[:, weights == 0]), "dropout must not create weight on masked keys"

  # 1000 copies of 4 * 136 = 544 visible (causal) weights: the dropped fraction has standard error
  # sqrt(0.21 / 544000) = 6.2e-4; the mean of each weight is the undropped weight, within 5 standard
  # errors, weight * sqrt(rate / (1 - rate) / 1000).
  dropped_fraction = (~kept[:, weights > 0]).mean()
  assert abs(dropped_fraction - rate) < 5 * 6.2e-4, dropped_fraction
  standard_error = weights * np.sqrt(rate / (1.0 - rate) / copies)
  assert np.all(np.abs(many.mean(axis=0) - weights) <= 5 * standard_error + 1e-6)


# ------------------------------------------------------------------------------------------------
# jit, vmap, shard_map


def _segments(batch, length):
  return jnp.asarray(np.repeat(np.arange(3), -(-length // 3))[:length][None].repeat(batch, 0))


def _attention_and_grads(implementation):
  """f(query, key, value, bias, segment_ids, d_out) -> (out, (dquery, dkey, dvalue, dbias))."""

  def run(query, key, value, bias, segment_ids, d_out):
    def attend(query, key, value, bias):
      return dot_product_attention(query, key, value, bias=bias, implementation=implementation,
                                   mask=Mask(causal=True, q_segment_ids=segment_ids))

    out, vjp = jax.vjp(attend, query, key, value, bias)
    return out, vjp(d_out)

  return run


def _transform_inputs(batch, heads, kv_heads, bias_batch, bias_heads, seed=0):
  rng = np.random.default_rng(seed)
  length = 7
  return (_normal(rng, batch, length, heads, 8), _normal(rng, batch, length, kv_heads, 8),
          _normal(rng, batch, length, kv_heads, 8),
          _normal(rng, bias_batch, bias_heads, length, length), _segments(batch, length),
          _normal(rng, batch, length, heads, 8))


def _oracle(query, key, value, bias, segment_ids, d_out):
  """What `_attention_and_grads` must return, from the float64 NumPy oracle."""
  batch, q_len, heads = query.shape[:3]
  parts = MaskParts(causal=True, q_segment_ids=np.asarray(segment_ids))
  expected = numpy_attention(query, key, value, bias=np.asarray(bias), d_out=d_out,
                             visible=numpy_visible(parts, batch, heads, q_len, key.shape[1]))
  return expected["out"], tuple(expected[name] for name in ("query", "key", "value", "bias"))


TRANSFORM_IMPLEMENTATIONS = supporting(masks=["causal", "segment_ids"], bias=True)


@pytest.mark.parametrize("implementation", TRANSFORM_IMPLEMENTATIONS)
def test_vmap_under_jit(implementation):
  """3 independent problems stacked on a new leading axis, each against the oracle.

  The eager path is what test_attention_numpy.py checks, so agreeing with the same oracle within
  TOLERANCE is agreeing with it.
  """
  stacked = [_transform_inputs(2, 4, 2, 1, 4, seed=seed) for seed in range(3)]
  mapped = jax.jit(jax.vmap(_attention_and_grads(implementation)))(
      *jax.tree.map(lambda *xs: jnp.stack(xs), *stacked))
  for index, inputs in enumerate(stacked):
    jax.tree.map(_assert_close, jax.tree.map(lambda x, index=index: x[index], mapped),
                 _oracle(*inputs))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py sets up 8 CPU devices"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))


@pytest.mark.parametrize("implementation", TRANSFORM_IMPLEMENTATIONS)
@pytest.mark.parametrize("sharded", ["batch", "heads"])
def test_shard_map(mesh, implementation, sharded):
  """Attention is independent per batch element and per head: each shard computes its part."""
  spec = jax.sharding.PartitionSpec
  if sharded == "batch":
    inputs = _transform_inputs(8, 4, 2, 8, 1)
    specs = (spec("data"),) * 6
  else:
    # 16 query heads over 8 kv heads: each shard holds one GQA group, 2 query heads and their kv head.
    inputs = _transform_inputs(1, 16, 8, 1, 16)
    heads_spec = spec(None, None, "data")
    specs = (heads_spec, heads_spec, heads_spec, spec(None, "data"), spec(), heads_spec)
  run = jax.shard_map(_attention_and_grads(implementation), in_specs=specs,
                      out_specs=(specs[5], specs[:4]))
  with jax.set_mesh(mesh):
    # Explicit mesh axes: shard_map wants its arguments already laid out as in_specs say.
    sharded = [jax.device_put(x, jax.sharding.NamedSharding(mesh, s)) for x, s in zip(inputs, specs)]
    actual = jax.jit(run)(*sharded)
  jax.tree.map(_assert_close, actual, _oracle(*inputs))


# ------------------------------------------------------------------------------------------------
# validation


def _valid(**overrides):
  rng = np.random.default_rng(0)
  arguments = dict(query=_normal(rng, 2, 5, 4, 8), key=_normal(rng, 2, 7, 2, 8),
                   value=_normal(rng, 2, 7, 2, 8))
  arguments.update(overrides)
  return arguments


_ids = np.zeros((2, 5), np.int32)
# (what, keyword arguments, a regex the message must match: the argument and the value received)
INVALID_CALLS = [
    ("query rank", _valid(query=jnp.zeros((5, 4, 8))), r"query .*rank 4.*\(5, 4, 8\)"),
    ("key rank", _valid(key=jnp.zeros((2, 7, 2, 8, 1))), r"key .*rank 4.*\(2, 7, 2, 8, 1\)"),
    ("batch", _valid(key=jnp.zeros((3, 7, 2, 8))), r"batch.*key \(3, 7, 2, 8\)"),
    ("head_dim", _valid(key=jnp.zeros((2, 7, 2, 6))), r"head_dim.*key \(2, 7, 2, 6\)"),
    ("value shape", _valid(value=jnp.zeros((2, 6, 2, 8))), r"value \(2, 6, 2, 8\)"),
    ("heads divisible", _valid(key=jnp.zeros((2, 7, 3, 8)), value=jnp.zeros((2, 7, 3, 8))),
     r"query heads \(4\).*key/value heads \(3\)"),
    ("dtype mismatch", _valid(key=jnp.zeros((2, 7, 2, 8), jnp.bfloat16)),
     r"share a dtype.*float32, bfloat16, float32"),
    ("not float", _valid(query=jnp.zeros((2, 5, 4, 8), jnp.int32)), r"query .*floating.*int32"),
    ("bias shape", _valid(bias=jnp.zeros((3, 7))), r"bias of shape \(3, 7\)"),
    ("bias rank", _valid(bias=jnp.zeros((1, 1, 1, 5, 7))), r"bias of shape \(1, 1, 1, 5, 7\)"),
    ("bias dtype", _valid(bias=jnp.zeros((5, 7), jnp.int32)), r"bias .*floating.*int32"),
    ("mask type", _valid(mask=np.ones((5, 7), np.int32)), r"mask .*ndarray of dtype int32"),
    ("segment ids shape", _valid(mask=Mask(q_segment_ids=_ids[:, :4], kv_segment_ids=_ids)),
     r"Mask.q_segment_ids .*\(2, 5\).*\(2, 4\)"),
    ("segment ids dtype", _valid(mask=Mask(q_segment_ids=_ids.astype(np.float32),
                                           kv_segment_ids=np.zeros((2, 7), np.int32))),
     r"Mask.q_segment_ids .*integer.*float32"),
    ("kv segment ids default", _valid(mask=Mask(q_segment_ids=_ids)),
     r"Mask.kv_segment_ids .*\(2, 7\).*\(2, 5\).*defaults to q_segment_ids"),
    ("lengths shape", _valid(mask=Mask(kv_lengths=np.array([7, 7, 7]))),
     r"Mask.kv_lengths .*\(2,\).*\(3,\)"),
    ("lengths dtype", _valid(mask=Mask(q_lengths=np.array([5.0, 5.0]))),
     r"Mask.q_lengths .*integer.*float"),
    ("array shape", _valid(mask=Mask(array=np.ones((5, 6), bool))),
     r"Mask.array of shape \(5, 6\)"),
    ("array dtype", _valid(mask=Mask(array=np.ones((5, 7), np.int32))),
     r"Mask.array .*boolean.*int32"),
    ("dropout without rng", _valid(dropout_rate=0.1), r"dropout_rate=0.1 .*dropout_rng"),
    ("dropout rate", _valid(dropout_rate=1.0, dropout_rng=jax.random.key(0)),
     r"dropout_rate .*got 1.0"),
    ("dropout rate type", _valid(dropout_rate="0.1"), r"dropout_rate .*got '0.1'"),
    ("softcap zero", _valid(softcap=0.0), r"softcap .*positive.*got 0.0"),
    ("softcap negative", _valid(softcap=-30), r"softcap .*positive.*got -30"),
    ("softcap bool", _valid(softcap=True), r"softcap .*got True"),
    ("softcap array", _valid(softcap=jnp.ones(2)), r"softcap .*got Array"),
    ("scale", _valid(scale="0.1"), r"scale .*number.*got '0.1'"),
    ("unknown implementation", _valid(implementation="flash"),
     r"implementation='flash' is unknown.*reference"),
]


@pytest.mark.parametrize("arguments,message", [case[1:] for case in INVALID_CALLS],
                         ids=[case[0] for case in INVALID_CALLS])
def test_invalid_call_raises(arguments, message):
  with pytest.raises(ValueError, match=message):
    dot_product_attention(**arguments)


@pytest.mark.parametrize("window,message", [
    ((-1, 0), r"\(-1, 0\)"), ((1,), r"\(1,\)"), ((1.5, None), r"\(1.5, None\)"),
    ((True, 0), r"\(True, 0\)"), (3, r"got 3"),
])
def test_invalid_window_raises(window, message):
  with pytest.raises(ValueError, match=r"Mask.window .*" + message):
    Mask(window=window)


def test_mask_causal_must_be_bool():
  with pytest.raises(ValueError, match=r"Mask.causal .*bool.*got 1"):
    Mask(causal=1)


# ------------------------------------------------------------------------------------------------
# implementations() and dispatch

FEATURES = ("bias", "softcap", "dropout", "weights")


def test_implementations_are_names_in_auto_order():
  names = implementations()
  assert isinstance(names, tuple) and all(isinstance(name, str) for name in names)
  assert len(names) == len(set(names)) and {"reference", "xla", "blockwise", "ring"} <= set(names)
  # The README's auto order per platform; ring is only called by name.
  assert implementations("cpu") == ("blockwise", "xla", "reference")
  assert implementations("gpu") == ("cudnn", "tokamax", "xla", "blockwise", "reference")
  assert implementations("tpu") == ("splash", "xla", "blockwise", "reference")
  with pytest.raises(ValueError, match=r"platform must be None or one of .* got 'cuda'"):
    implementations("cuda")


def test_implementations_describe_themselves():
  described = describe_implementations()
  names = [d["name"] for d in described]
  assert names == list(implementations())
  for d in described:
    assert set(d) >= {"name", "masks", *FEATURES, "dtypes", "platforms", "memory", "notes"}, d
    assert set(d["masks"]) <= set(MASK_KINDS), d
    assert all(isinstance(d[feature], bool) for feature in FEATURES), d
    assert d["dtypes"] and all(jnp.issubdtype(jnp.dtype(t), jnp.floating) for t in d["dtypes"]), d
    assert d["platforms"] and set(d["platforms"]) <= {"cpu", "gpu", "tpu"}, d
    assert isinstance(d["memory"], str) and d["memory"], d
  reference = next(d for d in described if d["name"] == "reference")
  assert set(reference["masks"]) == set(MASK_KINDS) and all(reference[f] for f in FEATURES)


def _feature_call(features: frozenset[str], dtype="float32"):
  """Keyword arguments of a small call needing exactly `features` (FEATURES and MASK_KINDS)."""
  arguments = _valid(**{name: x.astype(dtype) for name, x in _valid().items()})
  parts = dict(causal="causal" in features,
               window=(2, 0) if "window" in features else None,
               q_segment_ids=_ids if "segment_ids" in features else None,
               kv_segment_ids=np.zeros((2, 7), np.int32) if "segment_ids" in features else None,
               kv_lengths=np.array([7, 3], np.int32) if "lengths" in features else None,
               array=np.ones((5, 7), bool) if "array" in features else None)
  if any(kind in features for kind in MASK_KINDS):
    arguments["mask"] = Mask(**parts)
  if "bias" in features:
    arguments["bias"] = jnp.zeros((5, 7), dtype)
  if "softcap" in features:
    arguments["softcap"] = 30.0
  if "dropout" in features:
    arguments.update(dropout_rate=0.1, dropout_rng=jax.random.key(0))
  if "weights" in features:
    arguments["return_weights"] = True
  return arguments


def _single_features():
  return [frozenset([feature]) for feature in (*FEATURES, *MASK_KINDS)]


@pytest.mark.parametrize("described", describe_implementations(), ids=lambda d: d["name"])
def test_named_implementation_runs_what_it_declares_and_rejects_the_rest(described):
  name = described["name"]
  if jax.default_backend() not in described["platforms"]:
    pytest.skip(f"{name} does not run on {jax.default_backend()}")
  if described["sequence_sharded"]:
    pytest.skip(f"{name} runs only inside a mesh: tests/test_attention_{name}.py checks it there")
  for features in _single_features():
    (feature,) = features
    arguments = _feature_call(features, dtype="float32")
    declared = described["masks"] if feature in MASK_KINDS else [f for f in FEATURES
                                                                  if described[f]]
    if feature in declared:
      jax.eval_shape(lambda arguments=arguments: dot_product_attention(
          **arguments, implementation=name))
    else:
      words = "return_weights=True" if feature == "weights" else feature
      with pytest.raises(ValueError, match=rf"implementation='{name}' does not support .*"
                         rf"{re.escape(words)}"):
        dot_product_attention(**arguments, implementation=name)


def test_auto_selection_only_picks_an_implementation_that_supports_the_call(monkeypatch):
  chosen = []
  # Wrap every registered function to record which one the dispatcher called.
  for name, impl in list(api._REGISTRY.items()):
    def recording(*args, name=name, fn=impl.fn, **kwargs):
      chosen.append(name)
      return fn(*args, **kwargs)
    monkeypatch.setitem(api._REGISTRY, name, dataclasses.replace(impl, fn=recording))

  combinations = [frozenset()] + _single_features() + [
      frozenset(pair) for pair in itertools.combinations((*FEATURES, "causal", "segment_ids"), 2)]
  for dtype in ("float32", "bfloat16"):
    for features in combinations:
      chosen.clear()
      # Only tracing: selection happens there, and nothing needs compiling.
      jax.eval_shape(lambda arguments=_feature_call(features, dtype): dot_product_attention(
          **arguments))
      masks = sorted(features & set(MASK_KINDS))
      needs = {feature: feature in features for feature in FEATURES}
      assert len(chosen) == 1 and chosen[0] in supporting(masks=masks, dtype=dtype, **needs), (
          features, dtype, chosen)
