"""tokamax attention kernels (Pallas Mosaic-GPU / Triton flash attention), GPU only; optional extra.

`pip install 'flaxattn[gpu]'` installs tokamax (0.0.12 on Python 3.11, 0.0.17 on 3.12+). flaxattn
imports it lazily: without it, this implementation declines every call ("tokamax is not installed")
and the rest of flaxattn works unchanged.

The mask goes to tokamax as one key range `[k_start, k_end)` per query, the form its flash kernels
use to skip key blocks. Causal and window masks (end-aligned), key lengths and query lengths are
ranges by nature. Segment ids become the range of the query's segment, which is exact when each
segment id forms one contiguous run of keys (packed sequences); a query whose segment is split into
several runs gets NaN outputs rather than a silently wrong mix (`rows.segment_key_ranges`). An
explicit boolean array is passed along as tokamax's dense mask. tokamax applies the soft-cap after
adding the bias while flaxattn caps before, so the two together are declined.

tokamax's public `dot_product_attention` takes neither key ranges nor segment ids, so this calls the
op objects in `tokamax._src.ops.attention.api.IMPLEMENTATIONS` with a `base.Mask`: the same entry
the public function uses, with the same names and arguments in 0.0.12 and 0.0.17 (checked); the
import is guarded so a tokamax that moved them is reported as unsupported, not crashed on.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import jax.numpy as jnp

from flaxattn.attention import placement, rows
from flaxattn.attention.mask import Mask
from flaxattn.attention.spec import Call, Implementation

# tokamax op names tried in order on a GPU: the first op that accepts the call runs. tokamax's own
# default ends with its dense "xla" op; "xla_chunked" keeps the declared O(length) memory for the
# shapes both flash kernels decline.
GPU_ORDER = ("mosaic_gpu", "triton", "xla_chunked")


@functools.lru_cache(maxsize=None)
def load_tokamax() -> SimpleNamespace | None:
  """tokamax's attention ops and mask class, or None when tokamax (or that API) is missing."""
  try:
    import tokamax  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from tokamax._src.ops.attention import api as tokamax_api  # pylint: disable=import-outside-toplevel
    from tokamax._src.ops.attention import base as tokamax_base  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not hasattr(tokamax_api, "IMPLEMENTATIONS") or not hasattr(tokamax_base, "Mask"):
    return None
  return SimpleNamespace(ops=tokamax_api.IMPLEMENTATIONS, Mask=tokamax_base.Mask,
                         version=getattr(tokamax, "__version__", "unknown"))


def _absl_flags_parsed() -> None:
  """Marks absl flags parsed (with their defaults) unless the program already parsed them.

  tokamax reads its options from absl flags and, finding them unparsed, parses `sys.argv` itself:
  that fails in any program whose command line is not absl's (pytest, notebooks, argparse scripts).
  Programs run with `absl.app.run` (flaxattn.main) have parsed them already and keep their values.
  """
  from absl import flags  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _constraints(call: Call) -> str | None:
  if load_tokamax() is None:
    return "this machine: tokamax is not installed (pip install 'flaxattn[gpu]')"
  if call.softcap and call.bias:
    return "softcap together with bias (tokamax caps after adding the bias, flaxattn before)"
  return None


def tokamax_mask(mask: Mask | None, batch: int, q_len: int, kv_len: int):
  """The flaxattn mask as tokamax key ranges.

  Returns:
    `(k_start, k_end, bool_mask, sees_any, exact)`: `k_start`/`k_end` `[batch, 1, q_len]` int32 key
    ranges (a query that sees nothing is given key 0 so no kernel meets an empty row; its output is
    zeroed afterwards); `bool_mask` the explicit array as rank 4, or None; `sees_any`
    `[batch, heads|1, q_len]` bool; `exact` `[batch, q_len]` bool, False where a split segment made
    the range wider than the segment.
  """
  mask = mask if mask is not None else Mask()
  start, end = rows.key_ranges(mask, batch, q_len, kv_len)
  exact = jnp.ones((batch, q_len), bool)
  if mask.q_segment_ids is not None:
    segment_start, segment_end, exact = rows.segment_key_ranges(mask.q_segment_ids,
                                                                mask.kv_segment_ids)
    start, end = jnp.maximum(start, segment_start), jnp.minimum(end, segment_end)
  sees_any = (start < end)[:, None, :]
  bool_mask = None
  if mask.array is not None:
    bool_mask = jnp.asarray(mask.array)
    bool_mask = bool_mask.reshape((1,) * (4 - bool_mask.ndim) + bool_mask.shape)
    sees_any = sees_any & jnp.any(bool_mask, axis=-1)
  sees_in_range = start < end
  start = jnp.where(sees_in_range, start, 0)[:, None, :]
  end = jnp.where(sees_in_range, end, 1)[:, None, :]
  return start, end, bool_mask, sees_any, exact


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool, implementation: str | tuple[str, ...] | None = None):
  """Arguments as `flaxattn.attention.dot_product_attention`, already validated.

  `implementation`: a tokamax op name ('mosaic_gpu', 'triton', 'cudnn', 'xla', 'xla_chunked') or
  names tried in order; None means `GPU_ORDER`. On a CPU only 'xla' and 'xla_chunked' run (the
  tests use them to check this wrapper). Under a multi-device mesh the op runs per device inside
  `jax.shard_map` (`placement.run_per_device`): batch and heads may be sharded, lengths may not.
  """
  del dropout_rate, dropout_rng, return_weights  # Declined: the dispatcher never passes them.
  loaded = load_tokamax()
  if loaded is None:
    raise ValueError("implementation='tokamax' needs tokamax: pip install 'flaxattn[gpu]'")
  _absl_flags_parsed()
  if implementation is None:
    # A kernel whose own import failed (e.g. Mosaic GPU on an older jaxlib) is absent from the ops.
    names = tuple(name for name in GPU_ORDER if name in loaded.ops)
  else:
    names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  unknown = [name for name in names if name not in loaded.ops]
  if unknown:
    raise ValueError(f"tokamax {loaded.version} has no attention op {unknown[0]!r}; it has "
                     f"{sorted(loaded.ops)}")
  run = functools.partial(_attention_on_device, scale=scale, softcap=softcap, names=names,
                          loaded=loaded)
  return placement.run_per_device(run, query, key, value, mask if mask is not None else Mask(),
                                  bias, name="tokamax")


def _attention_on_device(query, key, value, mask: Mask, bias, *, scale: float, softcap,
                         names: tuple[str, ...], loaded: SimpleNamespace):
  """`attention` on one device's (or the whole) arrays, with the op names resolved."""
  batch, q_len = query.shape[:2]
  kv_len = key.shape[1]
  k_start, k_end, bool_mask, sees_any, exact = tokamax_mask(mask, batch, q_len, kv_len)
  errors = []
  for name in names:
    try:
      out = loaded.ops[name](
          query, key, value, bias=bias, logits_scale=scale, logits_soft_cap=softcap,
          mask=loaded.Mask(bool_mask, k_start=k_start, k_end=k_end))
      break
    except NotImplementedError as error:
      errors.append(f"{name}: {error}")
  else:
    raise ValueError(f"no tokamax op ran this call: {'; '.join(errors)}")
  # Zero (and cut the gradient of) queries that see nothing; NaN where a split segment was widened.
  out = rows.zero_rows_without_keys(out, sees_any)
  return jnp.where(exact[:, :, None, None], out, jnp.full((), jnp.nan, out.dtype))


IMPLEMENTATION = Implementation(
    name="tokamax",
    fn=attention,
    masks=frozenset({"causal", "window", "segment_ids", "lengths", "array"}),
    bias=True,
    softcap=True,
    dropout=False,
    weights=False,
    dtypes=frozenset({"float32", "bfloat16", "float16"}),
    platforms=frozenset({"gpu"}),
    memory="O(length)",
    notes=("tokamax flash attention (Mosaic GPU, then Triton); optional extra 'gpu'. Segment ids must "
           "be contiguous runs (split segments give NaN); softcap and bias not together."),
    constraints=_constraints,
)
