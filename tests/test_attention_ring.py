"""Ring attention on 8 simulated CPU devices: outputs and gradients against the float64 NumPy oracle.

Each case builds a mesh `data x context` (8 devices), places query/key/value sharded as the
`context` preset lays activations out (batch over `data`, length over `context`), and compiles the
forward and the vector-Jacobian product in one `jit`. The same compiled program is checked for its
communication: key/value blocks move by collective-permutes, and nothing is all-gathered.

Tolerances: those of the shared oracle suite (tests/test_attention_numpy.py) for the dtype, as a
fraction of each tensor's scale (`attention_support.assert_close`). Compiling dominates (several
seconds a case on 2 shared cores), so the fast suite runs one case and the others are `slow`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_support import MaskParts, assert_close, numpy_attention, numpy_visible
from flaxattn.attention import Mask, activation_layout, api, dot_product_attention, ring

P = jax.sharding.PartitionSpec
TOLERANCES = {"float32": dict(out=1e-5, grad=1e-5), "bfloat16": dict(out=2e-2, grad=4e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
  context: int
  causal: bool
  segments: bool
  heads: int = 4
  kv_heads: int = 2
  length: int = 64
  batch: int = 2
  head_dim: int = 16
  value_dim: int = 16
  softcap: float | None = None
  dtype: str = "float32"

  @property
  def label(self) -> str:
    """A short test id, e.g. `context4-causal-segments-heads4x2-len64-float32`."""
    parts = [f"context{self.context}", "causal" if self.causal else "full",
             *(["segments"] if self.segments else []), f"heads{self.heads}x{self.kv_heads}",
             f"len{self.length}", *([f"value_dim{self.value_dim}"] if self.value_dim != 16 else []),
             *([f"softcap{self.softcap}"] if self.softcap else []), self.dtype]
    return "-".join(parts)


def _mesh(context: int, axis_type=jax.sharding.AxisType.Auto, devices: int = 8):
  assert jax.device_count() == 8, "tests/conftest.py sets up 8 CPU devices"
  return jax.make_mesh((devices // context, context), ("data", "context"),
                       axis_types=(axis_type,) * 2, devices=jax.devices()[:devices])


def _inputs(case: Case, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = dict(query=(case.batch, case.length, case.heads, case.head_dim),
                key=(case.batch, case.length, case.kv_heads, case.head_dim),
                value=(case.batch, case.length, case.kv_heads, case.value_dim),
                d_out=(case.batch, case.length, case.heads, case.value_dim))
  inputs = {name: jnp.asarray(rng.normal(size=shape), case.dtype) for name, shape in shapes.items()}
  segment_ids = None
  if case.segments:
    # Row 0: packed documents in runs crossing the shard edges, the last run padding (id 0, as
    # the models mark it). Row 1: ids in no particular order (a query sees every key of its id).
    runs = np.zeros(case.length, np.int32)
    first, second, padding = case.length // 2 - 3, case.length * 3 // 4 + 1, case.length * 7 // 8
    runs[:first], runs[first:second], runs[second:padding] = 1, 2, 3
    segment_ids = np.stack([runs, rng.integers(0, 3, case.length)]).astype(np.int32)[:case.batch]
  return inputs, segment_ids


def _layout(mesh, batch: int) -> P:
  """The layout the `context` preset gives activations, stated to ring attention as `flaxattn.nn`
  does: batch over data/fsdp (where it divides; else replicated, as ring attention then leaves it),
  length over context, heads over tensor."""
  batch_axis = next((axis for axis in ("data", "fsdp") if axis in mesh.axis_names
                     and batch % mesh.shape[axis] == 0), None)
  return P(batch_axis, "context", "tensor" if "tensor" in mesh.axis_names else None, None)


def _run(case: Case, implementation: str = "ring", mesh=None):
  """`(out, (dq, dk, dv), hlo_text)` of `implementation` on `case`, on `mesh` if given."""
  inputs, segment_ids = _inputs(case)
  mask = Mask(causal=case.causal,
              q_segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))

  layout = None if mesh is None else _layout(mesh, case.batch)

  def forward_and_vjp(query, key, value, d_out, mask):
    with activation_layout(layout):
      out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
          q, k, v, mask=mask, softcap=case.softcap, implementation=implementation), query, key,
          value)
    return out, vjp(d_out)

  arguments = (inputs["query"], inputs["key"], inputs["value"], inputs["d_out"], mask)
  if mesh is None:
    return *jax.jit(forward_and_vjp)(*arguments), ""
  place = lambda x: jax.device_put(x, jax.sharding.NamedSharding(
      mesh, layout if x.ndim == 4 else P(*layout[:2])))
  with jax.set_mesh(mesh):
    sharded = jax.tree.map(place, arguments)
    compiled = jax.jit(forward_and_vjp).lower(*sharded).compile()
    out, grads = compiled(*sharded)
  return out, grads, compiled.as_text()


def _check_against_oracle(case: Case, mesh=None):
  out, grads, hlo = _run(case, mesh=_mesh(case.context) if mesh is None else mesh)
  inputs, segment_ids = _inputs(case)
  exact = {name: np.asarray(x, np.float64) for name, x in inputs.items()}
  parts = MaskParts(causal=case.causal, q_segment_ids=segment_ids)
  expected = numpy_attention(
      exact["query"], exact["key"], exact["value"], softcap=case.softcap, d_out=exact["d_out"],
      visible=numpy_visible(parts, case.batch, case.heads, case.length, case.length))
  tolerance = TOLERANCES[case.dtype]
  assert out.shape == inputs["d_out"].shape and out.dtype == inputs["query"].dtype
  assert_close(out, expected["out"], tolerance["out"], f"output of {case}")
  for name, grad in zip(("query", "key", "value"), grads):
    assert grad.shape == inputs[name].shape and grad.dtype == inputs[name].dtype, name
    assert_close(grad, expected[name], tolerance["grad"], f"d{name} of {case}")
  return hlo


def _assert_ring_communication(hlo: str):
  # Blocks travel by collective-permute; an all-gather would mean some device held the whole
  # sequence's keys/values (and an all-to-all that XLA re-laid the sequence out by itself).
  assert "collective-permute" in hlo
  for collective in ("all-gather", "all-to-all"):
    assert collective not in hlo, f"{collective} in the ring attention program"


def test_causal_segments_gqa_on_four_devices():
  _assert_ring_communication(_check_against_oracle(Case(context=4, causal=True, segments=True)))


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    # Batch 2 on data=4: not divisible, so replicated over data.
    Case(context=2, causal=True, segments=True, heads=4, kv_heads=4),
    Case(context=8, causal=True, segments=True, heads=4, kv_heads=1),
    Case(context=8, causal=True, segments=False, softcap=5.0, value_dim=8),
    Case(context=2, causal=False, segments=True),
    Case(context=4, causal=False, segments=False, heads=2, kv_heads=1, length=128),
    Case(context=4, causal=True, segments=True, dtype="bfloat16"),
], ids=lambda case: case.label)
def test_matches_oracle(case):
  _assert_ring_communication(_check_against_oracle(case))


@pytest.mark.slow
def test_batch_over_fsdp_and_heads_over_tensor():
  mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "context"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  _assert_ring_communication(_check_against_oracle(
      Case(context=2, causal=True, segments=True, heads=4, kv_heads=2), mesh=mesh))


@pytest.mark.slow
def test_explicit_mesh_axes_and_replicated_inputs():
  # Explicit axes: the wrapper reshards its arguments; here they arrive replicated.
  case = Case(context=4, causal=True, segments=True)
  mesh = _mesh(case.context, jax.sharding.AxisType.Explicit)
  inputs, segment_ids = _inputs(case)
  mask = Mask(causal=True, q_segment_ids=jnp.asarray(segment_ids))
  with jax.set_mesh(mesh):
    def attend(q, k, v):
      with activation_layout(_layout(mesh, case.batch)):
        return dot_product_attention(q, k, v, mask=mask, implementation="ring")
    out = jax.jit(attend)(inputs["query"], inputs["key"], inputs["value"])
  assert out.sharding.spec == P("data", "context", None, None)
  parts = MaskParts(causal=True, q_segment_ids=segment_ids)
  exact = {name: np.asarray(x, np.float64) for name, x in inputs.items()}
  expected = numpy_attention(exact["query"], exact["key"], exact["value"],
                             visible=numpy_visible(parts, case.batch, case.heads, case.length,
                                                   case.length))
  assert_close(out, expected["out"], TOLERANCES["float32"]["out"], "output on explicit axes")


@pytest.mark.parametrize("context", [3, 4])
def test_zigzag_order_and_its_inverse(context):
  """Device i holds chunks i and 2C-1-i of 2C; the inverse restores natural order (odd C too)."""
  mesh = jax.make_mesh((context,), ("context",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:context])
  config = ring._Ring(axis_name="context", size=context, causal=True, scale=1.0, softcap=None,
                      block_q=None, block_kv=None)
  positions = jnp.arange(2 * context * 3, dtype=jnp.int32)[None]  # [1, length], chunks of 3
  spec = P(None, "context")
  with jax.set_mesh(mesh):
    zigzag, restored = jax.jit(jax.shard_map(
        lambda x: (ring._to_zigzag(x, config), ring._from_zigzag(ring._to_zigzag(x, config), config)),
        in_specs=spec, out_specs=(spec, spec)))(positions)
  chunks = np.asarray(zigzag).reshape(2 * context, 3)[:, 0] // 3
  want = [chunk for device in range(context) for chunk in (device, 2 * context - 1 - device)]
  assert chunks.tolist() == want
  np.testing.assert_array_equal(np.asarray(restored), np.asarray(positions))


def test_the_ring_is_the_axis_the_layout_gives_the_length():
  """No axis name is built in: a mesh whose axes are called `rows` and `seq` rings over `seq`."""
  case = Case(context=4, causal=True, segments=False, length=16)
  inputs, _ = _inputs(case)
  mesh = jax.make_mesh((2, 4), ("rows", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def attend(q, k, v):
    with activation_layout(P("rows", "seq", None, None)):
      return dot_product_attention(q, k, v, mask=Mask(causal=True), implementation="ring")
  with jax.set_mesh(mesh):
    compiled = jax.jit(attend).lower(inputs["query"], inputs["key"], inputs["value"]).compile()
    out = compiled(inputs["query"], inputs["key"], inputs["value"])
  _assert_ring_communication(compiled.as_text())
  expected = dot_product_attention(inputs["query"], inputs["key"], inputs["value"],
                                   mask=Mask(causal=True), implementation="reference")
  assert_close(out, np.asarray(expected, np.float64), TOLERANCES["float32"]["out"], "ring over seq")


def test_context_axis_of_one_device_is_blockwise_attention():
  case = Case(context=1, causal=True, segments=True, length=16)
  _check_against_oracle(case, mesh=_mesh(1, devices=1))


# ------------------------------------------------------------------------------------------------
# What ring attention refuses, with messages naming the reason (tracing only, nothing compiles).


def _shapes(length=16, kv_length=None):
  kv_length = length if kv_length is None else kv_length
  return (jax.ShapeDtypeStruct((2, length, 4, 8), jnp.float32),
          jax.ShapeDtypeStruct((2, kv_length, 2, 8), jnp.float32),
          jax.ShapeDtypeStruct((2, kv_length, 2, 8), jnp.float32))


def _trace(shapes, mesh=None, **kwargs):
  def attend(q, k, v):
    with activation_layout(P(None, "context", None, None)):
      return dot_product_attention(q, k, v, implementation="ring", **kwargs)
  if mesh is None:
    return jax.eval_shape(attend, *shapes)
  with jax.set_mesh(mesh):
    return jax.eval_shape(attend, *shapes)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bias=jnp.zeros((16, 16))), "does not support bias"),
    (dict(mask=Mask(window=(4, 0))), "does not support mask kind 'window'"),
    (dict(mask=Mask(kv_lengths=jnp.array([16, 9]))), "does not support mask kind 'lengths'"),
    (dict(mask=Mask(array=jnp.ones((16, 16), bool))), "does not support mask kind 'array'"),
    (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "does not support dropout"),
    (dict(return_weights=True), "does not support return_weights=True"),
])
def test_dispatcher_rejects_unsupported_features(kwargs, message):
  with pytest.raises(ValueError, match=rf"implementation='ring' {message}"):
    _trace(_shapes(), _mesh(4), **kwargs)


def test_needs_a_context_mesh_equal_lengths_and_whole_chunks():
  with pytest.raises(ValueError, match=r"does not support a call outside a mesh with axis 'context'"):
    _trace(_shapes())
  data_only = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  with pytest.raises(ValueError, match=r"current mesh axes are \['data'\]"):
    _trace(_shapes(), data_only)
  with pytest.raises(ValueError, match=r"q_len != kv_len \(16 vs 24"):
    _trace(_shapes(16, 24), _mesh(4))
  with pytest.raises(ValueError, match=r"length divisible by 8 \(2 x 4 zig-zag chunks .* got length 12"):
    _trace(_shapes(12), _mesh(4), mask=Mask(causal=True))
  with pytest.raises(ValueError, match=r"length divisible by 4 \(4 devices\), got length 10"):
    _trace(_shapes(10), _mesh(4))
  assert _trace(_shapes(12), _mesh(4)).shape == (2, 12, 4, 8)  # Non-causal: 4 shards suffice.


def test_never_chosen_automatically():
  # Inside a context mesh it could run the call, yet the dispatcher picks it only by name.
  call = api.Call(masks=frozenset({"causal"}), bias=False, softcap=False, dropout=False,
                  weights=False, dtype="float32", platform=jax.default_backend(), q_len=16,
                  kv_len=16, mesh_axes=frozenset({"data", "context"}), sequence_axes=("context",))
  assert api._REGISTRY["ring"].unsupported(call) is None
  assert api._select(None, call).name != "ring"
