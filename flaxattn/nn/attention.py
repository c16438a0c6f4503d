"""`MultiHeadAttention` over `flaxattn.attention.dot_product_attention`, and its `KVCache`.

Argument names for people coming from Keras and PyTorch:

| Keras `MultiHeadAttention`        | PyTorch `nn.MultiheadAttention`   | flaxattn                                   |
|-----------------------------------|-----------------------------------|--------------------------------------------|
| `num_heads`                       | `num_heads`                       | `num_heads` (`kv_heads` for GQA/MQA)       |
| `key_dim`                         | `embed_dim // num_heads`          | `head_dim`                                 |
| `value_dim`                       | (= `head_dim`)                    | `value_dim`                                |
| (input's last dim)                | `embed_dim`                       | `in_features`                              |
| (key/value input's last dim)      | `kdim`, `vdim` (must be equal)    | `kv_features`                              |
| `output_shape`                    | (= `embed_dim`)                   | `out_features`                             |
| `dropout`                         | `dropout`                         | `attention_dropout_rate` (+ `deterministic=False`) |
| `use_bias`                        | `bias`                            | `use_bias`                                 |
| `attention_mask` `[B, T, S]`, True = attend | `attn_mask` `[T, S]`, True = *blocked*; float = added | `mask=Mask(array=...)` (True = attend) or `bias=` |
| `use_causal_mask=True`            | `is_causal=True` (with `attn_mask`) | `mask=Mask(causal=True)`                 |
| (from Keras masking)              | `key_padding_mask` `[B, S]`, True = padding | `mask=Mask(kv_lengths=...)` or `Mask(array=~key_padding_mask[:, None, None, :])` |
| `return_attention_scores=True`    | `need_weights=True, average_attn_weights=False` | `capture_attention_weights(module, x)` (`[B, heads, T, S]`) |
| `query, value, key`               | `query, key, value` (`key is value` for self/cross) | `x, context` (`context=None`: self-attention) |
| (always batch first)              | `batch_first=True`                | always batch first `[batch, length, features]` |

`from_keras_args` and `from_torch_args` build the module from those argument names;
`mask_from_keras` and `mask_from_torch` turn those libraries' call-time masks into `mask=`/`bias=`.

KV cache. For incremental decoding, `cache=KVCache.create(...)` (or the models' `init_cache`) is passed
in and the updated cache returned: a plain pytree, so the decoding loop can be a `jax.jit` over split
state. Slots are written in order (one shared write index); each slot records its token's position, -1
for empty slots and padding. A query at position `p` sees exactly the written keys with position
`0 <= position <= p` (and `> p - window` with a sliding window), so padding anywhere (left-padded
prompts, or right-padded prompts followed by generated tokens) is excluded and each row's positions
stay its own. The kernelized kinds ('linear', 'performer') keep a constant-size `RecurrentState`
instead, passed the same way.

Cross-attention cache. The keys/values of a fixed context (an encoder's output) are the same at every
decoding step: `cache=ContextCache` projects them once (from `context`, when the cache is empty) and
later calls reuse them, projecting only the new queries.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import flaxattn.attention
from flaxattn.attention import (BlockMask, Mask, and_masks, create_block_mask,
                                dot_product_attention, flex_attention, linear)
from flaxattn.attention.linear import RecurrentState
from flaxattn.attention.mask import as_mask
from flaxattn.attention.placement import activation_layout
from flaxattn.attention.probes import attention_rows, mask_to_mask_mod
from flaxattn.nn.hooks import hook, hook_pattern
from flaxattn.nn.layers import Dense, RMSNorm
from flaxattn.nn.probing import AttentionProbe
from flaxattn.nn.positions import PositionBias, apply_rope, capped
from flaxattn.nn.sharding import active_spec, constrain, param

ATTENTION_POSITIONS = ("none", "rope", "alibi")
ATTENTION_KINDS = ("softmax", "linear", "performer")
# `attention_impl` values under which position biases and sinks run as flex_attention mods.
FLEX_IMPLEMENTATIONS = (None, "blockwise")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of the tokens seen so far by one self-attention layer.

  Attributes:
    key: `[batch, max_length, kv_heads, head_dim]`.
    value: `[batch, max_length, kv_heads, value_dim]`.
    positions: int32 `[batch, max_length]`, the position of the token in each slot; -1 = empty/padding.
    index: int32 scalar, the next slot to write (the same for every row).
  """

  key: jax.Array
  value: jax.Array
  positions: jax.Array
  index: jax.Array

  @classmethod
  def create(cls, batch: int, max_length: int, kv_heads: int, head_dim: int,
             value_dim: int | None = None, dtype: Any = jnp.float32) -> "KVCache":
    """An empty cache (every position -1, index 0)."""
    value_dim = head_dim if value_dim is None else value_dim
    return cls(
        key=jnp.zeros((batch, max_length, kv_heads, head_dim), dtype),
        value=jnp.zeros((batch, max_length, kv_heads, value_dim), dtype),
        positions=jnp.full((batch, max_length), -1, jnp.int32),
        index=jnp.zeros((), jnp.int32),
    )

  def update(self, key: jax.Array, value: jax.Array, positions: jax.Array) -> "KVCache":
    """Writes `key`/`value` `[batch, new, kv_heads, dim]` with `positions` `[batch, new]` at `index`.

    More new tokens than slots raise ValueError; writing past `max_length` over several calls is not
    detected inside `jit` (the write index is traced, the write would be clamped): size the cache
    for prompt plus generated tokens.
    """
    if key.shape[1] > self.key.shape[1]:
      raise ValueError(
          f"{key.shape[1]} new tokens do not fit a cache of max_length={self.key.shape[1]}")
    start = (0, self.index, 0, 0)
    return KVCache(
        key=jax.lax.dynamic_update_slice(self.key, key.astype(self.key.dtype), start),
        value=jax.lax.dynamic_update_slice(self.value, value.astype(self.value.dtype), start),
        positions=self.positions_after(positions),
        index=self.index + key.shape[1],
    )

  def positions_after(self, positions: jax.Array) -> jax.Array:
    """The slot positions `[batch, max_length]` once tokens at `positions` `[batch, new]` are written."""
    return jax.lax.dynamic_update_slice(self.positions, positions.astype(jnp.int32), (0, self.index))

  def visible(self, q_positions: jax.Array, window: int | None = None) -> jax.Array:
    """Which slots queries at `q_positions` `[batch, q_len]` see: bool `[batch, 1, q_len, max_length]`.

    With `window`, only the last `window` positions up to the query's own (itself included).
    """
    slot, query = self.positions[:, None, :], q_positions[:, :, None]
    visible = (slot >= 0) & (slot <= query)
    if window is not None:
      visible &= slot > query - window
    return visible[:, None]

  def mask_mod(self, q_positions: jax.Array, window: int | None = None):
    """`visible` as a `flex_attention` mask_mod `(batch, head, q_idx, kv_idx) -> bool` that
    captures the slot and query positions (O(length), no `[q_len, max_length]` array)."""
    slots = self.positions

    def mask_mod(b, h, q_idx, kv_idx):
      slot, query = slots[b, kv_idx], q_positions[b, q_idx]
      seen = (slot >= 0) & (slot <= query)
      return seen if window is None else seen & (slot > query - window)

    return mask_mod

  def next_positions(self) -> jax.Array:
    """int32 `[batch]`: the position the next real token of each row takes (tokens seen so far)."""
    return jnp.max(self.positions, axis=1) + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ContextCache:
  """The projected keys and values of a cross-attention layer's context.

  Attributes:
    key: `[batch, context_len, kv_heads, head_dim]`; `context_len` is 0 until filled.
    value: `[batch, context_len, kv_heads, value_dim]`.
  """

  key: jax.Array
  value: jax.Array

  @classmethod
  def create(cls, batch: int, kv_heads: int, head_dim: int, value_dim: int | None = None,
             dtype: Any = jnp.float32) -> "ContextCache":
    """An empty cache (context length 0), filled by the first call that is given the context."""
    value_dim = head_dim if value_dim is None else value_dim
    return cls(key=jnp.zeros((batch, 0, kv_heads, head_dim), dtype),
               value=jnp.zeros((batch, 0, kv_heads, value_dim), dtype))

  @property
  def filled(self) -> bool:
    """Whether the keys/values are there (static: decided by the shape, so usable under `jit`)."""
    return self.key.shape[1] > 0


def mask_from_keras(attention_mask: jax.Array | None = None,
                    use_causal_mask: bool = False) -> Mask | None:
  """Keras' `attention_mask` (bool `[batch, q_len, kv_len]`, True = attend) and `use_causal_mask` as
  the `mask=` argument."""
  if attention_mask is not None and jnp.ndim(attention_mask) != 3:
    raise ValueError(
        f"attention_mask must be [batch, q_len, kv_len], got shape {jnp.shape(attention_mask)}")
  array = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None]
  if array is None and not use_causal_mask:
    return None
  return Mask(causal=bool(use_causal_mask), array=array)


def mask_from_torch(key_padding_mask: jax.Array | None = None, attn_mask: jax.Array | None = None,
                    is_causal: bool = False) -> tuple[Mask | None, jax.Array | None]:
  """PyTorch's masks as `(mask, bias)` for `MultiHeadAttention`.

  `key_padding_mask` `[batch, kv_len]` and `attn_mask` `[q_len, kv_len]` or
  `[batch * heads, q_len, kv_len]`: boolean True = *not* attended, or float values added to the
  logits. `is_causal=True` adds the causal mask (PyTorch uses it only as a hint next to `attn_mask`).
  """
  parts, bias = [], None
  if key_padding_mask is not None:
    key_padding_mask = jnp.asarray(key_padding_mask)
    if key_padding_mask.ndim != 2:
      raise ValueError(
          f"key_padding_mask must be [batch, kv_len], got shape {key_padding_mask.shape}")
    if key_padding_mask.dtype == jnp.bool_:
      parts.append(~key_padding_mask[:, None, None, :])
    else:
      bias = key_padding_mask[:, None, None, :].astype(jnp.float32)
  if attn_mask is not None:
    attn_mask = jnp.asarray(attn_mask)
    if attn_mask.ndim not in (2, 3):
      raise ValueError(
          f"attn_mask must be [q_len, kv_len] or [batch * heads, q_len, kv_len], got shape "
          f"{attn_mask.shape}")
    if attn_mask.ndim == 3:
      if key_padding_mask is None:
        raise ValueError("a 3-d attn_mask needs key_padding_mask to tell the batch size")
      attn_mask = attn_mask.reshape((key_padding_mask.shape[0], -1) + attn_mask.shape[1:])
    if attn_mask.dtype == jnp.bool_:
      parts.append(~attn_mask)
    else:
      added = attn_mask.astype(jnp.float32)
      bias = added if bias is None else bias + added
  array = None
  for part in parts:
    array = part if array is None else jnp.logical_and(array, part)
  mask = Mask(causal=bool(is_causal), array=array) if (array is not None or is_causal) else None
  return mask, bias


def check_attention_knobs(owner: str, *, width: tuple[str, int], num_heads: int,
                          kv_heads: int | None, head_dim: int | None, rotary_dim: int | None,
                          positions: str, attention_dropout_rate: float, softcap: float | None,
                          attention_impl: str | None, attention_kind: str, window: int | None,
                          performer_features: int, performer_seed: int,
                          linear_chunk_size: int, attention_sinks: bool = False) -> None:
  """The rules of the attention knobs, for `MultiHeadAttention` and `TransformerConfig` alike.

  `owner` prefixes the knob names in the messages ('TransformerConfig.' or ''); `width` is the
  name and value of the input width (`in_features` / `d_model`); `kv_heads`/`head_dim` None mean
  their defaults (`num_heads`, width // num_heads); `positions` may be any of the config's kinds.
  """
  def positive(name, value, optional=False):
    if optional and value is None:
      return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{owner}{name} must be a positive int{' or None' if optional else ''}, "
                       f"got {value!r}")

  positive("num_heads", num_heads)
  for name, value in (("kv_heads", kv_heads), ("head_dim", head_dim), ("window", window),
                      ("rotary_dim", rotary_dim)):
    positive(name, value, optional=True)
  positive("performer_features", performer_features)
  positive("linear_chunk_size", linear_chunk_size)
  if num_heads % (num_heads if kv_heads is None else kv_heads):
    raise ValueError(
        f"{owner}num_heads ({num_heads}) must be a multiple of kv_heads ({kv_heads})")
  if head_dim is None and width[1] % num_heads:
    raise ValueError(f"{owner}{width[0]} ({width[1]}) must be divisible by num_heads ({num_heads}) "
                     "when head_dim is None")
  features = width[1] // num_heads if head_dim is None else head_dim
  if positions == "rope" and rotary_dim is not None and (rotary_dim % 2 or rotary_dim > features):
    raise ValueError(f"{owner}rotary_dim must be even and at most head_dim={features}, got "
                     f"{rotary_dim!r}")
  if not 0.0 <= attention_dropout_rate < 1.0:
    raise ValueError(f"{owner}attention_dropout_rate must be in [0, 1), got "
                     f"{attention_dropout_rate!r}")
  if softcap is not None and not softcap > 0:
    raise ValueError(f"{owner}softcap must be positive or None, got {softcap!r}")
  # Read at call time (not bound at import), so implementations registered later count too.
  names = list(flaxattn.attention.implementations())
  if attention_impl is not None and attention_impl not in names:
    raise ValueError(
        f"{owner}attention_impl must be None or one of {names}, got {attention_impl!r}")
  if attention_kind not in ATTENTION_KINDS:
    raise ValueError(f"{owner}attention_kind must be one of {ATTENTION_KINDS}, got "
                     f"{attention_kind!r}")
  if isinstance(performer_seed, bool) or not isinstance(performer_seed, int):
    raise ValueError(f"{owner}performer_seed must be an int, got {performer_seed!r}")
  if not isinstance(attention_sinks, bool):
    raise ValueError(f"{owner}attention_sinks must be a bool, got {attention_sinks!r}")
  if attention_sinks and (attention_impl not in FLEX_IMPLEMENTATIONS or attention_dropout_rate > 0):
    raise ValueError(
        f"{owner}attention_sinks=True runs through flex_attention: it needs attention_impl in "
        f"{FLEX_IMPLEMENTATIONS} and attention_dropout_rate 0, got attention_impl="
        f"{attention_impl!r}, attention_dropout_rate={attention_dropout_rate!r}")
  if attention_kind != "softmax":
    clashes = {"window": (window, window is not None),
               "attention_sinks": (attention_sinks, attention_sinks),
               "positions": (positions, positions in ("alibi", "relative")),
               "softcap": (softcap, softcap is not None),
               "attention_dropout_rate": (attention_dropout_rate, attention_dropout_rate > 0),
               "attention_impl": (attention_impl, attention_impl is not None)}
    for name, (value, clash) in clashes.items():
      if clash:
        raise ValueError(f"{owner}{name}={value!r} does not apply to attention_kind="
                         f"{attention_kind!r} (softmax attention only)")


class MultiHeadAttention(nnx.Module):
  """Multi-head (grouped-query) attention: self-attention, or cross-attention to a `context`.

  Parameters (logical axes): `query.kernel [embed, heads, head_dim]`, `key.kernel
  [embed, kv_heads, head_dim]`, `value.kernel [embed, kv_heads, head_dim]` (last dim `value_dim`),
  `out.kernel [heads, head_dim, embed]`, biases shaped like the kernels' output dims; with `qk_norm`,
  `query_norm.scale`/`key_norm.scale` `[head_dim]`.

  Args:
    num_heads: query heads.
    in_features: width of `x`.
    kv_heads: key/value heads (GQA; 1 = MQA); must divide `num_heads`. None = `num_heads`.
    head_dim: query/key width per head. None = `in_features // num_heads`.
    value_dim: value width per head. None = `head_dim`.
    kv_features: width of `context`. None = `in_features`.
    out_features: output width. None = `in_features`.
    use_bias: biases on the four projections.
    attention_dropout_rate: dropout on the attention weights (when called with
      `deterministic=False`).
    qk_norm: RMS-normalise each query and key head (learned scale) before the dot product.
    norm_eps: epsilon of the QK norms.
    softcap: `c * tanh(logits / c)` on the logits, or None.
    attention_impl: a name from `flaxattn.attention.implementations()`, or None to let it choose.
    positions: position information applied here, in self-attention: 'rope' (rotate queries and keys,
      half layout, see `apply_rope`), 'alibi' (bias), or 'none'.
    rope_base: RoPE base.
    rotary_dim: dims of each head RoPE rotates (partial rotation, even). None = all of `head_dim`.
    attention_kind: self-attention's form: 'softmax' (exact, via `dot_product_attention`), or the
      kernelized 'linear' (elu+1) / 'performer' (FAVOR+) of `flaxattn.attention.linear`
      (O(length); causal from `mask.causal`, padding from `positions == -1` and the mask's segment
      ids; a `RecurrentState` as the cache). Self-attention only: cross-attention calls raise.
    window: sliding window of `window` keys per side, the query's own included: a query sees keys
      within `window - 1` positions on each side (`Mask(window=(window - 1, window - 1))`; with a
      causal mask: the last `window` keys). Intersected with `mask`, and applied by position with a
      `KVCache`. 'softmax' only. None = global.
    performer_features: 'performer' random features per head.
    performer_seed: 'performer': the fixed draw (evaluation, decoding) comes from `jax.random.key(
      performer_seed)`.
    performer_redraw: 'performer': calls with `deterministic=False` and a `dropout_rng` draw fresh
      features from that key (a new draw every training step); nothing is stored in the module.
    linear_chunk_size: chunk length of the causal kernelized scan.
    attention_sinks: a learned sink logit per head (`sinks [heads]`, zeros at init): a virtual key
      every query sees with logit `sinks[h]` and value 0 (gpt-oss, StreamingLLM), so a head may
      attend to "nothing". Runs through `flex_attention` (see "Flex path" below).
    dtype: compute dtype; param_dtype: parameter dtype.

  Flex path. ALiBi, a T5 `PositionBias` and sinks run as `flex_attention` mods, in O(length)
  memory, when the call goes to the blockwise kernel: `attention_impl='blockwise'`, or None where
  blockwise is the dispatcher's first choice (CPU) -- and always with sinks. The bias becomes a
  score_mod (capped first with `softcap`, as `dot_product_attention` does), the mask (and, with a
  `KVCache`, the cache's slot positions) a mask_mod. Sinks rescale the output by the log-sum-exp:
  with `Z = exp(lse)` over the real keys, `softmax` over keys plus the sink gives `out * Z / (Z +
  exp(s_h)) = out * sigmoid(lse - s_h)`, exact and differentiable in `s_h`. Other calls (a named
  implementation such as 'xla' or 'reference', an extra `bias=` array, attention dropout) take the
  dense path: the bias materialised `[batch, heads, q_len, kv_len]` and `dot_product_attention`.
  Sown weights on the flex path are recomputed from the lse (`attention_rows`, every row). A stack
  classifies the tiles of its layers' shared mask once per forward (`shared_block_mask`) and passes
  the block mask to each layer (`block_mask=`).
  """

  def __init__(self, num_heads: int, in_features: int, *, kv_heads: int | None = None,
               head_dim: int | None = None, value_dim: int | None = None,
               kv_features: int | None = None, out_features: int | None = None,
               use_bias: bool = True, attention_dropout_rate: float = 0.0, qk_norm: bool = False,
               norm_eps: float = 1e-6, softcap: float | None = None,
               attention_impl: str | None = None, positions: str = "none",
               rope_base: float = 10000.0, rotary_dim: int | None = None,
               attention_kind: str = "softmax", window: int | None = None,
               performer_features: int = 128, performer_seed: int = 0,
               performer_redraw: bool = True, linear_chunk_size: int = 64,
               attention_sinks: bool = False,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if positions not in ATTENTION_POSITIONS:
      raise ValueError(f"positions must be one of {ATTENTION_POSITIONS}, got {positions!r}")
    check_attention_knobs(
        "", width=("in_features", in_features), num_heads=num_heads, kv_heads=kv_heads,
        head_dim=head_dim, rotary_dim=rotary_dim, positions=positions,
        attention_dropout_rate=attention_dropout_rate, softcap=softcap,
        attention_impl=attention_impl, attention_kind=attention_kind, window=window,
        performer_features=performer_features, performer_seed=performer_seed,
        linear_chunk_size=linear_chunk_size, attention_sinks=attention_sinks)
    kv_heads = num_heads if kv_heads is None else kv_heads
    head_dim = in_features // num_heads if head_dim is None else head_dim
    self.attention_kind, self.window, self.linear_chunk_size = attention_kind, window, linear_chunk_size
    # Features per head of the kernelized kinds' state (None for softmax).
    self.num_features = {"performer": performer_features, "linear": head_dim}.get(attention_kind)
    self.performer_seed, self.performer_redraw = performer_seed, performer_redraw
    self.num_heads, self.kv_heads, self.head_dim = num_heads, kv_heads, head_dim
    self.value_dim = head_dim if value_dim is None else value_dim
    self.in_features = in_features
    self.kv_features = in_features if kv_features is None else kv_features
    self.out_features = in_features if out_features is None else out_features
    self.attention_dropout_rate, self.softcap = attention_dropout_rate, softcap
    self.attention_impl = attention_impl
    self.positions, self.rope_base = positions, rope_base
    self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
    self.dtype = dtype
    # Static (part of the graph definition): True makes each call compute its attention weights,
    # O(q_len * kv_len), and sow them; `capture_attention_weights` sets it on a copy of the model.
    self.sow_weights = False
    # Static: True makes each softmax call sow an `AttentionProbe` (query, key, lse, mods) under
    # the kernel it runs, O(length); `capture_attention_probes` sets it on a copy of the model.
    self.sow_probes = False
    dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query = Dense(in_features, (num_heads, head_dim), in_axes=("embed",),
                       out_axes=("heads", "head_dim"), **dense)
    self.key = Dense(self.kv_features, (kv_heads, head_dim), in_axes=("embed",),
                     out_axes=("kv_heads", "head_dim"), **dense)
    self.value = Dense(self.kv_features, (kv_heads, self.value_dim), in_axes=("embed",),
                       out_axes=("kv_heads", "head_dim"), **dense)
    self.out = Dense((num_heads, self.value_dim), self.out_features, in_axes=("heads", "head_dim"),
                     out_axes=("embed",), **dense)
    norm = dict(eps=norm_eps, axis_name="head_dim", dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query_norm = RMSNorm(head_dim, **norm) if qk_norm else None
    self.key_norm = RMSNorm(head_dim, **norm) if qk_norm else None
    self.sinks = (param(rngs, nnx.initializers.zeros, (num_heads,), ("heads",), param_dtype)
                  if attention_sinks else None)

  @classmethod
  def from_keras_args(cls, num_heads: int, key_dim: int, *, in_features: int,
                      value_dim: int | None = None, dropout: float = 0.0, use_bias: bool = True,
                      output_shape: int | None = None, kv_features: int | None = None,
                      rngs: nnx.Rngs, **kwargs) -> "MultiHeadAttention":
    """Keras `MultiHeadAttention(num_heads, key_dim, value_dim, dropout, use_bias, output_shape)`.

    Keras infers input widths when first called; here they are given (`in_features`, `kv_features`).
    """
    return cls(num_heads, in_features, head_dim=key_dim, value_dim=value_dim,
               attention_dropout_rate=dropout,
               use_bias=use_bias, out_features=output_shape, kv_features=kv_features, rngs=rngs,
               **kwargs)

  @classmethod
  def from_torch_args(cls, embed_dim: int, num_heads: int, *, dropout: float = 0.0,
                      bias: bool = True, kdim: int | None = None, vdim: int | None = None,
                      batch_first: bool = True, rngs: nnx.Rngs, **kwargs) -> "MultiHeadAttention":
    """PyTorch `nn.MultiheadAttention(embed_dim, num_heads, dropout, bias, kdim, vdim, batch_first)`."""
    if not batch_first:
      raise ValueError("batch_first=False is not supported: flaxattn is always [batch, length, ...]")
    if kdim is not None and vdim is not None and kdim != vdim:
      raise ValueError(f"kdim ({kdim}) and vdim ({vdim}) must be equal: key and value share `context`")
    return cls(num_heads, embed_dim, attention_dropout_rate=dropout, use_bias=bias,
               kv_features=kdim if kdim is not None else vdim, rngs=rngs, **kwargs)

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> KVCache | RecurrentState:
    """An empty `KVCache` for this layer (dtype defaults to the compute dtype); for the kernelized
    kinds a `RecurrentState` (float32, constant size: `max_length` and `dtype` do not apply)."""
    if self.attention_kind != "softmax":
      return RecurrentState.create(batch, self.kv_heads, self.num_features, self.value_dim)
    return KVCache.create(batch, max_length, self.kv_heads, self.head_dim, self.value_dim,
                          self.dtype if dtype is None else dtype)

  def init_context_cache(self, batch: int, dtype: Any = None) -> ContextCache:
    """An empty `ContextCache` for this layer's cross-attention (dtype defaults to the compute dtype)."""
    return ContextCache.create(batch, self.kv_heads, self.head_dim, self.value_dim,
                               self.dtype if dtype is None else dtype)

  def context_cache(self, context: jax.Array, dtype: Any = None) -> ContextCache:
    """The keys/values of `context` `[batch, context_len, kv_features]` as a filled `ContextCache`."""
    self._check_context(context, context.shape[0] if jnp.ndim(context) else 0)
    key, value = self._project_kv(context)
    dtype = self.dtype if dtype is None else dtype
    return ContextCache(key=key.astype(dtype), value=value.astype(dtype))

  def _check_context(self, context: jax.Array, batch: int) -> None:
    if (context.ndim != 3 or context.shape[-1] != self.kv_features or context.shape[0] != batch
        or context.shape[1] == 0):
      raise ValueError(
          f"context must be [{batch}, length >= 1, {self.kv_features}], got shape {context.shape}")

  def _project_kv(self, source: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys (QK-normalised, not yet rotated) and values of `source` `[batch, length, features]`."""
    key = constrain(self.key(source), ("batch", "length", "kv_heads", "head_dim"))
    value = constrain(self.value(source), ("batch", "length", "kv_heads", "head_dim"))
    if self.key_norm is not None:
      key = self.key_norm(key)
    return key, value

  def _check_call(self, x, context, mask, bias, positions, cache, deterministic, dropout_rng):
    """Every argument check of `__call__`, before any compute; returns the positions (defaulted)."""
    if x.ndim != 3 or x.shape[-1] != self.in_features:
      raise ValueError(f"x must be [batch, length, {self.in_features}], got shape {x.shape}")
    batch, q_len = x.shape[0], x.shape[1]
    cross = context is not None or isinstance(cache, ContextCache)
    if context is not None:
      self._check_context(context, batch)
    if cross and (isinstance(cache, KVCache) or self.positions != "none"):
      raise ValueError(
          "cross-attention (context given) takes no KVCache and no positions; got "
          f"cache={type(cache).__name__}, positions={self.positions!r}")
    if isinstance(cache, ContextCache):
      if cache.key.shape[0] != batch:
        raise ValueError(f"cache holds a batch of {cache.key.shape[0]}, but x has batch {batch}")
      if not cache.filled and context is None:
        raise ValueError("an empty ContextCache needs the context to fill it")
      if cache.filled and context is not None and context.shape[1] != cache.key.shape[1]:
        raise ValueError(
            f"cache holds keys/values for a context of length {cache.key.shape[1]}, got a context "
            f"of length {context.shape[1]}")
    if cross and self.attention_kind != "softmax":
      raise ValueError(f"attention_kind={self.attention_kind!r} is for self-attention; "
                       "cross-attention needs attention_kind='softmax'")
    expected_cache = KVCache if self.attention_kind == "softmax" else RecurrentState
    if isinstance(cache, (KVCache, RecurrentState)) and not isinstance(cache, expected_cache):
      raise ValueError(f"attention_kind={self.attention_kind!r} decodes with a "
                       f"{expected_cache.__name__}, got a {type(cache).__name__}")
    if isinstance(cache, expected_cache) and mask is not None:
      raise ValueError(
          f"mask must be None when a {type(cache).__name__} is given: visibility comes from the cache")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    elif tuple(positions.shape) != (batch, q_len):
      raise ValueError(f"positions must be [batch, q_len] = {(batch, q_len)}, got {positions.shape}")
    if not deterministic and self.attention_dropout_rate > 0.0 and dropout_rng is None:
      raise ValueError(f"attention dropout (rate {self.attention_dropout_rate}, "
                       "deterministic=False) needs a dropout_rng")
    if self.attention_kind != "softmax":
      self._check_kernelized(as_mask(mask), bias, positions, cache)
    return positions

  def _check_kernelized(self, mask, bias, positions, cache) -> None:
    kind = self.attention_kind
    if bias is not None:
      raise ValueError(f"attention_kind={kind!r} takes no bias, got one of shape {jnp.shape(bias)}")
    if self.sow_probes:
      raise ValueError(f"attention_kind={kind!r} has no log-sum-exp to probe: use sow_weights")
    if self.sow_weights and isinstance(cache, RecurrentState):
      raise ValueError(
          f"attention_kind={kind!r} returns no attention weights with a RecurrentState: the state keeps "
          "no per-key record")
    unsupported = sorted(mask.kinds - {"causal", "segment_ids"}) if mask is not None else []
    if unsupported:
      raise ValueError(
          f"attention_kind={kind!r} supports masks that are causal and/or segment ids (padding, "
          f"packing), got mask kinds {unsupported}")
    if mask is not None and mask.q_segment_ids is not None and (
        tuple(mask.q_segment_ids.shape) != tuple(positions.shape)):
      raise ValueError(f"Mask.q_segment_ids must be [batch, length] = {positions.shape}, got "
                       f"{mask.q_segment_ids.shape}")

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *, mask: Mask | None = None,
               bias: jax.Array | None = None, positions: jax.Array | None = None,
               cache: KVCache | ContextCache | RecurrentState | None = None,
               deterministic: bool = True, dropout_rng: jax.Array | None = None,
               position_bias: PositionBias | None = None, block_mask: BlockMask | None = None):
    """Attends from `x` to `context` (or to `x` itself).

    Args:
      x: `[batch, q_len, in_features]`.
      context: `[batch, kv_len, kv_features]` for cross-attention, or None for self-attention.
      mask: a `flaxattn.attention.Mask` (or boolean array, True = attend) over `[batch, heads, q_len,
        kv_len]`. Not allowed with `cache`: the cache supplies causal visibility by position.
      bias: added to the logits, broadcastable to `[batch, heads, q_len, kv_len]`.
      positions: int `[batch, q_len]` positions of `x`'s tokens (default `0 .. q_len-1`); used by
        'rope'/'alibi' and by the cache (-1 marks padding, which sees and is seen by nothing).
      cache: a `KVCache` (self-attention): the new keys/values are appended and attention runs over
        every slot written so far. Or a `ContextCache` (cross-attention): when empty it is filled
        from `context`; when filled its keys/values are used and `context` may be None (if given,
        only its shape is checked against the cache: its values are not read again). Or, for the
        kernelized kinds, a `RecurrentState`.
      deterministic: False enables attention dropout (needs `dropout_rng`).
      position_bias: a `PositionBias` of query and key positions (the stack's shared T5 table),
        self-attention only; added to ALiBi's when both are on. Applied as a score_mod on the flex
        path, else materialised.
      block_mask: `shared_block_mask`'s for this call (a stack builds it once for all its layers),
        used on the flex path without a cache; None builds it here.

    Returns:
      `(out, cache)`: `out [batch, q_len, out_features]` and the updated cache (None without one).
      With `sow_weights` set (see `flaxattn.nn.capture_attention_weights`), the attention weights
      `[batch, heads, q_len, kv_len]` (float32) are sown as `nnx.Intermediate` 'attention_weights'.
      With `sow_probes` (`flaxattn.nn.capture_attention_probes`), an `AttentionProbe` (query, key,
      lse and mods of the kernel call, O(length)) is sown as 'attention_probe'.
    """
    positions = self._check_call(x, context, mask, bias, positions, cache, deterministic,
                                 dropout_rng)
    cross = context is not None or isinstance(cache, ContextCache)
    if position_bias is not None and (self.attention_kind != "softmax" or cross):
      raise ValueError("position_bias is for softmax self-attention, got it with "
                       f"attention_kind={self.attention_kind!r}, cross-attention={cross}")
    if self.sinks is not None and bias is not None:
      raise ValueError(f"attention_sinks run through flex_attention, which takes no bias= array; "
                       f"got one of shape {jnp.shape(bias)}: express it as a PositionBias")
    query = constrain(self.query(x), ("batch", "length", "heads", "head_dim"))
    if self.query_norm is not None:
      query = self.query_norm(query)
    if isinstance(cache, ContextCache):
      if not cache.filled:
        cache = self.context_cache(context, cache.key.dtype)
      key, value = cache.key.astype(self.dtype), cache.value.astype(self.dtype)
    else:
      key, value = self._project_kv(x if context is None else context)
    if self.positions == "rope":
      query = apply_rope(query, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
      key = apply_rope(key, positions, base=self.rope_base, rotary_dim=self.rotary_dim)
    query, key, value = hook(self, "q", query), hook(self, "k", key), hook(self, "v", value)
    if self.attention_kind != "softmax":
      return self._kernelized(query, key, value, mask=as_mask(mask), positions=positions,
                              cache=cache, deterministic=deterministic, dropout_rng=dropout_rng)

    kv_positions, attention_impl, mask_mod, call_bias = positions, self.attention_impl, None, bias
    biases = [b for b in (PositionBias.alibi(self.num_heads) if self.positions == "alibi" else None,
                          position_bias) if b is not None]
    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    flex = self._flex_path(bool(biases), bias is not None or use_dropout)
    if cache is not None or context is not None:
      block_mask = None  # Built for self-attention without a cache (the stack's shared one).
    if isinstance(cache, KVCache):
      cache = cache.update(key, value, positions)
      key, value = cache.key.astype(self.dtype), cache.value.astype(self.dtype)
      kv_positions = cache.positions
      if flex:
        mask_mod = cache.mask_mod(positions, self.window)
      else:
        # kv_lengths = the slots written so far: kernels that skip key blocks (blockwise, cuDNN,
        # tokamax) then cost what the tokens cost, not what the cache could hold.
        mask = Mask(array=cache.visible(positions, self.window),
                    kv_lengths=jnp.full((x.shape[0],), cache.index, jnp.int32))
      attention_impl = _single_device(attention_impl)
    elif context is None and not isinstance(cache, ContextCache):
      mask = self._self_mask(mask)
    if self.sow_probes and isinstance(cache, KVCache):
      raise ValueError("sow_probes takes no KVCache: probe the whole sequence in one call")
    lse = None
    if flex:
      result, weights, lse = self._flex(query, key, value, as_mask(mask), mask_mod, biases,
                                        positions, kv_positions, block_mask)
    else:
      for position_term in biases:
        dense = position_term.dense(positions, kv_positions)
        bias = dense if bias is None else bias + dense
      # Fused kernels run per device (`flaxattn.attention.placement`); on Auto mesh axes the arrays'
      # types carry no sharding, so they are told the layout the rules give the queries.
      with activation_layout(active_spec(("batch", "length", "heads", "head_dim"))):
        result = dot_product_attention(
            query, key, value, mask=mask, bias=bias, softcap=self.softcap,
            dropout_rate=self.attention_dropout_rate if use_dropout else 0.0,
            dropout_rng=dropout_rng if use_dropout else None,
            implementation=attention_impl, return_weights=self.sow_weights)
      result, weights = result if self.sow_weights else (result, None)
    result, weights = hook_pattern(self, result, weights, value)
    if self.sow_weights:
      self.sow(nnx.Intermediate, "attention_weights", weights)
    if self.sow_probes:
      self.sow(nnx.Intermediate, "attention_probe", AttentionProbe.create(
          query, key, value, lse, mask=as_mask(mask), biases=biases, positions=positions,
          kv_positions=kv_positions, bias=call_bias, softcap=self.softcap))
    result = hook(self, "z", result)
    return hook(self, "out", constrain(self.out(result), ("batch", "length", "embed"))), cache

  def _self_mask(self, mask) -> Mask | None:
    """Self-attention's `mask` (without a cache) with this layer's `window` applied."""
    return as_mask(mask) if self.window is None else _with_window(as_mask(mask), self.window)

  def shared_block_mask(self, mask, batch: int, length: int, *, position_biased: bool,
                        deterministic: bool) -> BlockMask | None:
    """The block mask of this layer's self-attention over `length` tokens without a cache, when
    the call takes the flex path (else None): what each call would classify, built once by a
    stack whose layers all see the same `mask` and pass it as `block_mask`.

    `position_biased`: the call gets a `position_bias` (the stack's T5 table).
    """
    use_dropout = not deterministic and self.attention_dropout_rate > 0.0
    biased = position_biased or self.positions == "alibi"
    if self.attention_kind != "softmax" or not self._flex_path(biased, use_dropout):
      return None
    mask_mod = _mask_mod(None, self._self_mask(mask), length, length)
    return None if mask_mod is None else create_block_mask(mask_mod, batch, self.num_heads,
                                                           length, length)

  def _flex_path(self, position_biased: bool, dense_only: bool) -> bool:
    """Whether this call runs through `flex_attention` (see "Flex path" in the class doc)."""
    if self.sinks is not None:
      return True  # The knob checks and `__call__` rule out what flex cannot run.
    if not position_biased or dense_only or self.attention_impl not in FLEX_IMPLEMENTATIONS:
      return False
    return self.attention_impl == "blockwise" or (
        flaxattn.attention.implementations(jax.default_backend())[0] == "blockwise")

  def _flex(self, query, key, value, mask, mask_mod, biases, positions, kv_positions, block_mask):
    """`(out [batch, q_len, heads, value_dim], weights or None, lse [batch, heads, q_len])` through
    `flex_attention`, with the position biases (and softcap) as one score_mod and `mask`/`mask_mod`
    as one mask_mod, tiled by `block_mask` (None: classified here)."""
    q_len, kv_len = query.shape[1], key.shape[1]
    mods = [b.score_mod(positions, kv_positions) for b in biases]
    softcap = self.softcap

    def score_mod(score, b, h, q_idx, kv_idx):
      score = capped(score, softcap)
      for mod in mods:  # Each adds its bias to the (capped) score.
        score = mod(score, b, h, q_idx, kv_idx)
      return score

    if mask is not None:
      mask.validate(query.shape[0], self.num_heads, q_len, kv_len)
    mask_mod = _mask_mod(mask_mod, mask, q_len, kv_len)
    score_mod = score_mod if (mods or softcap is not None) else None
    impl = "blockwise" if self.attention_impl is None else self.attention_impl
    out, lse = flex_attention(query, key, value, score_mod=score_mod, mask_mod=mask_mod,
                              block_mask=block_mask, implementation=impl, return_lse=True)
    if self.sinks is not None:
      # Softmax over the keys and the sink: lse' = logaddexp(lse, s_h), out' = out * exp(lse - lse').
      total = jnp.logaddexp(lse, self.sinks[...].astype(jnp.float32)[None, :, None])
      out = (out * jnp.exp(lse - total).transpose(0, 2, 1)[..., None]).astype(out.dtype)
      lse = total
    weights = None
    if self.sow_weights:
      weights = attention_rows(query, key, lse, np.arange(q_len), score_mod=score_mod,
                               mask_mod=mask_mod)
    return out, weights, lse

  def _feature_map(self, deterministic: bool, dropout_rng: jax.Array | None):
    """`x [..., head_dim] -> log phi(x) [..., num_features]` for this call."""
    if self.attention_kind == "linear":
      return linear.elu_log_features
    if self.performer_redraw and not deterministic and dropout_rng is not None:
      # Attention dropout is off for the kernelized kinds, so this layer's dropout key is free to
      # seed the draw: a new key every training step is a new draw, and nothing is stored.
      key = dropout_rng
    else:
      key = jax.random.key(self.performer_seed)
    projection = linear.orthogonal_projection(key, self.num_features, self.head_dim)
    return lambda x: linear.performer_log_features(x, projection)

  def _kernelized(self, query, key, value, *, mask, positions, cache, deterministic, dropout_rng):
    """Self-attention of the kernelized kinds (arguments checked by `_check_kernelized`)."""
    segments = (positions >= 0).astype(jnp.int32)
    if mask is not None and mask.q_segment_ids is not None:
      segments = jnp.where(positions >= 0, mask.q_segment_ids.astype(jnp.int32), 0)
    features = self._feature_map(deterministic, dropout_rng)
    query_features, key_features = features(query), features(key)
    causal = mask is not None and mask.causal
    if isinstance(cache, RecurrentState):
      attended, state = linear.causal_kernelized_attention(
          query_features, key_features, value, segment_ids=segments, state=cache,
          chunk_size=self.linear_chunk_size)
      cache = dataclasses.replace(state, next_position=jnp.maximum(
          cache.next_position, jnp.max(positions, axis=1) + 1).astype(jnp.int32))
    elif causal:
      attended, _ = linear.causal_kernelized_attention(
          query_features, key_features, value, segment_ids=segments,
          chunk_size=self.linear_chunk_size)
    else:
      # Bidirectional: segment ids only mark padding here (packed segments are not separated).
      attended = linear.kernelized_attention(query_features, key_features, value,
                                             kv_valid=segments > 0)
    if self.sow_weights:
      self.sow(nnx.Intermediate, "attention_weights", linear.kernelized_weights(
          query_features, key_features, causal=causal, segment_ids=segments if causal else None,
          kv_valid=None if causal else segments > 0))
    attended = hook(self, "z", attended.astype(self.dtype))
    return hook(self, "out", constrain(self.out(attended), ("batch", "length", "embed"))), cache


def _mask_mod(mask_mod, mask: Mask | None, q_len: int, kv_len: int):
  """`mask_mod` and `mask` as one mask_mod (None when neither masks anything)."""
  masks = [m for m in (mask_mod, None if mask is None or not mask.kinds else
                       mask_to_mask_mod(mask, q_len, kv_len)) if m is not None]
  return None if not masks else masks[0] if len(masks) == 1 else and_masks(*masks)


def _single_device(implementation: str | None) -> str | None:
  """The implementation for a call against a `KVCache`: a kernel that splits the sequence over a
  mesh axis (ring) needs equal query and key lengths, which neither a prefill nor a one-token step
  against the cache has, so those calls go to the dispatcher's choice instead (None)."""
  sequence_parallel = {impl["name"] for impl in flaxattn.attention.describe_implementations()
                       if impl["sequence_sharded"]}
  return None if implementation in sequence_parallel else implementation


def _with_window(mask: Mask | None, window: int) -> Mask:
  """`mask` intersected with the band `|query - key| <= window - 1`."""
  band = window - 1
  if mask is None:
    return Mask(window=(band, band))
  old = mask.window or (None, None)
  sides = tuple(band if side is None else min(side, band) for side in old)
  return dataclasses.replace(mask, window=sides)
