"""LSTM and GRU layers (optionally bidirectional, padding-aware) and a recurrent + self-attention
encoder, for comparing recurrent and attention models.

Gate equations and parameter layout follow `torch.nn.LSTM` / `torch.nn.GRU` (two biases, gate order
i, f, g, o for the LSTM and r, z, n for the GRU), so weights copy across one to one:
`input_kernel [features, gates, hidden] = weight_ih.T`, `recurrent_kernel [hidden, gates, hidden] =
weight_hh.T`, `input_bias`/`recurrent_bias [gates, hidden] = bias_ih`/`bias_hh`.

Padding: a padded step leaves the state unchanged and outputs zeros. The backward direction scans the
sequence reversed, so it meets a row's trailing padding first (with the initial state) and starts
on the row's last real token: the same as `torch.nn.utils.rnn.pack_padded_sequence`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.attention import Mask
from flaxattn.nn.attention import MultiHeadAttention
from flaxattn.nn.layers import Embed, LayerNorm
from flaxattn.nn.pooling import AttentionPooling
from flaxattn.nn.sharding import param

CELLS = {"lstm": 4, "gru": 3}  # gates per cell


class RecurrentCell(nnx.Module):
  """One direction of an LSTM (`kind='lstm'`) or GRU (`kind='gru'`) layer."""

  def __init__(self, kind: str, in_features: int, hidden: int, *, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if kind not in CELLS:
      raise ValueError(f"kind must be one of {sorted(CELLS)}, got {kind!r}")
    self.kind, self.hidden, self.dtype = kind, hidden, dtype
    gates = CELLS[kind]
    # torch's default: uniform(-1/sqrt(hidden), 1/sqrt(hidden)) for every weight and bias.
    bound = hidden ** -0.5
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.input_kernel = param(rngs, init, (in_features, gates, hidden), ("embed", None, "mlp"),
                              param_dtype)
    self.recurrent_kernel = param(rngs, init, (hidden, gates, hidden), (None, None, "mlp"),
                                  param_dtype)
    self.input_bias = param(rngs, init, (gates, hidden), (None, "mlp"), param_dtype)
    self.recurrent_bias = param(rngs, init, (gates, hidden), (None, "mlp"), param_dtype)

  def __call__(self, x: jax.Array, valid: jax.Array, *, reverse: bool = False):
    """Runs over time. `x`: `[batch, length, in_features]`; `valid`: bool `[batch, length]`.

    Returns `(outputs [batch, length, hidden], final_hidden [batch, hidden])`.
    """
    cast = lambda v: v[...].astype(self.dtype)
    # The input projection of every step at once; only the recurrent matmul stays in the loop.
    inputs = jnp.einsum("btd,dgh->btgh", x.astype(self.dtype), cast(self.input_kernel)) + cast(
        self.input_bias)
    recurrent_kernel, recurrent_bias = cast(self.recurrent_kernel), cast(self.recurrent_bias)
    batch = x.shape[0]
    h = jnp.zeros((batch, self.hidden), self.dtype)
    carry = (h, h) if self.kind == "lstm" else (h,)

    def step(carry, xs):
      projected, keep = xs
      h = carry[0]
      recurrent = jnp.einsum("bh,hgk->bgk", h, recurrent_kernel) + recurrent_bias
      if self.kind == "lstm":
        gates = projected + recurrent
        i, f, g, o = (gates[:, k] for k in range(4))
        c = jax.nn.sigmoid(f) * carry[1] + jax.nn.sigmoid(i) * jnp.tanh(g)
        new = (jax.nn.sigmoid(o) * jnp.tanh(c), c)
      else:
        r = jax.nn.sigmoid(projected[:, 0] + recurrent[:, 0])
        z = jax.nn.sigmoid(projected[:, 1] + recurrent[:, 1])
        n = jnp.tanh(projected[:, 2] + r * recurrent[:, 2])
        new = ((1.0 - z) * n + z * h,)
      keep = keep[:, None]
      carry = tuple(jnp.where(keep, a, b) for a, b in zip(new, carry))
      return carry, jnp.where(keep, carry[0], 0.0)

    carry, outputs = jax.lax.scan(step, carry, (jnp.swapaxes(inputs, 0, 1), valid.T),
                                  reverse=reverse)
    return jnp.swapaxes(outputs, 0, 1), carry[0]


class Recurrent(nnx.Module):
  """An LSTM or GRU layer, optionally bidirectional (`forward`, `backward` cells).

  Call `(x [batch, length, in_features], valid [batch, length] bool or None)` ->
  `(outputs [batch, length, directions * hidden], final [batch, directions, hidden])`; outputs are
  the two directions concatenated (forward first, as torch), zero at padding.
  """

  def __init__(self, kind: str, in_features: int, hidden: int, *, bidirectional: bool = False,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    cell = lambda: RecurrentCell(kind, in_features, hidden, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    self.forward = cell()
    self.backward = cell() if bidirectional else None

  def __call__(self, x: jax.Array, valid: jax.Array | None = None):
    if x.ndim != 3:
      raise ValueError(f"x must be [batch, length, features], got shape {x.shape}")
    if valid is None:
      valid = jnp.ones(x.shape[:2], bool)
    elif tuple(valid.shape) != tuple(x.shape[:2]):
      raise ValueError(f"valid must be [batch, length] = {x.shape[:2]}, got shape {valid.shape}")
    valid = valid.astype(bool)
    outputs, final = self.forward(x, valid)
    if self.backward is None:
      return outputs, final[:, None]
    back_outputs, back_final = self.backward(x, valid, reverse=True)
    return (jnp.concatenate([outputs, back_outputs], -1), jnp.stack([final, back_final], 1))


def LSTM(in_features: int, hidden: int, **kwargs) -> Recurrent:
  """An LSTM layer (`torch.nn.LSTM` equations); see `Recurrent`."""
  return Recurrent("lstm", in_features, hidden, **kwargs)


def GRU(in_features: int, hidden: int, **kwargs) -> Recurrent:
  """A GRU layer (`torch.nn.GRU` equations); see `Recurrent`."""
  return Recurrent("gru", in_features, hidden, **kwargs)


class RecurrentAttentionEncoder(nnx.Module):
  """Token ids -> embeddings -> bidirectional LSTM/GRU -> self-attention (residual + LayerNorm) ->
  attention pooling. The hybrid encoders researchers compare with Transformers (e.g. Lin et al.'s
  structured self-attentive sentence embedding).

  Call `(ids [batch, length], valid [batch, length] or None)` -> `(sequence [batch, length,
  2 * hidden], pooled [batch, 2 * hidden])`.
  """

  def __init__(self, vocab_size: int, features: int, hidden: int, *, num_heads: int = 4,
               kind: str = "lstm", dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    self.embed = Embed(vocab_size, features, rngs=rngs, **dtypes)
    self.recurrent = Recurrent(kind, features, hidden, bidirectional=True, rngs=rngs, **dtypes)
    self.attention = MultiHeadAttention(num_heads, 2 * hidden, rngs=rngs, **dtypes)
    self.norm = LayerNorm(2 * hidden, rngs=rngs, **dtypes)
    self.pooling = AttentionPooling(2 * hidden, rngs=rngs, **dtypes)

  def __call__(self, ids: jax.Array, valid: jax.Array | None = None):
    valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
    sequence, _ = self.recurrent(self.embed(ids), valid)
    segments = valid.astype(jnp.int32)
    mask = Mask(q_segment_ids=segments, kv_segment_ids=segments)
    attended, _ = self.attention(sequence, mask=mask)
    sequence = self.norm(sequence + attended)
    return sequence, self.pooling(sequence, valid)
