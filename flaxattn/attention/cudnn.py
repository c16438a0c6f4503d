"""cuDNN fused attention (`jax.nn.dot_product_attention(implementation='cudnn')`), GPU only.

What cuDNN runs (jax 0.10.2, `jax/_src/cudnn/fused_attention_stablehlo.py`): float16/bfloat16; one
head_dim for query, key and value (value is zero-padded, as in `xla.py`), a multiple of 8 and at most
256 on Hopper and later (128 before); GQA/MQA; a top-left-aligned causal diagonal, which matches
flaxattn's end-aligned one only when `q_len == kv_len`; a sliding window bounded on the left only
(so windows must come with `causal=True`, which bounds the right side at 0); query/key lengths as
padding; an additive bias covering whole `[q_len, kv_len]` tiles, with even lengths when trained.
Segment ids, soft-capping, explicit mask arrays, dropout and weights are declined: the dispatcher
sends those calls to tokamax, blockwise or xla.

Under a multi-device mesh nothing is done here: jax registers cuDNN attention (forward and
backward) with `custom_partitioning`, so XLA runs it on each device's batch and heads as the
operands are sharded (query, key and value alike; never along length or head_dim). Checked in
jax 0.10.2's source; no multi-GPU run yet.

`cudnn_arguments` is the Call -> keyword translation, kept apart so it can be checked on a CPU by
feeding the same arguments to `jax.nn.dot_product_attention(implementation='xla')`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flaxattn.attention import rows
from flaxattn.attention.mask import Mask
from flaxattn.attention.spec import Call, Implementation


@functools.lru_cache(maxsize=None)
def max_head_dim() -> int:
  """cuDNN's head_dim limit on this machine's first GPU: 256 from Hopper (sm90) on, else 128."""
  try:
    device = jax.devices("gpu")[0]
  except RuntimeError:  # No GPU backend: the value is never used to run anything.
    return 128
  major = int(str(getattr(device, "compute_capability", "0")).split(".")[0])
  return 256 if major >= 9 else 128


def _constraints(call: Call) -> str | None:
  width = max(call.head_dim, call.value_dim)
  if width % 8 or width > max_head_dim():
    return (f"head_dim {width} (cuDNN needs a multiple of 8, at most {max_head_dim()}; value_dim is "
            f"padded to head_dim)")
  if call.masks & {"causal", "window"} and call.q_len != call.kv_len:
    return (f"causal/window masks with q_len != kv_len ({call.q_len} vs {call.kv_len}): cuDNN aligns "
            f"the diagonal top-left, flaxattn end-aligns it")
  if "window" in call.masks and "causal" not in call.masks:
    return "window without causal=True (cuDNN bounds a window on the left only)"
  if call.bias and (call.q_len % 2 or call.kv_len % 2):
    return f"bias with odd lengths (q_len {call.q_len}, kv_len {call.kv_len}; cuDNN trains on even)"
  return None


def cudnn_arguments(query, key, value, *, mask: Mask | None, bias, scale: float):
  """Translates a validated flaxattn call into `jax.nn.dot_product_attention` arguments.

  Args:
    query: `[batch, q_len, heads, head_dim]`.
    key: `[batch, kv_len, kv_heads, head_dim]`.
    value: `[batch, kv_len, kv_heads, value_dim]`.
    mask: a `Mask` of the kinds `_constraints` accepts (causal, window with causal, lengths), or None.
    bias: rank 4, broadcastable to `[batch, heads, q_len, kv_len]`, or None.
    scale: the logit scale.

  Returns:
    `(arrays, keywords, sees_any)`: `arrays` the `(query, key, value)` zero-padded to one head_dim;
    `keywords` for `jax.nn.dot_product_attention` (`bias`, `is_causal`, `local_window_size`,
    `query_seq_lengths`, `key_value_seq_lengths`, `scale`); `sees_any` `[batch, q_len]` bool, False
    for queries that see no key (their output must be zeroed; see `attention`).
  """
  batch, q_len, _, _ = query.shape
  kv_len = key.shape[1]
  arrays = rows.pad_to_one_head_dim(query, key, value)
  keywords = dict(scale=scale, is_causal=False, local_window_size=None, bias=None,
                  query_seq_lengths=None, key_value_seq_lengths=None)
  mask = mask if mask is not None else Mask()
  sees_any = rows.sees_any_key(mask, batch, q_len, kv_len)
  if mask.causal or mask.window is not None:
    # q_len == kv_len here, so the top-left diagonal is flaxattn's. The window's right side is
    # irrelevant under causal (it can only allow keys after the query, which causal removes).
    keywords["is_causal"] = True
    left = None if mask.window is None else mask.window[0]
    if left is not None:
      keywords["local_window_size"] = (left, 0)
  if mask.q_lengths is not None or mask.kv_lengths is not None:
    # The queries that see no key form a suffix of each row here (padding queries, and under a window
    # the queries more than `left` past the last key): declaring them query padding keeps cuDNN off
    # fully masked rows, whose softmax it may leave NaN. A row without keys keeps one key so the
    # kernel never meets an empty sequence; its queries are all padding then. Lengths past the end
    # are clipped: cuDNN reads that many keys.
    keywords["query_seq_lengths"] = jnp.sum(sees_any, axis=1, dtype=jnp.int32)
    kv_lengths = (jnp.full((batch,), kv_len, jnp.int32) if mask.kv_lengths is None
                  else jnp.asarray(mask.kv_lengths, jnp.int32))
    keywords["key_value_seq_lengths"] = jnp.clip(kv_lengths, 1, kv_len)
  if bias is not None:
    # cuDNN wants the bias in the input dtype and whole along both sequence axes.
    keywords["bias"] = jnp.broadcast_to(
        bias, bias.shape[:2] + (q_len, kv_len)).astype(query.dtype)
  return arrays, keywords, sees_any


def attention(query, key, value, *, mask: Mask | None, bias, scale: float, softcap, dropout_rate: float,
              dropout_rng, return_weights: bool, backend: str = "cudnn"):
  """Arguments as `flaxattn.attention.dot_product_attention`, already validated.

  `backend` is `jax.nn.dot_product_attention`'s `implementation`: 'cudnn' here; the tests pass 'xla'
  to check the translation on a CPU.
  """
  del softcap, dropout_rate, dropout_rng, return_weights  # Declined: the dispatcher never passes them.
  (query_padded, key_padded, value_padded), keywords, sees_any = cudnn_arguments(
      query, key, value, mask=mask, bias=bias, scale=scale)
  out = jax.nn.dot_product_attention(query_padded, key_padded, value_padded, implementation=backend,
                                     **keywords)[..., :value.shape[-1]]
  return rows.zero_rows_without_keys(out, sees_any)


IMPLEMENTATION = Implementation(
    name="cudnn",
    fn=attention,
    masks=frozenset({"causal", "window", "lengths"}),
    bias=True,
    softcap=False,
    dropout=False,
    weights=False,
    dtypes=frozenset({"bfloat16", "float16"}),
    platforms=frozenset({"gpu"}),
    memory="O(length)",
    notes=("cuDNN flash attention via jax.nn.dot_product_attention(implementation='cudnn'); "
           "head_dim multiple of 8 up to 256 (Hopper+) or 128; causal/window need q_len == kv_len, "
           "window needs causal; bias needs even lengths."),
    constraints=_constraints,
)
