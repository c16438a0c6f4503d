"""`AttentionProbe`: what one attention call sows so its weights can be recomputed from the lse.

With `MultiHeadAttention.sow_probes` set, each softmax attention call sows an `AttentionProbe`:
the query and key exactly as the kernel got them (after QK norm and RoPE; the key with its
`kv_heads`), the log-sum-exp of each query row, and the call's mods as data (the `Mask`, the
position biases with the positions they read, a `bias=` array, the softcap). The kernel named by
the config runs unchanged; the lse is the kernel's own where it gives one (the flex path:
position biases, sinks), else one streaming `flex_attention` pass over the same mods (blockwise,
O(length) memory). Sinks need nothing more: the lse includes them, so the recomputed weights of a
row sum to `1 - ` its mass on the sink.

From a probe, `rows`, `statistics` and `pooled` (`flaxattn.attention.probes` underneath) give the
exact weights of chosen rows, per-query statistics, and a coarse `[q_bins, kv_bins]` map, none of
which holds a `[q_len, kv_len]` array (except `rows` over every row, which is that array).

A probe is a pytree (the softcap and scale are static), so it leaves a scanned stack stacked on a
`[layers]` axis like any sown array; `flaxattn.nn.capture_attention_probes` hands out one per
layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import attention_rows, attention_statistics, flex_attention
from flaxattn.attention.mask import Mask
from flaxattn.attention.probes import mask_to_mask_mod
from flaxattn.nn.positions import PositionBias, capped

Array = Any


def _static(**kwargs):
  return dataclasses.field(metadata=dict(static=True), **kwargs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionProbe:
  """One attention call, as the probes need it.

  Attributes:
    query: `[batch, q_len, heads, head_dim]`, as fed to the kernel.
    key: `[batch, kv_len, kv_heads, head_dim]`, as fed to the kernel.
    lse: float32 `[batch, heads, q_len]` (flex_attention's layout); non-finite: the row sees no key.
    mask: the call's `Mask` (window included), or None.
    biases: the position biases (`PositionBias`, ALiBi and/or T5), added after the softcap.
    positions: int32 `[batch, q_len]` query positions the biases read.
    kv_positions: int32 `[batch, kv_len]` key positions the biases read.
    bias: a `bias=` array broadcastable to `[batch, heads, q_len, kv_len]`, or None.
    softcap: the logit soft-cap, or None.
    scale: the logit scale (None: `head_dim ** -0.5`).
  """

  query: Array
  key: Array
  lse: Array
  mask: Mask | None
  biases: tuple[PositionBias, ...]
  positions: Array
  kv_positions: Array
  bias: Array | None = None
  softcap: float | None = _static(default=None)
  scale: float | None = _static(default=None)

  @classmethod
  def create(cls, query, key, value, lse=None, *, mask=None, biases=(), positions, kv_positions,
             bias=None, softcap=None, scale=None) -> "AttentionProbe":
    """The probe of a call; without `lse` (a kernel that gives none) it is computed here by
    `flex_attention` over the same mods (one extra pass, O(length) memory)."""
    probe = cls(query=query, key=key, lse=jnp.zeros(query.shape[:1] + query.shape[2:3] +
                                                    query.shape[1:2], jnp.float32),
                mask=mask, biases=tuple(biases), positions=positions, kv_positions=kv_positions,
                bias=None if bias is None else jnp.asarray(bias).reshape(
                    (1,) * (4 - jnp.ndim(bias)) + jnp.shape(bias)),
                softcap=softcap, scale=scale)
    if lse is None:
      score_mod, mask_mod = probe.mods()
      # The lse needs no values: one value channel keeps the pass at about the cost of QK^T.
      _, lse = flex_attention(query, key, value[..., :1], score_mod=score_mod, mask_mod=mask_mod,
                              scale=scale, return_lse=True)
    return dataclasses.replace(probe, lse=jax.lax.stop_gradient(lse).astype(jnp.float32))

  @property
  def q_len(self) -> int:
    return self.query.shape[1]

  @property
  def kv_len(self) -> int:
    return self.key.shape[1]

  def mods(self):
    """`(score_mod, mask_mod)` of the call, as `flex_attention` takes them (None where absent):
    the softcap first, then the position biases and the bias array added (as the kernels do)."""
    mods = [b.score_mod(self.positions, self.kv_positions) for b in self.biases]
    softcap, bias = self.softcap, self.bias
    if bias is not None:
      def add_bias(score, b, h, q, kv):
        index = [i if size > 1 else 0 for i, size in zip((b, h, q, kv), bias.shape)]
        return score + bias[tuple(index)].astype(jnp.float32)
      mods.append(add_bias)

    def score_mod(score, b, h, q_idx, kv_idx):
      score = capped(score, softcap)
      for mod in mods:
        score = mod(score, b, h, q_idx, kv_idx)
      return score

    mask = self.mask
    mask_mod = (None if mask is None or not mask.kinds else
                mask_to_mask_mod(mask, self.q_len, self.kv_len))
    return (score_mod if (mods or softcap is not None) else None), mask_mod

  def rows(self, rows) -> jax.Array:
    """float32 `[batch, heads, len(rows), kv_len]`: the exact weights of query rows `rows`."""
    score_mod, mask_mod = self.mods()
    return attention_rows(self.query, self.key, self.lse, rows, score_mod=score_mod,
                          mask_mod=mask_mod, scale=self.scale)

  def weights(self) -> jax.Array:
    """float32 `[batch, heads, q_len, kv_len]`: every row (O(q_len * kv_len): short inputs)."""
    return self.rows(np.arange(self.q_len))

  def statistics(self, *, sink_keys: int = 1) -> dict[str, jax.Array]:
    """Per-query `entropy`, `sink_mass` (on the first `sink_keys` keys), `max_weight`,
    `total_weight`, each float32 `[batch, heads, q_len]` (`attention_statistics`, streamed)."""
    score_mod, mask_mod = self.mods()
    return attention_statistics(self.query, self.key, self.lse, score_mod=score_mod,
                                mask_mod=mask_mod, scale=self.scale, sink_keys=sink_keys)

  def pooled(self, q_bins: int, kv_bins: int) -> jax.Array:
    """float32 `[batch, heads, q_bins, kv_bins]`: the attention map pooled into bins.

    Cell `(i, j)` is the mean over the queries of bin `i` of their total weight on the keys of bin
    `j` (so a row sums to a query's total weight: 1, or less with a sink). Bins are `ceil(length /
    bins)` tokens (the last may be shorter), so there may be fewer bins than asked, none empty.
    Computed one query bin at a time (`lax.map`), so memory is O(batch * heads * (q_len / q_bins)
    * kv_len), never the whole map.
    """
    q_size, kv_size = -(-self.q_len // q_bins), -(-self.kv_len // kv_bins)
    q_bins, kv_bins = -(-self.q_len // q_size), -(-self.kv_len // kv_size)  # None left empty.
    kv_pad = kv_bins * kv_size - self.kv_len
    score_mod, mask_mod = self.mods()

    def one_bin(index):
      rows = index * q_size + jnp.arange(q_size)
      valid = (rows < self.q_len).astype(jnp.float32)
      weights = attention_rows(self.query, self.key, self.lse, jnp.minimum(rows, self.q_len - 1),
                               score_mod=score_mod, mask_mod=mask_mod, scale=self.scale)
      weights = jnp.pad(weights, [(0, 0)] * 3 + [(0, kv_pad)])
      mass = weights.reshape(weights.shape[:3] + (kv_bins, kv_size)).sum(-1)
      return jnp.einsum("bhrk,r->bhk", mass, valid) / jnp.maximum(valid.sum(), 1.0)

    return jnp.moveaxis(jax.lax.map(one_bin, jnp.arange(q_bins)), 0, 2)
