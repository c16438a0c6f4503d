"""Accelerator backends on a CPU: dispatch rules, and each wrapper against the float64 NumPy oracle.

The kernels themselves need a GPU or TPU. What a CPU can check:
* dispatch: auto-selection here never picks them, forcing them raises a clear error, and on a
  described GPU/TPU call the dispatcher picks the kernel that declares it (including shape limits);
* cuDNN: the flaxattn -> `jax.nn.dot_product_attention` translation (`cudnn.cudnn_arguments`) run
  through `implementation='xla'`, forward and gradients;
* tokamax: the same wrapper with tokamax's 'xla' and 'xla_chunked' ops (the only ones a CPU runs);
* splash: the real Pallas TPU kernel in interpret mode (`pltpu.force_tpu_interpret_mode()`), slow.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_support import MaskParts, assert_close, numpy_attention, numpy_visible
from flaxattn.attention import Mask, api, cudnn, dot_product_attention, rows, splash
from flaxattn.attention import tokamax_attention
from flaxattn.attention.spec import Call
from flaxattn.models.common import padding_segments

ACCELERATOR_KERNELS = ("cudnn", "tokamax", "splash")
# Fractions of each tensor's scale (see attention_support.assert_close); as test_attention_numpy.py.
TOLERANCES = {"float32": dict(out=1e-5, grad=1e-5), "bfloat16": dict(out=2e-2, grad=4e-2)}


# ------------------------------------------------------------------------------------------------
# Oracle plumbing


@dataclasses.dataclass(frozen=True)
class Problem:
  """One attention call: shapes, dtype, mask ingredients, bias shape, softcap."""

  batch: int
  q_len: int
  kv_len: int
  heads: int
  kv_heads: int
  head_dim: int
  value_dim: int
  dtype: str = "float32"
  parts: MaskParts = MaskParts()
  bias_shape: tuple[int, ...] | None = None
  softcap: float | None = None


def _inputs(problem: Problem, seed: int = 0):
  rng = np.random.default_rng(seed)
  p = problem
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), p.dtype)
  query = normal(p.batch, p.q_len, p.heads, p.head_dim)
  key = normal(p.batch, p.kv_len, p.kv_heads, p.head_dim)
  value = normal(p.batch, p.kv_len, p.kv_heads, p.value_dim)
  bias = None if p.bias_shape is None else normal(*p.bias_shape)
  d_out = normal(p.batch, p.q_len, p.heads, p.value_dim)
  return query, key, value, bias, d_out


def _mask(parts: MaskParts) -> Mask | None:
  as_jax = lambda x: None if x is None else jnp.asarray(x)
  mask = Mask(causal=parts.causal, window=parts.window, q_segment_ids=as_jax(parts.q_segment_ids),
              kv_segment_ids=as_jax(parts.kv_segment_ids), q_lengths=as_jax(parts.q_lengths),
              kv_lengths=as_jax(parts.kv_lengths), array=as_jax(parts.array))
  return mask if mask.kinds else None


def _run(function, problem: Problem, seed: int = 0, **keywords):
  """Output and (query, key, value, bias) gradients of `function` (an implementation's `fn`)."""
  query, key, value, bias, d_out = _inputs(problem, seed)
  scale = problem.head_dim ** -0.5
  mask = _mask(problem.parts)

  def attend(query, key, value, bias):
    return function(query, key, value, mask=mask, bias=bias, scale=scale, softcap=problem.softcap,
                    dropout_rate=0.0, dropout_rng=None, return_weights=False, **keywords)

  @jax.jit
  def forward_backward(query, key, value, bias, d_out):
    out, vjp = jax.vjp(attend, query, key, value, bias)
    return out, vjp(d_out)

  return forward_backward(query, key, value, bias, d_out)


def _expected(problem: Problem, seed: int = 0):
  query, key, value, bias, d_out = _inputs(problem, seed)
  p = problem
  visible = numpy_visible(p.parts, p.batch, p.heads, p.q_len, p.kv_len)
  expected = numpy_attention(query, key, value, visible=visible, bias=bias, softcap=p.softcap,
                             d_out=d_out)
  return expected["out"], tuple(expected[name] for name in ("query", "key", "value", "bias"))


def _assert_matches_oracle(actual, problem: Problem, what: str, seed: int = 0):
  (out, grads), (expected_out, expected_grads) = actual, _expected(problem, seed)
  tolerance = TOLERANCES[problem.dtype]
  assert out.shape == expected_out.shape and out.dtype == jnp.dtype(problem.dtype), what
  assert_close(out, expected_out, tolerance["out"], f"{what}: output")
  for name, grad, expected_grad in zip(("query", "key", "value", "bias"), grads, expected_grads):
    if expected_grad is None:
      assert grad is None, f"{what}: d{name}"
    else:
      assert_close(grad, expected_grad, tolerance["grad"], f"{what}: d{name}")


def _ids(*runs):
  """Segment ids `[1, sum(lengths)]` from (id, length) runs."""
  return np.concatenate([np.full(length, segment, np.int32) for segment, length in runs])[None]


# ------------------------------------------------------------------------------------------------
# Dispatch: never on the wrong platform, and the right kernel on its own


def _call(platform, *, masks=(), dtype="bfloat16", bias=False, softcap=False, q_len=1024,
          kv_len=1024, head_dim=128, value_dim=None):
  return Call(masks=frozenset(masks), bias=bias, softcap=softcap, dropout=False, weights=False,
              dtype=dtype, platform=platform, q_len=q_len, kv_len=kv_len, heads=8, kv_heads=2,
              head_dim=head_dim, value_dim=head_dim if value_dim is None else value_dim)


def test_cpu_auto_selection_never_picks_an_accelerator_kernel():
  assert jax.default_backend() == "cpu"
  assert not set(api._PREFERENCE["cpu"]) & set(ACCELERATOR_KERNELS)
  for dtype in ("float32", "bfloat16", "float16"):
    for masks in ((), ("causal",), ("causal", "window"), ("segment_ids",), ("lengths",)):
      for softcap in (False, True):
        chosen = api._select(None, _call("cpu", masks=masks, dtype=dtype, softcap=softcap))
        assert chosen.name not in ACCELERATOR_KERNELS, (dtype, masks, softcap, chosen.name)


@pytest.mark.parametrize("name", ACCELERATOR_KERNELS)
def test_forcing_an_accelerator_kernel_on_cpu_raises(name):
  query = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match=rf"implementation='{name}' does not support platform 'cpu' "
                                       rf"\(runs on \['(gpu|tpu)'\]\)"):
    dot_product_attention(query, query, query, mask=Mask(causal=True), implementation=name)


@pytest.mark.parametrize("call,expected", [
    (_call("gpu", masks=("causal", "lengths"), bias=True), "cudnn"),
    (_call("gpu", masks=("causal", "window")), "cudnn"),
    # cuDNN declines these; tokamax (installed here) takes them.
    (_call("gpu", masks=("causal", "segment_ids")), "tokamax"),
    (_call("gpu", softcap=True), "tokamax"),
    (_call("gpu", dtype="float32"), "tokamax"),
    (_call("gpu", masks=("causal",), q_len=1, kv_len=4096), "tokamax"),
    (_call("gpu", masks=("window",)), "tokamax"),
    (_call("gpu", head_dim=512), "tokamax"),
    (_call("gpu", bias=True, q_len=1023), "tokamax"),
    # Neither runs softcap together with bias: the XLA-based kernels do.
    (_call("gpu", bias=True, softcap=True), "blockwise"),
    (_call("tpu", masks=("causal", "window", "segment_ids", "lengths"), softcap=True), "splash"),
    (_call("tpu", masks=("causal",), q_len=2048, kv_len=1024), "xla"),
    (_call("tpu", bias=True), "xla"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_accelerator_selection(call, expected):
  assert api._select(None, call).name == expected


def test_cudnn_declines_with_reasons():
  cases = [
      (_call("gpu", head_dim=100), r"head_dim 100 .*multiple of 8"),
      (_call("gpu", head_dim=64, value_dim=512), r"head_dim 512"),
      (_call("gpu", masks=("causal",), q_len=7, kv_len=9), r"q_len != kv_len \(7 vs 9\)"),
      (_call("gpu", masks=("window",)), r"window without causal=True"),
      (_call("gpu", bias=True, q_len=5, kv_len=5), r"bias with odd lengths"),
      (_call("gpu", masks=("segment_ids",)), r"mask kind 'segment_ids'"),
      (_call("gpu", dtype="float32"), r"dtype float32"),
  ]
  for call, message in cases:
    reason = cudnn.IMPLEMENTATION.unsupported(call)
    assert reason is not None and re.search(message, reason), (call, reason)


def test_tokamax_missing_is_a_reason_not_a_crash(monkeypatch):
  monkeypatch.setattr(tokamax_attention, "load_tokamax", lambda: None)
  reason = tokamax_attention.IMPLEMENTATION.unsupported(_call("gpu", masks=("segment_ids",)))
  assert "tokamax is not installed" in reason
  # The GPU dispatcher moves on to the XLA-based kernels.
  assert api._select(None, _call("gpu", masks=("segment_ids",))).name == "xla"


def test_flaxattn_imports_without_tokamax():
  """A tokamax import that fails (as when it is not installed) leaves flaxattn working."""
  program = textwrap.dedent("""
      import sys
      class NoTokamax:
        def find_spec(self, name, path=None, target=None):
          if name == "tokamax" or name.startswith("tokamax."):
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, NoTokamax())
      import jax.numpy as jnp
      from flaxattn.attention import dot_product_attention, implementations, tokamax_attention
      assert "tokamax" in implementations()
      assert tokamax_attention.load_tokamax() is None
      x = jnp.ones((1, 4, 2, 8))
      assert dot_product_attention(x, x, x).shape == (1, 4, 2, 8)
      print("ok")
  """)
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Row helpers (exact per-query facts without a [q_len, kv_len] array)


def test_sees_any_key_and_segment_ranges_against_numpy():
  rng = np.random.default_rng(3)
  batch, q_len, kv_len = 3, 11, 17
  for trial in range(6):
    # Few ids over many positions: segments split into several runs, some ids missing from keys.
    q_ids = rng.integers(0, 4, size=(batch, q_len)).astype(np.int32)
    kv_ids = np.sort(rng.integers(0, 4, size=(batch, kv_len)), axis=1).astype(np.int32)
    if trial % 2:
      kv_ids = rng.integers(0, 4, size=(batch, kv_len)).astype(np.int32)
    parts = MaskParts(causal=bool(trial % 3 == 0), window=[None, (3, 2), (0, None)][trial % 3],
                      q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                      q_lengths=rng.integers(0, q_len + 1, size=batch).astype(np.int32),
                      kv_lengths=rng.integers(0, kv_len + 1, size=batch).astype(np.int32))
    visible = numpy_visible(parts, batch, 1, q_len, kv_len)[:, 0]
    mask = _mask(parts)
    sees_any = jax.jit(rows.sees_any_key, static_argnums=(1, 2, 3))(mask, batch, q_len, kv_len)
    np.testing.assert_array_equal(sees_any, visible.any(-1))

    start, end, contiguous = map(np.asarray, jax.jit(rows.segment_key_ranges)(q_ids, kv_ids))
    same = q_ids[:, :, None] == kv_ids[:, None, :]
    for b in range(batch):
      for i in range(q_len):
        positions = np.flatnonzero(same[b, i])
        if positions.size == 0:
          assert start[b, i] == end[b, i] == 0
          continue
        assert (start[b, i], end[b, i]) == (positions[0], positions[-1] + 1)
        assert contiguous[b, i] == (positions.size == positions[-1] - positions[0] + 1)


# ------------------------------------------------------------------------------------------------
# cuDNN: the argument translation, run through jax.nn's XLA path


CUDNN_PROBLEMS = {
    # GQA, value_dim < head_dim (padded), causal + window (its right side irrelevant under causal),
    # both lengths; batch row 1 has no keys at all, and in row 0 queries 14, 15 are past the window's
    # reach of the 9 keys: all those rows must come out zero with zero gradient.
    "causal_window_lengths_bias": Problem(
        2, 16, 16, 4, 2, 16, 8, parts=MaskParts(
            causal=True, window=(5, 3), q_lengths=np.array([16, 11], np.int32),
            kv_lengths=np.array([9, 0], np.int32)), bias_shape=(1, 4, 16, 16)),
    "bfloat16_bias_broadcast": Problem(1, 16, 12, 2, 2, 16, 16, dtype="bfloat16",
                                       bias_shape=(1, 1, 1, 12)),
}


def test_cudnn_arguments_translate_the_mask():
  problem = CUDNN_PROBLEMS["causal_window_lengths_bias"]
  query, key, value, bias, _ = _inputs(problem)
  (query_padded, _, value_padded), keywords, sees_any = cudnn.cudnn_arguments(
      query, key, value, mask=_mask(problem.parts), bias=bias, scale=0.25)
  assert value_padded.shape == (2, 16, 2, 16) and query_padded.shape == (2, 16, 4, 16)
  assert keywords["is_causal"] and keywords["local_window_size"] == (5, 0)
  assert keywords["scale"] == 0.25 and keywords["bias"].shape == (1, 4, 16, 16)
  # Non-empty queries: row 0 sees keys up to 8 with a window of 5 -> queries 0..13; row 1 none.
  np.testing.assert_array_equal(keywords["query_seq_lengths"], [14, 0])
  np.testing.assert_array_equal(keywords["key_value_seq_lengths"], [9, 1])
  np.testing.assert_array_equal(sees_any, np.arange(16)[None, :] < np.array([[14], [0]]))


@pytest.mark.parametrize("name", sorted(CUDNN_PROBLEMS))
def test_cudnn_translation_matches_oracle(name):
  problem = CUDNN_PROBLEMS[name]
  _assert_matches_oracle(_run(cudnn.attention, problem, backend="xla"), problem, name)


# ------------------------------------------------------------------------------------------------
# tokamax: the wrapper with the ops a CPU runs


TOKAMAX_PROBLEMS = {
    # Contiguous packed segments, causal + left window, both lengths, GQA, softcap.
    "segments_window_lengths_softcap": Problem(
        2, 24, 24, 4, 2, 8, 8, parts=MaskParts(
            causal=True, window=(6, None),
            q_segment_ids=np.concatenate([_ids((0, 10), (1, 9), (2, 5)), _ids((5, 24))]),
            kv_segment_ids=np.concatenate([_ids((0, 10), (1, 9), (2, 5)), _ids((5, 24))]),
            q_lengths=np.array([22, 24], np.int32), kv_lengths=np.array([24, 13], np.int32)),
        softcap=5.0),
    # Decoding shape: 8 queries after 20 keys, end-aligned causal; MQA; bias and an explicit array.
    "end_aligned_bias_array": Problem(
        1, 8, 20, 4, 1, 8, 12, parts=MaskParts(
            causal=True, array=np.random.default_rng(1).random((1, 1, 8, 20)) < 0.8),
        bias_shape=(1, 4, 8, 20)),
}


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
@pytest.mark.parametrize("op", ["xla", "xla_chunked"])
@pytest.mark.parametrize("name", sorted(TOKAMAX_PROBLEMS))
def test_tokamax_wrapper_matches_oracle(name, op):
  problem = TOKAMAX_PROBLEMS[name]
  _assert_matches_oracle(_run(tokamax_attention.attention, problem, implementation=op), problem,
                         f"{name} ({op})")


# Padding at both ends of a row, as the models lay it out (`padding_segments`): row 0 a left-padded
# prompt that is also right-padded, row 1 real tokens then padding (a seq2seq source or target).
BOTH_ENDS = np.asarray([[0] * 3 + [1] * 9 + [0] * 4, [1] * 11 + [0] * 5], bool)


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
@pytest.mark.parametrize("op", ["xla", "xla_chunked"])
@pytest.mark.parametrize("causal", [True, False])
def test_tokamax_padding_at_both_ends_of_a_row_gives_no_nan(causal, op):
  segments = np.asarray(padding_segments(jnp.asarray(BOTH_ENDS)))
  # Each id one contiguous run (the form tokamax's key ranges express exactly) ...
  assert np.asarray(rows.segment_key_ranges(segments, segments)[2]).all()
  problem = Problem(2, 16, 16, 4, 2, 8, 8, parts=MaskParts(
      causal=causal, q_segment_ids=segments, kv_segment_ids=segments))
  out, grads = _run(tokamax_attention.attention, problem, implementation=op)
  assert np.isfinite(np.asarray(out)).all() and all(
      np.isfinite(np.asarray(grad)).all() for grad in grads if grad is not None)
  _assert_matches_oracle((out, grads), problem, f"padding at both ends ({op})")
  # ... and the real tokens see exactly the real tokens, as with one padding id.
  real = MaskParts(causal=causal, q_segment_ids=BOTH_ENDS.astype(np.int32),
                   kv_segment_ids=BOTH_ENDS.astype(np.int32))
  visible = numpy_visible(problem.parts, 2, 1, 16, 16)[:, 0]
  np.testing.assert_array_equal(visible[BOTH_ENDS], numpy_visible(real, 2, 1, 16, 16)[:, 0][BOTH_ENDS])


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
def test_tokamax_split_segments_give_nan_not_wrong_numbers():
  """Segment 0 split in two runs among the keys: its queries are NaN, every other query exact."""
  ids = _ids((0, 4), (1, 4), (0, 4), (2, 4))
  problem = Problem(1, 16, 16, 2, 2, 8, 8,
                    parts=MaskParts(q_segment_ids=ids, kv_segment_ids=ids))
  query, key, value, _, _ = _inputs(problem)
  attend = jax.jit(lambda query, key, value, mask: tokamax_attention.attention(
      query, key, value, mask=mask, bias=None, scale=8 ** -0.5, softcap=None, dropout_rate=0.0,
      dropout_rng=None, return_weights=False, implementation="xla"))
  out = np.asarray(attend(query, key, value, _mask(problem.parts)))
  split = ids[0] == 0
  assert np.all(np.isnan(out[0, split])) and not np.any(np.isnan(out[0, ~split]))
  expected, _ = _expected(problem)
  assert_close(out[0, ~split], expected[0, ~split], TOLERANCES["float32"]["out"], "unsplit rows")


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
def test_tokamax_unknown_op_names_the_choices():
  x = jnp.zeros((1, 4, 1, 8))
  with pytest.raises(ValueError, match=r"no attention op 'flash'.*'xla_chunked'"):
    tokamax_attention.attention(x, x, x, mask=None, bias=None, scale=1.0, softcap=None,
                                dropout_rate=0.0, dropout_rng=None, return_weights=False,
                                implementation="flash")


# ------------------------------------------------------------------------------------------------
# splash: the Pallas TPU kernel in interpret mode


def test_splash_block_plan_pads_keys_at_least_as_far_as_queries():
  assert splash.block_plan(256, 256) == (256, 256, 256, 256)
  assert splash.block_plan(4096, 4096) == (512, 512, 4096, 4096)
  # 200 queries -> 256; the 56 padding queries sit at key positions 256..311: keys padded to 384.
  assert splash.block_plan(200, 256) == (256, 384, 256, 384)
  for q_len, kv_len in [(1, 1), (100, 700), (513, 513), (130, 4000)]:
    block_q, block_kv, padded_q, padded_kv = splash.block_plan(q_len, kv_len)
    assert padded_q % block_q == 0 and padded_kv % block_kv == 0 and block_kv % splash.LANES == 0
    assert padded_kv - kv_len >= padded_q - q_len and padded_q >= q_len


def test_splash_kernels_are_cached():
  arguments = dict(mqa=True, heads=2, padded_q=256, padded_kv=256, offset=0, causal=True,
                   window=(64, 0), block_q=256, block_kv=256, softcap=None)
  assert splash.make_kernel(**arguments) is splash.make_kernel(**arguments)
  assert splash.make_kernel(**{**arguments, "offset": 1}) is not splash.make_kernel(**arguments)


SPLASH_PROBLEMS = {
    # Multi-head, head_dim 128, causal with segment ids that split segment 0 into two runs (splash
    # checks ids per element, so this is exact) and leave segment 3's queries without keys.
    "mha_causal_split_segments": Problem(
        1, 256, 256, 2, 2, 128, 128, parts=MaskParts(
            causal=True, q_segment_ids=_ids((0, 100), (1, 60), (0, 90), (3, 6)),
            kv_segment_ids=_ids((0, 100), (1, 60), (0, 90), (2, 6)))),
    # GQA (2 query heads per key head), head_dim 64, 200 queries after 256 keys (padded to blocks),
    # causal sliding window, softcap, both lengths.
    "gqa_window_softcap_lengths": Problem(
        1, 200, 256, 4, 2, 64, 64, parts=MaskParts(
            causal=True, window=(40, 0), q_lengths=np.array([180], np.int32),
            kv_lengths=np.array([230], np.int32)), softcap=20.0),
    # MQA in bfloat16, no mask at all (the full mask), lengths already whole blocks.
    "mqa_bfloat16_full": Problem(1, 128, 256, 2, 1, 128, 128, dtype="bfloat16"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SPLASH_PROBLEMS))
def test_splash_interpret_matches_oracle(name):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

  problem = SPLASH_PROBLEMS[name]
  with pltpu.force_tpu_interpret_mode():
    actual = _run(splash.attention, problem)
  _assert_matches_oracle(actual, problem, name)


# ------------------------------------------------------------------------------------------------
# benchmarks/gpu_attention.py: plumbing only (the figures need a GPU)


def test_gpu_benchmark_smoke(tmp_path):
  """Tiny run on this CPU: numbers for blockwise, a declined-with-reason row for cuDNN, and the
  RESULTS.md section replaced in place (text around it kept)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import pathlib  # pylint: disable=import-outside-toplevel

  script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_attention.py"
  spec = importlib.util.spec_from_file_location("gpu_attention_benchmark", script)
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)

  out = tmp_path / "RESULTS.md"
  out.write_text(f"# Results\n\nbefore\n\n{benchmark.SECTION_BEGIN}\nold\n{benchmark.SECTION_END}\n"
                 "\nafter\n")
  report = benchmark.main(["--lengths", "32", "--impls", "blockwise,cudnn", "--causal", "yes",
                           "--heads", "2", "--head-dim", "16", "--repeats", "1",
                           "--matmul-size", "64", "--out", str(out)])
  assert report["environment"]["device"] and report["environment"]["matmul_tflops"] > 0
  blockwise, declined = report["results"]
  assert blockwise["implementation"] == "blockwise" and blockwise["length"] == 32
  assert blockwise["forward"] > 0 and blockwise["forward_backward"] > 0
  assert "cudnn" in declined["error"] and "platform 'cpu'" in declined["error"]
  text = out.read_text()
  assert text.startswith("# Results\n\nbefore\n\n") and text.endswith("\nafter\n")
  assert "old" not in text and text.count(benchmark.SECTION_BEGIN) == 1
  assert f"Device: {report['environment']['device']}" in text
  assert "| blockwise | 32 | yes |" in text and "| cudnn | 32 | yes | ValueError" in text


# ------------------------------------------------------------------------------------------------
# Through the public API, as if on the accelerator (the dispatcher told the platform is gpu/tpu)


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
def test_gpu_dispatch_end_to_end_falls_back_through_tokamax_ops(monkeypatch):
  """On a 'gpu' call with segment ids the dispatcher picks tokamax; here its Mosaic and Triton ops
  decline (no GPU), so its default order ends at tokamax's chunked XLA op, which runs."""
  monkeypatch.setattr(api, "_platform", lambda: "gpu")
  ids = _ids((0, 5), (1, 7))
  problem = Problem(1, 12, 12, 2, 1, 8, 8, parts=MaskParts(causal=True, q_segment_ids=ids,
                                                           kv_segment_ids=ids), softcap=4.0)
  chosen = []
  monkeypatch.setitem(api._REGISTRY, "tokamax", dataclasses.replace(
      tokamax_attention.IMPLEMENTATION,
      fn=lambda *args, **kwargs: chosen.append("tokamax") or tokamax_attention.attention(
          *args, **kwargs)))

  def through_api(query, key, value, *, mask, bias, scale, softcap, **_):
    return dot_product_attention(query, key, value, mask=mask, bias=bias, scale=scale,
                                 softcap=softcap)

  _assert_matches_oracle(_run(through_api, problem), problem, "gpu dispatch")
  assert chosen == ["tokamax"]


@pytest.mark.slow
def test_tpu_dispatch_end_to_end_runs_splash(monkeypatch):
  """On a 'tpu' call the dispatcher picks splash; in interpret mode it matches the oracle."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

  monkeypatch.setattr(api, "_platform", lambda: "tpu")
  problem = Problem(1, 128, 128, 2, 1, 64, 64, parts=MaskParts(
      causal=True, kv_lengths=np.array([100], np.int32)), softcap=10.0)

  chosen = []
  monkeypatch.setitem(api._REGISTRY, "splash", dataclasses.replace(
      splash.IMPLEMENTATION,
      fn=lambda *args, **kwargs: chosen.append("splash") or splash.attention(*args, **kwargs)))

  def through_api(query, key, value, *, mask, bias, scale, softcap, **_):
    return dot_product_attention(query, key, value, mask=mask, bias=bias, scale=scale,
                                 softcap=softcap)

  with pltpu.force_tpu_interpret_mode():
    actual = _run(through_api, problem)
  _assert_matches_oracle(actual, problem, "tpu dispatch")
  assert chosen == ["splash"]


@pytest.mark.slow
def test_splash_under_a_mesh_runs_per_device():
  """Batch over 'data', heads over 'tensor' (Explicit axes): splash runs inside a shard_map, one
  (batch, kv head) slice per device, and matches the oracle; a length-sharded query is refused."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=import-outside-toplevel

  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  ids = np.concatenate([_ids((0, 60), (1, 68)), _ids((4, 128))])
  problem = Problem(2, 128, 128, 4, 2, 64, 64, parts=MaskParts(
      causal=True, q_segment_ids=ids, kv_segment_ids=ids, kv_lengths=np.array([128, 90], np.int32)))
  query, key, value, _, d_out = _inputs(problem)
  mask = _mask(problem.parts)

  def attend(query, key, value, mask):
    return splash.attention(query, key, value, mask=mask, bias=None, scale=64 ** -0.5, softcap=None,
                            dropout_rate=0.0, dropout_rng=None, return_weights=False)

  @jax.jit
  def forward_backward(query, key, value, mask, d_out):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), query, key, value)
    return out, vjp(d_out)

  per_head = jax.sharding.NamedSharding(mesh, P("data", None, "tensor", None))
  per_batch = jax.sharding.NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh), pltpu.force_tpu_interpret_mode():
    placed = [jax.device_put(x, per_head) for x in (query, key, value, d_out)]
    placed_mask = jax.tree.map(
        lambda x: jax.device_put(x, per_batch if x.ndim == 1 else jax.sharding.NamedSharding(
            mesh, P("data", None))), mask)
    assert "shard_map" in str(jax.make_jaxpr(attend)(*placed[:3], placed_mask))
    out, grads = forward_backward(*placed[:3], placed_mask, placed[3])
    assert out.sharding.spec == P("data", None, "tensor", None)
    by_length = jax.device_put(query, jax.sharding.NamedSharding(mesh, P(None, "data")))
    with pytest.raises(ValueError, match=r"splash' needs query unsharded along its length"):
      attend(by_length, by_length, by_length, Mask(causal=True))
  _assert_matches_oracle((out, (*grads, None)), problem, "sharded splash")


@pytest.mark.skipif(tokamax_attention.load_tokamax() is None, reason="tokamax is not installed")
def test_tokamax_under_a_mesh_runs_per_device():
  """Batch over 'data', heads over 'tensor' (Explicit axes), a per-head bias sharded along: the op
  runs inside a shard_map, and outputs and gradients (bias included) match the oracle."""
  P = jax.sharding.PartitionSpec  # pylint: disable=invalid-name
  mesh = jax.make_mesh((2, 2), ("data", "tensor"), devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  ids = np.concatenate([_ids((0, 7), (1, 9)), _ids((3, 16))])
  problem = Problem(2, 16, 16, 4, 2, 8, 8, parts=MaskParts(
      causal=True, q_segment_ids=ids, kv_segment_ids=ids, kv_lengths=np.array([16, 11], np.int32)),
      bias_shape=(1, 4, 16, 16))
  query, key, value, bias, d_out = _inputs(problem)

  def attend(query, key, value, bias, mask):
    return tokamax_attention.attention(query, key, value, mask=mask, bias=bias, scale=8 ** -0.5,
                                       softcap=None, dropout_rate=0.0, dropout_rng=None,
                                       return_weights=False, implementation="xla")

  @jax.jit
  def forward_backward(query, key, value, bias, mask, d_out):
    out, vjp = jax.vjp(lambda q, k, v, b: attend(q, k, v, b, mask), query, key, value, bias)
    return out, vjp(d_out)

  named = lambda *spec: jax.sharding.NamedSharding(mesh, P(*spec))
  with jax.set_mesh(mesh):
    query, key, value, d_out = (jax.device_put(x, named("data", None, "tensor", None))
                                for x in (query, key, value, d_out))
    bias = jax.device_put(bias, named(None, "tensor", None, None))
    mask = jax.tree.map(lambda x: jax.device_put(x, named("data", *(None,) * (x.ndim - 1))),
                        _mask(problem.parts))
    assert "shard_map" in str(jax.make_jaxpr(attend)(query, key, value, bias, mask))
    out, grads = forward_backward(query, key, value, bias, mask, d_out)
  assert out.sharding.spec == P("data", None, "tensor", None)
  _assert_matches_oracle((out, grads), problem, "sharded tokamax")
