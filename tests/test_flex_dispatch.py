"""flex mods through `dot_product_attention`, and structured mods handed to the fused kernels.

Shapes, inputs and the float64 NumPy oracle are tests/test_flex_attention.py's (batch 2, 4 query
heads over 2 key heads, head_dim 8, 37 positions in tiles of 16). Tolerances as there.

Kernel selection for GPU/TPU is checked on CPU as tests/test_attention_api.py does: the dispatcher
is told the platform (`api._platform`) and every registered function is wrapped to record which
one ran; the recorded stand-in runs the reference on the `Mask`/softcap it was handed, so the numbers
check the translation of the mods into a `Mask` against the tiled flex path.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxattn.attention import (Mask, and_masks, api, causal_mask, create_block_mask,
                                describe_implementations, document_mask, dot_product_attention,
                                flex_attention, padding_mask, reference, sliding_window, soft_cap)
from flaxattn.attention.flex import StructuredMask
from test_flex_attention import (BATCH, BLOCK, FWD_TOL, GRAD_TOL, HEADS, LENGTH, SOFTCAP, WINDOW,
                                 _case_params, _grids, _inputs, _oracle)


@pytest.fixture(scope="module")
def inputs():
  return _inputs()


@pytest.fixture(scope="module")
def params():
  return _case_params(np.random.default_rng(1))


def _loss_and_grads(attend, inputs, *args):
  """`(out, dq, dk, dv, d args...)` of `sum(attend(q, k, v, *args) * d_out)`, jitted."""
  q, k, v, d_out, _ = inputs
  loss = lambda q, k, v, *args: jnp.sum(attend(q, k, v, *args) * d_out)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda *xs: (loss(*xs), attend(*xs)), tuple(range(3 + len(args))), has_aux=True))
  (_, out), grads = value_and_grad(q, k, v, *args)
  return out, *grads


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_dot_product_attention_runs_mods_with_mask_bias_and_softcap(inputs, params, implementation):
  """softcap, then the score_mod (ALiBi, captured slopes), then the bias array, then the Mask
  (causal) and the mask_mod (documents): outputs and gradients, slopes and bias included."""
  docs = jnp.asarray(params["documents"])
  bias = np.random.default_rng(2).standard_normal((HEADS, LENGTH, LENGTH)).astype(np.float32)

  def attend(q, k, v, slopes, bias):
    return dot_product_attention(
        q, k, v, mask=Mask(causal=True), bias=bias, softcap=SOFTCAP,
        score_mod=lambda s, b, h, i, j: s - slopes[h] * jnp.abs(i - j).astype(jnp.float32),
        mask_mod=lambda b, h, i, j: docs[b, i] == docs[b, j], implementation=implementation)

  out, dq, dk, dv, d_slopes, d_bias = _loss_and_grads(attend, inputs, params["slopes"], bias)
  b, h, i, j = _grids(BATCH, HEADS, LENGTH, LENGTH)
  distance = np.abs(i - j)
  score = lambda s: (SOFTCAP * np.tanh(s / SOFTCAP) - params["slopes"][h] * distance + bias,
                     1.0 - np.tanh(s / SOFTCAP) ** 2)
  docs = params["documents"]
  q, k, v, d_out, d_lse = inputs
  want = _oracle(q, k, v, d_out, np.zeros_like(d_lse), score=score,
                 visible=(j <= i) & (docs[b, i] == docs[b, j]))
  for label, got, expected in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv),
                                  (want[0], *want[2:5])):
    np.testing.assert_allclose(np.asarray(got), expected, **GRAD_TOL, err_msg=label)
  np.testing.assert_allclose(np.asarray(d_slopes), -(want[-1] * distance).sum((0, 2, 3)),
                             **GRAD_TOL)
  np.testing.assert_allclose(np.asarray(d_bias), want[-1].sum(0), **GRAD_TOL)


def test_block_mask_with_a_mask_keeps_the_mask_on_full_tiles(inputs, params):
  """A block mask of the documents (FULL tiles) passed with `Mask(kv_lengths)`: the Mask still
  hides the keys past each row's length inside tiles the block mask calls full."""
  q, k, v = inputs[:3]
  docs, valid = np.zeros_like(params["documents"]), params["valid"]  # One document: all tiles full.

  @jax.jit
  def attend(q, k, v, docs, valid):
    block_mask = create_block_mask(lambda b, h, i, j: docs[b, i] == docs[b, j], BATCH, None,
                                   LENGTH, LENGTH, block_size=BLOCK)
    return dot_product_attention(q, k, v, mask=Mask(kv_lengths=valid), block_mask=block_mask)

  b, _, _, j = _grids(BATCH, 1, LENGTH, LENGTH)
  want = _oracle(*inputs, score=lambda s: (s, np.ones_like(s)), visible=j < valid[b])[0]
  np.testing.assert_allclose(np.asarray(attend(q, k, v, docs, valid)), want, **FWD_TOL)


def test_softcap_is_the_same_numbers_either_way(inputs):
  q, k, v = inputs[:3]
  run = lambda attend: np.asarray(jax.jit(attend)(q, k, v))
  by_knob = run(lambda q, k, v: dot_product_attention(q, k, v, mask=Mask(causal=True),
                                                      softcap=SOFTCAP))
  by_mod = run(lambda q, k, v: flex_attention(q, k, v, score_mod=soft_cap(SOFTCAP),
                                              mask_mod=causal_mask()))
  by_dispatch = run(lambda q, k, v: dot_product_attention(q, k, v, score_mod=soft_cap(SOFTCAP),
                                                          mask_mod=lambda b, h, i, j: j <= i))
  np.testing.assert_array_equal(by_mod, by_knob)
  np.testing.assert_array_equal(by_dispatch, by_knob)


@pytest.mark.parametrize("described", [d for d in describe_implementations()
                                       if "cpu" in d["platforms"]], ids=lambda d: d["name"])
def test_implementations_without_mods_decline_them_in_one_line(described):
  x = jnp.zeros((1, 8, 2, 8))
  call = lambda: dot_product_attention(x, x, x, mask_mod=lambda b, h, i, j: j <= i,
                                       implementation=described["name"])
  if described["mods"]:
    jax.eval_shape(call)
    return
  with pytest.raises(ValueError, match=rf"implementation='{described['name']}' does not support "
                     r"score_mod/mask_mod") as error:
    call()
  assert "\n" not in str(error.value)


def test_reference_declines_weights_with_mods():
  x = jnp.zeros((1, 8, 2, 8))
  with pytest.raises(ValueError, match="return_weights/dropout together with score_mod"):
    dot_product_attention(x, x, x, mask_mod=lambda b, h, i, j: j <= i, return_weights=True,
                          implementation="reference")


# ------------------------------------------------------------------------------------------------
# Structured mods.

def _structured(params):
  """and_masks of every structured kind: causal, a window of WINDOW keys, documents, lengths."""
  valid = params["valid"]
  return and_masks(causal_mask(), sliding_window(WINDOW), document_mask(params["documents"]),
                   padding_mask(valid, q_lengths=valid))


def _structured_visible(params):
  docs, valid = params["documents"], params["valid"]
  b, _, i, j = _grids(BATCH, 1, LENGTH, LENGTH)
  return ((j <= i) & (i - j < WINDOW) & (docs[b, i] == docs[b, j]) & (i < valid[b])
          & (j < valid[b]))


def test_structured_masks_combine_into_one_mask_and_match_oracle(inputs, params):
  mask_mod = _structured(params)
  assert isinstance(mask_mod, StructuredMask)
  assert mask_mod.mask.causal and mask_mod.mask.window == (WINDOW - 1, 0)
  assert mask_mod.mask.kinds == {"causal", "window", "segment_ids", "lengths"}
  # Two document masks are not one Mask: the combination is a plain mask_mod.
  assert not isinstance(and_masks(mask_mod, document_mask(params["documents"])), StructuredMask)
  q, k, v = inputs[:3]
  want = _oracle(*inputs, score=lambda s: (SOFTCAP * np.tanh(s / SOFTCAP), np.ones_like(s)),
                 visible=_structured_visible(params))[0]
  got = flex_attention(q, k, v, score_mod=soft_cap(SOFTCAP), mask_mod=mask_mod)
  np.testing.assert_allclose(np.asarray(got), want, **FWD_TOL)


@pytest.fixture
def recorded(monkeypatch):
  """`(chosen, set_platform)`: every registered implementation records its name in `chosen` and
  runs the reference on what it was given; `set_platform(p)` makes the dispatcher see `p`."""
  chosen = []
  for name, impl in list(api._REGISTRY.items()):
    def recording(*args, name=name, **kwargs):
      chosen.append(name)
      return reference.attention(*args, **kwargs)
    monkeypatch.setitem(api._REGISTRY, name, dataclasses.replace(impl, fn=recording))
  return chosen, lambda platform: monkeypatch.setattr(api, "_platform", lambda: platform)


@pytest.mark.parametrize("platform, dtype, mods, expected", [
    ("tpu", "float32", "all", "splash"),
    ("gpu", "float32", "all", "tokamax"),       # cuDNN: no float32, no segment ids, no softcap.
    ("gpu", "bfloat16", "causal_window", "cudnn"),
    ("cpu", "float32", "all", None),            # Blockwise is CPU's choice: flex tiles itself.
    ("tpu", "float32", "unstructured", None),   # A mask_mod no Mask states.
    ("tpu", "float32", "lse", None),            # return_lse: only the flex kernel gives it.
])
def test_structured_mods_reach_the_platform_kernel(inputs, params, recorded, platform, dtype,
                                                    mods, expected):
  chosen, set_platform = recorded
  q, k, v = (x.astype(dtype) for x in inputs[:3])
  score_mod, mask_mod = {
      "all": (soft_cap(SOFTCAP), _structured(params)),
      "lse": (soft_cap(SOFTCAP), _structured(params)),
      "causal_window": (None, and_masks(causal_mask(), sliding_window(WINDOW))),
      "unstructured": (soft_cap(SOFTCAP), lambda b, h, i, j: (j <= i) | (j < 3))}[mods]
  set_platform(platform)
  out = jax.eval_shape(lambda q, k, v: flex_attention(
      q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_lse=mods == "lse"), q, k, v)
  assert chosen == ([] if expected is None else [expected])
  assert (out[0] if mods == "lse" else out).shape == q.shape


def test_routed_call_gives_the_flex_numbers(inputs, params, recorded):
  """Handed to 'splash' (the reference stand-in, on the Mask it received), the structured call
  gives the tiled flex path's output."""
  chosen, set_platform = recorded
  q, k, v = inputs[:3]
  attend = lambda q, k, v: flex_attention(q, k, v, score_mod=soft_cap(SOFTCAP),
                                          mask_mod=_structured(params))
  tiled = jax.jit(attend)(q, k, v)
  set_platform("tpu")
  routed = jax.jit(lambda q, k, v: attend(q, k, v))(q, k, v)  # A new function: a new trace.
  assert chosen == ["splash"]
  np.testing.assert_allclose(np.asarray(routed), np.asarray(tiled), **FWD_TOL)


# ------------------------------------------------------------------------------------------------
# One block mask per stack.

def _classifying(jaxpr, times=1) -> int:
  """Equations of `create_block_mask`'s classification (its named scope) a traced program runs,
  each counted as often as the scans around it repeat it."""
  count = 0
  for eqn in jaxpr.eqns:
    if "create_block_mask" in str(eqn.source_info.name_stack):
      count += times
      continue
    inner = times * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          count += _classifying(sub, inner)
  return count


@pytest.mark.parametrize("scan_layers", [True, False])
def test_a_stack_classifies_its_block_mask_once(monkeypatch, scan_layers):
  """A 4-layer ALiBi decoder on the flex path: one classification per forward, not one per layer
  (the per-layer count is what the layers do without the stack's block mask)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flaxattn.nn import Decoder, MultiHeadAttention, TransformerConfig  # pylint: disable=import-outside-toplevel

  config = TransformerConfig(vocab_size=13, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32,
                             num_layers=4, positions="alibi", scan_layers=scan_layers)
  model = Decoder(config, rngs=nnx.Rngs(0))
  x = jnp.zeros((BATCH, LENGTH, 16))
  positions = jnp.broadcast_to(jnp.arange(LENGTH, dtype=jnp.int32), (BATCH, LENGTH))
  mask = Mask(causal=True, q_segment_ids=jnp.asarray(_case_params(np.random.default_rng(1))[
      "documents"]))
  # A new function per trace: make_jaxpr caches traces by function.
  traced = lambda: jax.make_jaxpr(lambda x: model(x, positions=positions, mask=mask)[0])(x).jaxpr
  shared = _classifying(traced())
  monkeypatch.setattr(MultiHeadAttention, "shared_block_mask", lambda *args, **kwargs: None)
  per_layer = _classifying(traced())
  assert shared > 0 and per_layer == 4 * shared, (shared, per_layer)
