"""Decoder-only language model (`DecoderLM`): GPT-2 / Llama style, with a KV cache."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.attention import Mask
from flaxattn.models.common import (cache_length, check_ids, self_attention_mask, token_positions,
                                    valid_tokens)
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.hooks import hook
from flaxattn.nn.layers import Dense
from flaxattn.nn.transformer import Decoder, Embedder


class DecoderLM(nnx.Module):
  """Embeddings + causal `Decoder` + output head: `model(input_ids)` -> logits `[batch, len, vocab]`.

  Calls return `(logits, cache)` whatever the arguments (`cache` None without one).
  The output is tied (`config.tie_embeddings`: `embedder.token.attend`) or a separate `lm_head`
  (`kernel [embed, vocab]`). Logits are float32 whatever the compute dtype.

  Incremental decoding: `cache = model.init_cache(batch, max_length)`, then
  `logits, cache = model(ids, attention_mask, cache=cache)` for the prompt and again for each new token
  (`attention_mask` then all ones, or None). Padding may be anywhere in the prompt (left padding keeps
  every row's last prompt token in the last column); each row's positions count only its real tokens,
  so the logits of real tokens equal those of the unpadded sequence run alone, with or without cache.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.decoder = Decoder(config, rngs=rngs)
    self.lm_head = (None if config.tie_embeddings else
                    Dense(config.d_model, config.vocab_size, in_axes=("embed",), out_axes=("vocab",),
                          use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                          rngs=rngs))

  def init_cache(self, batch: int, max_length: int | None = None, dtype: Any = None):
    """An empty cache for `batch` rows of up to `max_length` tokens (default `config.max_length`),
    prompt included. A pytree: pass it through `jax.jit` like any array. With learned positions,
    `max_length` may not exceed `config.max_length` (ValueError).
    """
    return self.decoder.init_cache(batch, cache_length(self.config, max_length), dtype)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
               cache=None, deterministic: bool = True, dropout_rng: jax.Array | None = None,
               logits_at: jax.Array | None = None):
    """Next-token logits.

    Args:
      input_ids: int `[batch, length]`.
      attention_mask: `[batch, length]`, 1 = real token, 0 = padding, or None (all real).
      positions: int `[batch, length]`; default: real tokens counted from 0, or from the cache's
        count (-1 marks padding).
      segment_ids: int `[batch, length]` for packed rows (several documents in one row): tokens attend
        only within their own segment (0 marks padding). Give `positions` restarting at 0 in each
        document with it. Not with a cache.
      cache: from `init_cache`; the call appends these tokens and returns the new cache.
      logits_at: int `[batch]`: the logits of one position per row only, `[batch, 1, vocab]` (a
        prompt's last real token in generation: the vocabulary projection of the other positions is
        skipped).

    Returns:
      `(logits, cache)`: logits `[batch, length, vocab]` float32 and the new cache (None without
      one). Attention weights: `flaxattn.nn.capture_attention_weights(model, ...)` (with a cache, `kv` is
      the cache length).
    """
    check_ids("input_ids", input_ids)
    valid = valid_tokens("attention_mask", input_ids, attention_mask)
    if positions is None:
      start = 0 if cache is None else self.decoder.next_positions(cache)
      positions = token_positions(input_ids, valid, start)
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = self.embedder(input_ids, positions, deterministic=deterministic, dropout_rng=keys[0])
    if segment_ids is not None:
      if cache is not None:
        raise ValueError("segment_ids (packed rows) cannot be combined with a cache")
      if tuple(jnp.shape(segment_ids)) != tuple(input_ids.shape):
        raise ValueError(f"segment_ids must match the ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(jnp.shape(segment_ids))}")
      segments = jnp.asarray(segment_ids, jnp.int32)
      mask = Mask(causal=True, q_segment_ids=segments, kv_segment_ids=segments)
    else:
      mask = None if cache is not None else self_attention_mask(valid, causal=True)
    hidden, cache = self.decoder(x, positions=positions, mask=mask, cache=cache,
                                 deterministic=deterministic, dropout_rng=keys[1])
    if logits_at is not None:
      if tuple(jnp.shape(logits_at)) != (input_ids.shape[0],):
        raise ValueError(f"logits_at must have shape [batch] = {(input_ids.shape[0],)}, got "
                         f"{tuple(jnp.shape(logits_at))}")
      hidden = jnp.take_along_axis(hidden, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
    logits = (self.embedder.token.attend(hidden) if self.lm_head is None else self.lm_head(hidden))
    return hook(self, "logits", logits.astype(jnp.float32)), cache
