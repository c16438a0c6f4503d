"""Encoder-decoder Transformer (`EncoderDecoder`) for translation and summarisation."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.models.common import (cache_length, check_ids, context_mask, self_attention_mask,
                                    token_positions, valid_tokens)
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.hooks import hook
from flaxattn.nn.layers import Dense
from flaxattn.nn.transformer import Decoder, Embedder, Encoder


class EncoderDecoder(nnx.Module):
  """`Encoder` over the source, causal `Decoder` with cross-attention over the target.

  Embeddings are shared (`share_embeddings=True`: one `embedder` for source and target, as in
  Vaswani et al. with a joint vocabulary) or separate (`source_embedder` with `source_vocab_size`
  rows, `embedder` for the target). The output is tied to the target embeddings
  (`config.tie_embeddings`) or a separate `lm_head`. `config.num_layers` encoder blocks,
  `config.decoder_layers` decoder blocks.

  `model(source_ids, target_ids, source_mask, target_mask)` -> logits `[batch, tgt_len, vocab]`;
  for decoding, `encoded = model.encode(source_ids, source_mask)` once, then
  `logits, cache = model.decode(target_ids, encoded, source_mask, cache=cache)` per step. The first
  call with a fresh cache projects the cross-attention keys/values of `encoded` into the cache; later
  steps reuse them and only project their new queries (`encoded` must then be the same source: only
  its shape is checked).
  """

  def __init__(self, config: TransformerConfig, *, share_embeddings: bool = True,
               source_vocab_size: int | None = None, rngs: nnx.Rngs):
    if share_embeddings and source_vocab_size not in (None, config.vocab_size):
      raise ValueError(
          f"source_vocab_size ({source_vocab_size}) must equal config.vocab_size "
          f"({config.vocab_size}) with share_embeddings=True")
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.source_embedder = (None if share_embeddings else
                            Embedder(config, vocab_size=source_vocab_size, rngs=rngs))
    self.encoder = Encoder(config, rngs=rngs)
    self.decoder = Decoder(config, cross_attention=True, rngs=rngs)
    self.lm_head = (None if config.tie_embeddings else
                    Dense(config.d_model, config.vocab_size, in_axes=("embed",), out_axes=("vocab",),
                          use_bias=False, dtype=config.dtype, param_dtype=config.param_dtype,
                          rngs=rngs))

  def init_cache(self, batch: int, max_length: int | None = None, dtype: Any = None):
    """An empty decoder cache for `batch` targets of up to `max_length` tokens: self-attention keys and
    values, plus room for the cross-attention keys/values that the first `decode` call projects from
    the encoder output (the source length is not needed here). With learned positions, `max_length`
    may not exceed `config.max_length` (ValueError)."""
    return self.decoder.init_cache(batch, cache_length(self.config, max_length), dtype)

  def encode(self, source_ids: jax.Array, source_mask: jax.Array | None = None, *,
             deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Source ids `[batch, src_len]` (mask: 1 = real) -> encoded `[batch, src_len, d_model]`."""
    check_ids("source_ids", source_ids)
    valid = valid_tokens("source_mask", source_ids, source_mask)
    positions = token_positions(source_ids, valid)
    embedder = self.embedder if self.source_embedder is None else self.source_embedder
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = embedder(source_ids, positions, deterministic=deterministic, dropout_rng=keys[0])
    return self.encoder(x, positions=positions, mask=self_attention_mask(valid, causal=False),
                        deterministic=deterministic, dropout_rng=keys[1])

  def decode(self, target_ids: jax.Array, encoded: jax.Array, source_mask: jax.Array | None = None,
             target_mask: jax.Array | None = None, *, cache=None, deterministic: bool = True,
             dropout_rng: jax.Array | None = None):
    """Target ids `[batch, tgt_len]` attending to `encoded`: `(logits, cache)`, logits
    `[batch, tgt_len, vocab]` float32 and the new cache (None without one)."""
    check_ids("target_ids", target_ids)
    if encoded.ndim != 3 or encoded.shape[0] != target_ids.shape[0]:
      raise ValueError(
          f"encoded must be [batch={target_ids.shape[0]}, src_len, d_model], got {encoded.shape}")
    valid = valid_tokens("target_mask", target_ids, target_mask)
    source_valid = (None if source_mask is None else
                    valid_tokens("source_mask", jnp.zeros(encoded.shape[:2], jnp.int32), source_mask))
    start = 0 if cache is None else self.decoder.next_positions(cache)
    positions = token_positions(target_ids, valid, start)
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = self.embedder(target_ids, positions, deterministic=deterministic, dropout_rng=keys[0])
    hidden, cache = self.decoder(
        x, positions=positions, mask=None if cache is not None else self_attention_mask(valid, causal=True),
        context=encoded, context_mask=context_mask(source_valid), cache=cache,
        deterministic=deterministic, dropout_rng=keys[1])
    logits = self.embedder.token.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return hook(self, "logits", logits.astype(jnp.float32)), cache

  def __call__(self, source_ids: jax.Array, target_ids: jax.Array,
               source_mask: jax.Array | None = None, target_mask: jax.Array | None = None, *,
               deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Teacher-forced logits `[batch, tgt_len, vocab]` (float32)."""
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    encoded = self.encode(source_ids, source_mask, deterministic=deterministic, dropout_rng=keys[0])
    logits, _ = self.decode(target_ids, encoded, source_mask, target_mask,
                            deterministic=deterministic, dropout_rng=keys[1])
    return logits
