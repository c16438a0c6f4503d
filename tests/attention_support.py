"""Shared by the attention tests: an independent float64 NumPy oracle and capability look-ups.

The oracle re-derives everything from the contract in `flaxattn/attention/api.py` and `mask.py`
(positions aligned at the end, segment ids, lengths, window, explicit array, bias, softcap, GQA) and
writes the backward pass out by hand, so it shares no code with the implementations it checks.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.extend import core as jax_core

from flaxattn.attention import describe_implementations


def assert_close(actual, expected, tolerance: float, what: str = "") -> None:
  """Finite, and within `tolerance` relative to each element plus `tolerance` times the tensor's
  scale: its largest magnitude, or 1 (the scale of the standard-normal test inputs) if larger.

  The floor matters for tensors that are exactly zero in exact arithmetic but not in floating point,
  e.g. the query gradient of a query that sees a single key (its softmax is constant).
  """
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
  scale = max(1.0, np.abs(expected).max(initial=0.0))
  np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * scale, err_msg=what)


def supporting(*, masks=(), bias=False, softcap=False, dropout=False, weights=False,
               dtype="float32") -> list[str]:
  """Names of the registered implementations whose declaration covers these features here.

  Read from `describe_implementations()`, so an implementation merged later is tested without naming it.
  Implementations that run only inside a mesh (`sequence_sharded`, e.g. ring attention) are left out: these
  shared tests call without one; each has its own tests on a mesh (tests/test_attention_ring.py).
  """
  names = []
  for described in describe_implementations():
    if described.get("sequence_sharded"):
      continue
    if jax.default_backend() not in described["platforms"] or dtype not in described["dtypes"]:
      continue
    if not set(masks) <= set(described["masks"]):
      continue
    wanted = dict(bias=bias, softcap=softcap, dropout=dropout, weights=weights)
    if all(described[feature] for feature, needed in wanted.items() if needed):
      names.append(described["name"])
  return names


@dataclasses.dataclass(frozen=True)
class MaskParts:
  """The raw ingredients of a `Mask`, as NumPy arrays, so the oracle can build its own mask.

  `window` and `causal` as in `Mask`; arrays are `[batch, q_len]`, `[batch, kv_len]`, `[batch]` ints
  and a boolean array broadcastable to `[batch, heads, q_len, kv_len]`, or None.
  """

  causal: bool = False
  window: tuple | None = None
  q_segment_ids: np.ndarray | None = None
  kv_segment_ids: np.ndarray | None = None
  q_lengths: np.ndarray | None = None
  kv_lengths: np.ndarray | None = None
  array: np.ndarray | None = None

  @property
  def kinds(self) -> tuple[str, ...]:
    present = [("causal", self.causal),
               ("window", self.window is not None and tuple(self.window) != (None, None)),
               ("segment_ids", self.q_segment_ids is not None),
               ("lengths", self.q_lengths is not None or self.kv_lengths is not None),
               ("array", self.array is not None)]
    return tuple(kind for kind, on in present if on)


def numpy_visible(parts: MaskParts, batch: int, heads: int, q_len: int, kv_len: int) -> np.ndarray:
  """`[batch, heads, q_len, kv_len]` bool: which keys each query sees, by the documented rules."""
  visible = np.ones((batch, heads, q_len, kv_len), bool)
  # The last query lines up with the last key: query i sits at key position i + kv_len - q_len.
  query_position = np.arange(q_len)[:, None] + (kv_len - q_len)
  key_position = np.arange(kv_len)[None, :]
  if parts.causal:
    visible &= key_position <= query_position
  if parts.window is not None:
    left, right = parts.window
    if left is not None:
      visible &= key_position >= query_position - left
    if right is not None:
      visible &= key_position <= query_position + right
  if parts.q_segment_ids is not None:
    kv_segments = parts.q_segment_ids if parts.kv_segment_ids is None else parts.kv_segment_ids
    same = parts.q_segment_ids[:, :, None] == kv_segments[:, None, :]
    visible &= same[:, None]
  if parts.q_lengths is not None:
    visible &= (np.arange(q_len)[None, :] < parts.q_lengths[:, None])[:, None, :, None]
  if parts.kv_lengths is not None:
    visible &= (np.arange(kv_len)[None, :] < parts.kv_lengths[:, None])[:, None, None, :]
  if parts.array is not None:
    visible &= np.broadcast_to(parts.array, visible.shape)
  return visible


def _sum_to_shape(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Sums a broadcast result back to the operand's `shape` (the adjoint of broadcasting)."""
  x = x.sum(axis=tuple(range(x.ndim - len(shape))))
  return x.sum(axis=tuple(i for i, size in enumerate(shape) if size == 1), keepdims=True)


def numpy_attention(query, key, value, *, visible, bias=None, scale=None, softcap=None,
                    d_out=None):
  """Float64 attention forward and, given `d_out`, its hand-written backward.

  Args:
    query: `[batch, q_len, heads, head_dim]`; key `[batch, kv_len, kv_heads, head_dim]`; value
      `[batch, kv_len, kv_heads, value_dim]`; any float dtype, computed in float64.
    visible: `[batch, heads, q_len, kv_len]` bool.
    bias: broadcastable to `[batch, heads, q_len, kv_len]`, or None.
    d_out: cotangent of the output, `[batch, q_len, heads, value_dim]`, or None for forward only.

  Returns:
    dict with `out` `[batch, q_len, heads, value_dim]` and `weights` `[batch, heads, q_len, kv_len]`;
    with `d_out` also `query`, `key`, `value` and `bias` gradients, shaped like those inputs.
  """
  query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
  heads, kv_heads = query.shape[2], key.shape[2]
  group = heads // kv_heads
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  # Query head h reads key/value head h // group.
  key_per_head = np.repeat(key, group, axis=2)
  value_per_head = np.repeat(value, group, axis=2)

  scores = np.einsum("bthd,bshd->bhts", query, key_per_head) * scale
  capped = scores if softcap is None else softcap * np.tanh(scores / softcap)
  logits = capped if bias is None else capped + np.asarray(bias, np.float64)
  logits = np.where(visible, logits, -np.inf)
  row_max = logits.max(axis=-1, keepdims=True)
  row_max = np.where(np.isfinite(row_max), row_max, 0.0)
  unnormalized = np.where(visible, np.exp(logits - row_max), 0.0)
  total = unnormalized.sum(axis=-1, keepdims=True)
  weights = unnormalized / np.where(total == 0.0, 1.0, total)
  out = np.einsum("bhts,bshe->bthe", weights, value_per_head)
  result = dict(out=out, weights=weights)
  if d_out is None:
    return result

  d_out = np.asarray(d_out, np.float64)
  batch, kv_len = key.shape[0], key.shape[1]
  d_value = np.einsum("bhts,bthe->bshe", weights, d_out)
  d_weights = np.einsum("bthe,bshe->bhts", d_out, value_per_head)
  # Softmax backward: dL = P * (dP - sum_j dP_j P_j); zero wherever P is zero (masked keys, empty rows).
  d_logits = weights * (d_weights - (d_weights * weights).sum(axis=-1, keepdims=True))
  d_scores = d_logits if softcap is None else d_logits * (1.0 - np.tanh(scores / softcap) ** 2)
  d_scores = d_scores * scale
  d_query = np.einsum("bhts,bshd->bthd", d_scores, key_per_head)
  d_key = np.einsum("bhts,bthd->bshd", d_scores, query)

  def per_kv_head(x):  # The query heads of one group all read the same key/value head: add them.
    return x.reshape(batch, kv_len, kv_heads, group, x.shape[-1]).sum(axis=3)

  result.update(query=d_query, key=per_kv_head(d_key), value=per_kv_head(d_value))
  result["bias"] = None if bias is None else _sum_to_shape(d_logits, np.shape(bias))
  return result


def largest_intermediate(jaxpr) -> tuple[int, int]:
  """`(largest outvar size, sub-jaxprs visited)` over `jaxpr` and every jaxpr nested in its eqns
  (a memory check on the traced program, without running or timing it)."""
  largest, nested = 0, 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, int(np.prod(getattr(var.aval, "shape", ()))))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # A ClosedJaxpr holds its Jaxpr.
        if isinstance(sub, jax_core.Jaxpr):
          size, count = largest_intermediate(sub)
          largest, nested = max(largest, size), nested + count + 1
  return largest, nested
