"""BERT-like encoder (`EncoderModel`) and sequence classifier (`EncoderClassifier`)."""

from __future__ import annotations

import jax
from flax import nnx

from flaxattn.models.common import check_ids, self_attention_mask, token_positions, valid_tokens
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.hooks import hook
from flaxattn.nn.layers import Dense
from flaxattn.nn.pooling import POOLINGS, AttentionPooling, pool
from flaxattn.nn.transformer import Embedder, Encoder


class EncoderModel(nnx.Module):
  """Embeddings + bidirectional `Encoder`: `model(input_ids, attention_mask, token_type_ids)` ->
  last hidden states `[batch, length, d_model]` (BERT's `last_hidden_state`).

  Submodules: `embedder` (`Embedder`: `token`, `position`, `token_type`, `norm`), `encoder`.
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embedder = Embedder(config, rngs=rngs)
    self.encoder = Encoder(config, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, positions: jax.Array | None = None,
               deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
    """Encodes a batch.

    Args:
      input_ids: int `[batch, length]`.
      attention_mask: `[batch, length]`, 1 = real token, 0 = padding (anywhere), or None.
      token_type_ids: int `[batch, length]` segment ids (needs `config.type_vocab_size`), or None.
      positions: int `[batch, length]`; default counts real tokens from 0 (padding-invariant).
      deterministic, dropout_rng: dropout off, or on with this key.

    Returns:
      `[batch, length, d_model]`. Attention weights: `flaxattn.nn.capture_attention_weights(model, ...)`.
    """
    check_ids("input_ids", input_ids)
    valid = valid_tokens("attention_mask", input_ids, attention_mask)
    if positions is None:
      positions = token_positions(input_ids, valid)
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    x = self.embedder(input_ids, positions, token_type_ids, deterministic=deterministic,
                      dropout_rng=keys[0])
    return self.encoder(x, positions=positions, mask=self_attention_mask(valid, causal=False),
                        deterministic=deterministic, dropout_rng=keys[1])


class EncoderClassifier(nnx.Module):
  """`EncoderModel`, pooling ('first' token, 'mean' over real tokens, or learned 'attention'), and a
  linear head: `model(input_ids, attention_mask, token_type_ids)` -> logits `[batch, num_classes]`.

  Submodules: `encoder` (`EncoderModel`), `attention_pooling` (for 'attention'), `head`.
  """

  def __init__(self, config: TransformerConfig, num_classes: int, *, pooling: str = "first",
               rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if num_classes <= 0:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    self.pooling = pooling
    self.encoder = EncoderModel(config, rngs=rngs)
    self.attention_pooling = (AttentionPooling(config.d_model, dtype=config.dtype,
                                               param_dtype=config.param_dtype, rngs=rngs)
                              if pooling == "attention" else None)
    self.head = Dense(config.d_model, num_classes, in_axes=("embed",), out_axes=(None,),
                      dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None, *, deterministic: bool = True,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """Class logits `[batch, num_classes]` (float32)."""
    hidden = self.encoder(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                          dropout_rng=dropout_rng)
    valid = valid_tokens("attention_mask", input_ids, attention_mask)
    logits = self.head(pool(self.pooling, hidden, valid, self.attention_pooling)).astype("float32")
    return hook(self, "logits", logits)
