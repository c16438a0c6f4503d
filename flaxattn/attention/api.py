"""The one public entry point, `dot_product_attention`, and the dispatcher over implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import (blockwise, cudnn, flex, reference, ring, splash,
                                tokamax_attention, xla)
from flaxattn.attention.mask import Mask, as_mask
from flaxattn.attention.placement import axes_of, call_layout
from flaxattn.attention.spec import Call, Implementation, check_operands, is_number

_REGISTRY: dict[str, Implementation] = {}

# Auto-selection order per platform: the first implementation that supports the call wins.
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "cpu": ("xla", "reference"),
    "gpu": ("xla", "reference"),
    "tpu": ("xla", "reference"),
}


def register(implementation: Implementation, *, prefer_on: dict[str, int] | None = None) -> None:
  """Adds an implementation; `prefer_on` maps platform -> position in that platform's auto order."""
  _REGISTRY[implementation.name] = implementation
  for platform, position in (prefer_on or {}).items():
    order = [name for name in _PREFERENCE.get(platform, ()) if name != implementation.name]
    order.insert(position, implementation.name)
    _PREFERENCE[platform] = tuple(order)


register(reference.IMPLEMENTATION)
register(xla.IMPLEMENTATION)
# CPU: blockwise measured faster than xla at every length from 128 tokens (benchmarks/tune_blockwise.py)
# and O(length) memory. GPU/TPU: after xla (untuned there), ahead of the O(length^2) reference for the
# calls xla cannot run (softcap).
register(blockwise.IMPLEMENTATION, prefer_on={"cpu": 0, "gpu": 1, "tpu": 1})
# Accelerator kernels, each registered for its own platform only (their declarations and
# `constraints` decline every other platform, so auto-selection never picks them elsewhere). GPU:
# cuDNN first for the calls it runs (fused, fastest where it applies), then tokamax for the rest
# (segment ids, softcap; declines itself when not installed). TPU: splash first.
register(cudnn.IMPLEMENTATION, prefer_on={"gpu": 0})
register(tokamax_attention.IMPLEMENTATION, prefer_on={"gpu": 1})
register(splash.IMPLEMENTATION, prefer_on={"tpu": 0})
# Only by name: it needs the sequence sharded over a mesh axis, a choice for the caller.
register(ring.IMPLEMENTATION)


def implementations(platform: str | None = None) -> tuple[str, ...]:
  """Names of the implementations, each one a valid `dot_product_attention(implementation=...)`.

  Args:
    platform: None for every registered implementation (registration order); `'cpu'`, `'gpu'` or
      `'tpu'` for those the dispatcher may pick there, in its auto order (first that supports the
      call wins). Implementations used only by name (ring attention) are in the first list only.

  What each one supports (masks, bias, dtypes, platforms...) is `describe_implementations()`.
  """
  if platform is None:
    return tuple(_REGISTRY)
  if platform not in _PREFERENCE:
    raise ValueError(f"platform must be None or one of {sorted(_PREFERENCE)}, got {platform!r}")
  return _PREFERENCE[platform]


def describe_implementations() -> list[dict]:
  """Each registered implementation's declaration: a dict with its `name` and what it supports.

  Keys: `name`, `masks` (mask kinds), `bias`, `softcap`, `dropout`, `weights` (bools), `dtypes`,
  `platforms`, `memory`, `notes`, `sequence_sharded` (needs the sequence split over a mesh axis),
  `equal_lengths` (needs q_len == kv_len) and `mods` (runs score_mod/mask_mod/block_mask).
  """
  return [impl.describe() for impl in _REGISTRY.values()]


def _platform() -> str:
  return jax.default_backend()


def _mesh_axes() -> frozenset[str]:
  """Axis names of the mesh set with `jax.set_mesh` (inside `jit` too); empty without one."""
  mesh = jax.sharding.get_abstract_mesh()
  return frozenset() if mesh.empty else frozenset(mesh.axis_names)


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def _validate(query, key, value, bias, mask: Mask | None, scale, softcap, dropout_rate, dropout_rng,
              block_mask=None):
  check_operands(query, key, value)
  batch, q_len, heads, _ = query.shape
  kv_len = key.shape[1]
  if bias is not None:
    if not jnp.issubdtype(bias.dtype, jnp.floating):
      raise ValueError(f"bias must be floating point, got dtype {bias.dtype}")
    shape = tuple(np.shape(bias))
    target = (batch, heads, q_len, kv_len)
    if len(shape) > 4 or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
      raise ValueError(
          f"bias of shape {shape} does not broadcast to [batch, heads, q_len, kv_len] = {target}")
  if mask is not None:
    mask.validate(batch, heads, q_len, kv_len)
  if block_mask is not None:
    flex._check_block_mask(block_mask, batch, heads, q_len, kv_len)
  if scale is not None and not is_number(scale):
    raise ValueError(f"scale must be a Python number, got {scale!r}")
  if softcap is not None and not (is_number(softcap) and softcap > 0):
    raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
  if not (is_number(dropout_rate) and 0.0 <= dropout_rate < 1.0):
    raise ValueError(f"dropout_rate must be a number in [0, 1), got {dropout_rate!r}")
  if dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng")


def dot_product_attention(query, key, value, *, mask=None, bias=None, scale=None, softcap=None,
                          dropout_rate=0.0, dropout_rng=None, implementation=None,
                          return_weights=False, score_mod=None, mask_mod=None, block_mask=None):
  """Scaled dot-product attention over interchangeable implementations.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]`; `heads % kv_heads == 0` (GQA/MQA: query head `h`
      reads key/value head `h // (heads // kv_heads)`).
    value: `[batch, kv_len, kv_heads, value_dim]`.
    mask: a `flaxattn.attention.Mask` (causal, window, segment ids, lengths, explicit array), a boolean
      array broadcastable to `[batch, heads, q_len, kv_len]`, or None.
    bias: added to the logits; broadcastable to `[batch, heads, q_len, kv_len]`. Differentiable.
    scale: logit scale; default `head_dim ** -0.5`.
    softcap: if set, logits become `softcap * tanh(logits / softcap)` (before score_mod, bias and
      mask).
    dropout_rate: dropout on the attention weights (needs `dropout_rng`).
    implementation: a name from `implementations()`, or None to pick the fastest that supports the call
      on this platform. A named implementation that cannot run the call raises `ValueError`.
    return_weights: also return the weights `[batch, heads, q_len, kv_len]` (float32, before dropout).
    score_mod: `flex_attention`'s `(score, batch, head, q_idx, kv_idx) -> score` (indices as flex
      counts them, from 0 for queries and keys alike), applied after `softcap`, before `bias`.
      Only implementations that declare `mods` run mods (blockwise, tiled; reference, dense); the
      others decline the call.
    mask_mod: `flex_attention`'s `(batch, head, q_idx, kv_idx) -> bool`, and-ed with `mask`.
    block_mask: from `create_block_mask` (of `mask_mod`, which it supplies when `mask_mod` is None).

  Returns:
    `[batch, q_len, heads, value_dim]` in the query dtype (and the weights if asked). A query that sees
    no key gets zeros and passes zero gradient.
  """
  query, key, value = jnp.asarray(query), jnp.asarray(key), jnp.asarray(value)
  mask = as_mask(mask)
  if bias is not None:
    bias = jnp.asarray(bias)
  _validate(query, key, value, bias, mask, scale, softcap, dropout_rate, dropout_rng, block_mask)
  if bias is not None:
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
  if mask is not None and not mask.kinds:
    mask = None
  mods = None
  if (score_mod, mask_mod, block_mask) != (None, None, None):
    mods = flex.FlexMods(score_mod=score_mod, mask_mod=mask_mod, block_mask=block_mask)
  scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
  impl = _select(implementation, _call(query, key, value, mask, bias is not None,
                                       softcap is not None, dropout_rate > 0.0,
                                       bool(return_weights), mods is not None))
  return impl.fn(query, key, value, mask=mask, bias=bias, scale=scale,
                 softcap=None if softcap is None else float(softcap),
                 dropout_rate=float(dropout_rate), dropout_rng=dropout_rng,
                 return_weights=bool(return_weights), **({} if mods is None else {"mods": mods}))


def _call(query, key, value, mask: Mask | None, bias: bool, softcap: bool, dropout: bool,
          weights: bool, mods: bool) -> Call:
  """The features of a validated call, for `_select`."""
  return Call(
      masks=frozenset() if mask is None else mask.kinds,
      bias=bias, softcap=softcap, dropout=dropout, weights=weights, mods=mods,
      dtype=_dtype_name(query.dtype),
      platform=_platform(),
      q_len=query.shape[1],
      kv_len=key.shape[1],
      heads=query.shape[2],
      kv_heads=key.shape[2],
      head_dim=query.shape[3],
      value_dim=value.shape[3],
      mesh_axes=_mesh_axes(),
      sequence_axes=axes_of(call_layout(query)[1]),
  )


def fused_choice(query, key, value, *, mask: Mask | None, softcap: float | None) -> str | None:
  """The implementation auto-selection gives this mask/softcap call when it is a fused O(length)
  kernel that runs no mods itself (cuDNN, splash, tokamax), else None (blockwise, which runs
  `flex_attention`'s tiles itself, or a dense one). `flex_attention` hands such calls to it."""
  call = _call(query, key, value, mask, False, softcap is not None, False, False, False)
  try:
    impl = _select(None, call)
  except ValueError:
    return None
  return impl.name if impl.memory == "O(length)" and not impl.mods else None


def _select(implementation: str | None, call: Call) -> Implementation:
  if implementation is not None:
    if implementation not in _REGISTRY:
      raise ValueError(
          f"implementation={implementation!r} is unknown; choose from {sorted(_REGISTRY)}")
    impl = _REGISTRY[implementation]
    missing = impl.unsupported(call)
    if missing:
      raise ValueError(f"implementation={implementation!r} does not support {missing}")
    return impl
  reasons = []
  for name in _PREFERENCE.get(call.platform, tuple(_REGISTRY)):
    missing = _REGISTRY[name].unsupported(call)
    if missing is None:
      return _REGISTRY[name]
    reasons.append(f"{name}: {missing}")
  raise ValueError(f"no attention implementation supports this call: {'; '.join(reasons)}")
