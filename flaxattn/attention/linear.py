"""Kernelized linear attention: elu+1 features (Katharopoulos et al. 2020) and Performer FAVOR+
(Choromanski et al. 2021), O(length) in time and memory.

Softmax attention weights `exp(q.k)`; kernelized attention replaces that by `phi(q) . phi(k)` for a
positive feature map `phi` (`[head_dim] -> [num_features]`), so the output

    out_i = sum_j (phi(q_i) . phi(k_j)) v_j / sum_j phi(q_i) . phi(k_j)

regroups as `phi(q_i) S / phi(q_i) z` with `S = sum_j phi(k_j) v_j^T` `[num_features, value_dim]` and
`z = sum_j phi(k_j)`: no `[q_len, kv_len]` array is ever formed.

- Non-causal: one `S`, `z` over all (valid) keys.
- Causal: the sequence is cut into chunks of `chunk_size`; inside a chunk the quadratic masked form is
  used (small matmuls), across chunks a running state `(S, z)` is carried by `lax.scan`. The same chunk
  step serves decoding: a `RecurrentState` holds `(S, z)` of every token seen so far (constant size,
  instead of a KV cache) and each call appends its tokens.

Numerical stabilisation. Feature maps are written in the log domain (`log phi`). Each query's features
are divided by their maximum, and all keys' features by a common maximum per (row, kv head): these
constants cancel between numerator and denominator, so the result is unchanged, while `exp` never
overflows. The key maximum is a running one in the causal scan and in decoding (the state is rescaled
when it grows, like the online softmax), so a recurrent decode equals the full forward pass up to
float rounding. The maxima are `stop_gradient`ed: the output does not depend on them.

Layout `[batch, length, heads, head_dim]`; keys/values may have fewer heads (GQA/MQA, `heads %
kv_heads == 0`). All sums are in float32; the output has the value's dtype.

Masking supported: the causal flag; padding keys anywhere (`kv_valid`, they contribute nothing);
causal packed rows (`segment_ids`: contiguous segments, a query sees only earlier keys of its own
segment; 0 marks padding). Non-causal calls take `kv_valid` only (no packed segments). Windows,
explicit masks, bias, soft-capping and dropout do not apply to kernelized attention; its weights
can be materialised for inspection (`kernelized_weights`). Queries that see no key get zeros.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention.rows import max_shift, pad_length

# The running key maximum of an empty state: finite, so that `exp(old - new)` is 0 (not NaN) when
# the first keys arrive and 1 while none has.
_EMPTY_LOG_SCALE = -1e30


def elu_log_features(x: jax.Array) -> jax.Array:
  """`log(elu(x) + 1)` elementwise, exactly (`x` for `x <= 0`, `log1p(x)` above).

  Katharopoulos et al.'s map `phi(x) = elu(x) + 1` in the log domain; `num_features == head_dim`.
  """
  x = x.astype(jnp.float32)
  return jnp.where(x > 0, jnp.log1p(jnp.maximum(x, 0.0)), x)


def orthogonal_projection(key: jax.Array, num_features: int, head_dim: int) -> jax.Array:
  """Performer's random projection `[num_features, head_dim]` float32 (orthogonal random features).

  Rows come in blocks of `head_dim` mutually orthogonal directions (QR of a Gaussian matrix), each
  row scaled by the norm of an independent Gaussian vector, so every row is marginally
  `N(0, I_head_dim)` (the estimate stays unbiased) while rows within a block are exactly orthogonal
  (lower variance, Choromanski et al. 2021, Thm. 2). A new `key` gives new features (redrawing).
  """
  if not isinstance(num_features, (int, np.integer)) or num_features <= 0:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}")
  if not isinstance(head_dim, (int, np.integer)) or head_dim <= 0:
    raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
  blocks = -(-num_features // head_dim)
  block_key, norm_key = jax.random.split(key)
  gaussian = jax.random.normal(block_key, (blocks, head_dim, head_dim), jnp.float32)
  orthonormal, _ = jnp.linalg.qr(gaussian)  # Columns of each block are orthonormal.
  directions = jnp.swapaxes(orthonormal, 1, 2).reshape(blocks * head_dim, head_dim)[:num_features]
  norms = jnp.linalg.norm(
      jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=-1, keepdims=True)
  return directions * norms


def performer_log_features(x: jax.Array, projection: jax.Array) -> jax.Array:
  """FAVOR+ positive random features in the log domain: `w.x' - |x'|^2/2 - log(m)/2`.

  `x` `[..., head_dim]` is first scaled by `head_dim ** -0.25` (so `phi(q).phi(k)` estimates
  `exp(q.k / sqrt(head_dim))`, softmax attention's weights); `projection` `[m, head_dim]` from
  `orthogonal_projection`. Returns float32 `[..., m]`, with `E[phi(q).phi(k)] = exp(q.k/sqrt(d))`.
  """
  num_features, head_dim = projection.shape
  if x.shape[-1] != head_dim:
    raise ValueError(f"x's last dim ({x.shape[-1]}) must match the projection's {projection.shape}")
  x = x.astype(jnp.float32) * head_dim ** -0.25
  projected = jnp.einsum("...d,md->...m", x, projection.astype(jnp.float32))
  return projected - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True) - 0.5 * math.log(num_features)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentState:
  """Causal kernelized attention's summary of the keys seen so far (the decoding state).

  Attributes:
    key_value: float32 `[batch, kv_heads, num_features, value_dim]`, `sum_j phi(k_j) v_j^T`.
    key_sum: float32 `[batch, kv_heads, num_features]`, `sum_j phi(k_j)`.
    log_scale: float32 `[batch, kv_heads]`: both sums are stored divided by `exp(log_scale)`.
    segment: int32 `[batch]`: the segment the sums belong to (the last real key's segment id).
    next_position: int32 `[batch]`: the position the next real token takes (tokens seen so far).
  """

  key_value: jax.Array
  key_sum: jax.Array
  log_scale: jax.Array
  segment: jax.Array
  next_position: jax.Array

  def next_positions(self) -> jax.Array:
    """int32 `[batch]`: the position each row's next real token takes (as `KVCache.next_positions`)."""
    return self.next_position

  @classmethod
  def create(cls, batch: int, kv_heads: int, num_features: int, value_dim: int) -> "RecurrentState":
    """The state of no keys."""
    return cls(key_value=jnp.zeros((batch, kv_heads, num_features, value_dim), jnp.float32),
               key_sum=jnp.zeros((batch, kv_heads, num_features), jnp.float32),
               log_scale=jnp.full((batch, kv_heads), _EMPTY_LOG_SCALE, jnp.float32),
               segment=jnp.zeros((batch,), jnp.int32),
               next_position=jnp.zeros((batch,), jnp.int32))


def _group_queries(query_log_features: jax.Array, kv_heads: int) -> jax.Array:
  """`[batch, len, heads, m]` -> stabilised features `[batch, len, kv_heads, group, m]`."""
  batch, length, heads, features = query_log_features.shape
  grouped = query_log_features.reshape(batch, length, kv_heads, heads // kv_heads, features)
  # Per-query constant: cancels in the ratio, keeps exp in range.
  return jnp.exp(grouped - jax.lax.stop_gradient(jnp.max(grouped, axis=-1, keepdims=True)))


def _ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """`numerator [b, q, kvh, g, dv] / denominator [b, q, kvh, g]`, 0 where nothing was seen."""
  seen = denominator > 0
  return jnp.where(seen[..., None], numerator, 0.0) / jnp.where(seen, denominator, 1.0)[..., None]


def _causal_chunk(state: RecurrentState, query_features, key_log_features, value, segment_ids):
  """Appends one chunk to `state` and attends its queries causally to everything seen.

  `query_features` `[b, c, kvh, g, m]` (stabilised), `key_log_features` `[b, c, kvh, m]`, `value`
  `[b, c, kvh, dv]` float32, `segment_ids` int32 `[b, c]` (0 = padding). Returns
  `(new_state, numerator [b, c, kvh, g, dv], denominator [b, c, kvh, g])`.
  """
  chunk = key_log_features.shape[1]
  real = segment_ids > 0
  key_log_features = jnp.where(real[:, :, None, None], key_log_features, -jnp.inf)
  chunk_max = jax.lax.stop_gradient(jnp.max(key_log_features, axis=(1, 3)))
  log_scale = jnp.maximum(state.log_scale, chunk_max)
  key_features = jnp.exp(key_log_features - log_scale[:, None, :, None])
  decay = jnp.exp(state.log_scale - log_scale)

  # Within the chunk: the quadratic form under the causal and same-segment mask.
  index = jnp.arange(chunk)
  visible = ((index[None, :, None] >= index[None, None, :])
             & (segment_ids[:, :, None] == segment_ids[:, None, :]) & real[:, None, :])
  scores = jnp.einsum("bqkgm,bskm->bkgqs", query_features, key_features)
  scores = jnp.where(visible[:, None, None], scores, 0.0)
  numerator = jnp.einsum("bkgqs,bskd->bqkgd", scores, value)
  denominator = jnp.einsum("bkgqs->bqkg", scores)

  # Earlier chunks: only queries of the segment the state belongs to see it.
  key_value = state.key_value * decay[..., None, None]
  key_sum = state.key_sum * decay[..., None]
  sees_state = (segment_ids == state.segment[:, None])[:, :, None, None]
  numerator += jnp.where(sees_state[..., None],
                         jnp.einsum("bqkgm,bkmd->bqkgd", query_features, key_value), 0.0)
  denominator += jnp.where(sees_state, jnp.einsum("bqkgm,bkm->bqkg", query_features, key_sum), 0.0)

  # The new state summarises the segment of the chunk's last real key (the state's own segment
  # when the chunk holds only padding); keys of segments that ended inside the chunk are dropped.
  last_real = jnp.max(jnp.where(real, index, -1), axis=1)
  segment = jnp.where(last_real >= 0, jnp.take_along_axis(
      segment_ids, jnp.maximum(last_real, 0)[:, None], axis=1)[:, 0], state.segment)
  keep = (segment_ids == segment[:, None]) & real
  kept_features = jnp.where(keep[:, :, None, None], key_features, 0.0)
  carried = (segment == state.segment)[:, None]
  new_state = RecurrentState(
      key_value=jnp.where(carried[..., None, None], key_value, 0.0)
      + jnp.einsum("bskm,bskd->bkmd", kept_features, value),
      key_sum=jnp.where(carried[..., None], key_sum, 0.0) + jnp.sum(kept_features, axis=1),
      log_scale=log_scale, segment=segment, next_position=state.next_position)
  return new_state, numerator, denominator


def _check(query_log_features, key_log_features, value):
  if query_log_features.ndim != 4 or key_log_features.ndim != 4 or value.ndim != 4 or min(
      query_log_features.shape[1], key_log_features.shape[1]) < 1:
    raise ValueError(
        "query/key features and value must be [batch, length >= 1, heads, dim], got shapes "
        f"{query_log_features.shape}, {key_log_features.shape}, {value.shape}")
  if key_log_features.shape[:3] != value.shape[:3]:
    raise ValueError(
        f"key features {key_log_features.shape} and value {value.shape} must agree on batch, "
        "length and kv_heads")
  if (query_log_features.shape[0] != value.shape[0]
      or query_log_features.shape[-1] != key_log_features.shape[-1]
      or query_log_features.shape[2] % value.shape[2]):
    raise ValueError(
        f"query features {query_log_features.shape} do not fit key features "
        f"{key_log_features.shape}: batch and num_features must match and heads must be a "
        "multiple of kv_heads")


def kernelized_attention(query_log_features: jax.Array, key_log_features: jax.Array,
                         value: jax.Array, *, kv_valid: jax.Array | None = None) -> jax.Array:
  """Non-causal kernelized attention from log-domain features.

  Args:
    query_log_features: `[batch, q_len, heads, m]` (`log phi(q)`).
    key_log_features: `[batch, kv_len, kv_heads, m]`.
    value: `[batch, kv_len, kv_heads, value_dim]`.
    kv_valid: bool `[batch, kv_len]`, False = padding key (ignored); None = all valid.

  Returns:
    `[batch, q_len, heads, value_dim]` in value's dtype.
  """
  _check(query_log_features, key_log_features, value)
  batch, q_len, heads, _ = query_log_features.shape
  kv_heads = value.shape[2]
  if kv_valid is not None:
    key_log_features = jnp.where(kv_valid[:, :, None, None], key_log_features, -jnp.inf)
  key_max = jax.lax.stop_gradient(jnp.max(key_log_features, axis=(1, 3), keepdims=True))
  key_features = jnp.exp(key_log_features - max_shift(key_max))
  query_features = _group_queries(query_log_features, kv_heads)
  value32 = value.astype(jnp.float32)
  key_value = jnp.einsum("bskm,bskd->bkmd", key_features, value32)
  numerator = jnp.einsum("bqkgm,bkmd->bqkgd", query_features, key_value)
  denominator = jnp.einsum("bqkgm,bkm->bqkg", query_features, jnp.sum(key_features, axis=1))
  out = _ratio(numerator, denominator)
  return out.reshape(batch, q_len, heads, value.shape[-1]).astype(value.dtype)


def causal_kernelized_attention(query_log_features: jax.Array, key_log_features: jax.Array,
                                value: jax.Array, *, segment_ids: jax.Array | None = None,
                                state: RecurrentState | None = None,
                                chunk_size: int = 64) -> tuple[jax.Array, RecurrentState]:
  """Causal kernelized attention by chunks, continuing from (and returning) a `RecurrentState`.

  Query `i` attends to keys `j <= i` of this call (by index; `q_len == kv_len`) and to the keys
  summarised in `state` (all earlier), restricted to its own segment.

  Args:
    query_log_features: `[batch, len, heads, m]`.
    key_log_features: `[batch, len, kv_heads, m]`.
    value: `[batch, len, kv_heads, value_dim]`.
    segment_ids: int `[batch, len]`: contiguous segments of packed rows, 0 = padding (anywhere);
      None = one segment (id 1) everywhere. Continuing a `state`, a query of the state's segment
      sees the state (a fresh state belongs to segment 0, so no query sees it).
    state: from an earlier call, or None (no earlier keys).
    chunk_size: tokens per chunk (the quadratic block); `len` is padded up to a multiple of it.

  Returns:
    `(out [batch, len, heads, value_dim] in value's dtype, state after the last token)`;
    `state.next_position` is left as given (the caller tracks positions).
  """
  _check(query_log_features, key_log_features, value)
  if query_log_features.shape[1] != key_log_features.shape[1]:
    raise ValueError(
        f"causal kernelized attention needs q_len == kv_len, got {query_log_features.shape[1]} and "
        f"{key_log_features.shape[1]}")
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size <= 0:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  batch, length, heads, _ = query_log_features.shape
  kv_heads, value_dim = value.shape[2], value.shape[3]
  if segment_ids is None:
    segment_ids = jnp.ones((batch, length), jnp.int32)
  elif tuple(segment_ids.shape) != (batch, length):
    raise ValueError(f"segment_ids must be [batch, len] = {(batch, length)}, got {segment_ids.shape}")
  if state is None:
    state = RecurrentState.create(batch, kv_heads, key_log_features.shape[-1], value_dim)
  query_features = _group_queries(query_log_features, kv_heads)
  value32 = value.astype(jnp.float32)
  segment_ids = segment_ids.astype(jnp.int32)

  chunk = min(chunk_size, length)
  chunks = -(-length // chunk)
  padded = chunks * chunk

  def split(x, fill=0):
    x = pad_length(x, padded, value=fill)
    return jnp.moveaxis(x.reshape((batch, chunks, chunk) + x.shape[2:]), 1, 0)

  def step(carry, inputs):
    carry, numerator, denominator = _causal_chunk(carry, *inputs)
    return carry, _ratio(numerator, denominator)

  state, out = jax.lax.scan(
      step, state, (split(query_features), split(key_log_features), split(value32),
                    split(segment_ids)))
  out = jnp.moveaxis(out, 0, 1).reshape((batch, padded, heads, value_dim))[:, :length]
  return out.astype(value.dtype), state


def kernelized_weights(query_log_features: jax.Array, key_log_features: jax.Array, *,
                       causal: bool = False, segment_ids: jax.Array | None = None,
                       kv_valid: jax.Array | None = None) -> jax.Array:
  """The attention weights kernelized attention applies, materialised (to inspect: O(n^2) memory).

  `w_ij = phi(q_i).phi(k_j) / sum_j' phi(q_i).phi(k_j')` over the keys query `i` sees: with `causal`
  the masks of `causal_kernelized_attention` (`segment_ids`, 0 = padding), else those of
  `kernelized_attention` (`kv_valid`); rows that see nothing are 0. Features `[batch, len,
  heads|kv_heads, m]`; returns float32 `[batch, heads, q_len, kv_len]`.
  """
  _check(query_log_features, key_log_features, key_log_features)
  batch, q_len, heads, _ = query_log_features.shape
  kv_len, kv_heads = key_log_features.shape[1], key_log_features.shape[2]
  if causal:
    segment_ids = jnp.ones((batch, q_len), jnp.int32) if segment_ids is None else segment_ids
    index = jnp.arange(q_len)
    visible = ((index[:, None] >= index[None, :])[None]
               & (segment_ids[:, :, None] == segment_ids[:, None, :])
               & (segment_ids > 0)[:, None, :])
  else:
    kv_valid = jnp.ones((batch, kv_len), bool) if kv_valid is None else kv_valid
    visible = jnp.broadcast_to(kv_valid[:, None, :], (batch, q_len, kv_len))
  key_log_features = jnp.where(jnp.any(visible, axis=1)[:, :, None, None], key_log_features, -jnp.inf)
  key_max = jax.lax.stop_gradient(jnp.max(key_log_features, axis=(1, 3), keepdims=True))
  key_features = jnp.exp(key_log_features - max_shift(key_max))
  query_features = _group_queries(query_log_features, kv_heads)
  scores = jnp.einsum("bqkgm,bskm->bkgqs", query_features, key_features)
  scores = jnp.where(visible[:, None, None], scores, 0.0).reshape(batch, heads, q_len, kv_len)
  total = jnp.sum(scores, axis=-1, keepdims=True)
  return jnp.where(total > 0, scores, 0.0) / jnp.where(total > 0, total, 1.0)


def linear_attention(query: jax.Array, key: jax.Array, value: jax.Array, *, causal: bool = False,
                     kv_valid: jax.Array | None = None, segment_ids: jax.Array | None = None,
                     chunk_size: int = 64) -> jax.Array:
  """Linear attention with `phi(x) = elu(x) + 1` (Katharopoulos et al. 2020); no `1/sqrt(d)` scale.

  Args:
    query: `[batch, len, heads, head_dim]`; key `[batch, kv_len, kv_heads, head_dim]`; value
      `[batch, kv_len, kv_heads, value_dim]`.
    causal: query `i` sees keys `j <= i` (then `len == kv_len`).
    kv_valid: bool `[batch, kv_len]`, False = padding (non-causal; causal calls use `segment_ids`).
    segment_ids: causal only: int `[batch, len]`, packed contiguous segments, 0 = padding.
    chunk_size: causal chunk length.

  Returns:
    `[batch, len, heads, value_dim]` in value's dtype.
  """
  return _attend(elu_log_features(query), elu_log_features(key), value, causal=causal,
                 kv_valid=kv_valid, segment_ids=segment_ids, chunk_size=chunk_size)


def performer_attention(query: jax.Array, key: jax.Array, value: jax.Array, projection: jax.Array,
                        *, causal: bool = False, kv_valid: jax.Array | None = None,
                        segment_ids: jax.Array | None = None, chunk_size: int = 64) -> jax.Array:
  """Performer FAVOR+ attention: an unbiased random-feature estimate of softmax attention.

  `projection` `[num_features, head_dim]` from `orthogonal_projection` (draw a new one to redraw the
  features). Other arguments as `linear_attention`; the softmax being estimated uses the standard
  scale `1/sqrt(head_dim)`.
  """
  return _attend(performer_log_features(query, projection), performer_log_features(key, projection),
                 value, causal=causal, kv_valid=kv_valid, segment_ids=segment_ids,
                 chunk_size=chunk_size)


def _attend(query_log_features, key_log_features, value, *, causal, kv_valid, segment_ids,
            chunk_size):
  if not causal:
    if segment_ids is not None:
      raise ValueError("segment_ids are only supported with causal=True; pass kv_valid for padding")
    return kernelized_attention(query_log_features, key_log_features, value, kv_valid=kv_valid)
  if kv_valid is not None:
    raise ValueError("causal calls take padding as segment_ids (0 = padding), not kv_valid")
  out, _ = causal_kernelized_attention(query_log_features, key_log_features, value,
                                       segment_ids=segment_ids, chunk_size=chunk_size)
  return out
