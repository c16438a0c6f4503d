"""Transformer blocks and stacks: `TransformerBlock`, `Encoder`, `Decoder`, and the input `Embedder`.

Stacks are scanned (`config.scan_layers`: one block's parameters stacked on a leading `layers` axis and
applied with `jax.lax.scan`, so compile time stays flat in depth) or unrolled (an `nnx.List` of
blocks). Both run every block through the same function (`run_block` in `TransformerStack.__call__`),
rematerialised per `config.remat`, so for the same weights they give the same outputs.

Blocks and stacks return `(x, cache)` whatever the arguments (`cache` None without one), as
`MultiHeadAttention` does; `Encoder`, which never decodes, returns `x`. Attention weights and other
intermediates are sown (`flaxattn.nn.intermediates`), never returned.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.attention import BlockMask, Mask
from flaxattn.nn.attention import ContextCache, KVCache, MultiHeadAttention
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.hooks import hook, hook_layer
from flaxattn.nn.intermediates import resow
from flaxattn.nn.layers import MLP, Embed, dropout, make_norm
from flaxattn.nn.positions import LearnedPositions, PositionBias, RelativePositionBias, sinusoidal
from flaxattn.nn.sharding import constrain

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def positions_from_mask(valid: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Positions of the real tokens in each row, -1 for padding.

  `valid`: bool `[batch, length]` (True = real token, padding anywhere); `start`: int `[batch]` or
  scalar, the position of each row's first real token (the tokens already in a cache). Returns int32
  `[batch, length]`: `start + (number of real tokens before this one)` for real tokens.
  """
  counted = jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1 + jnp.reshape(start, (-1, 1))
  return jnp.where(valid, counted, -1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecoderCache:
  """A decoder stack's cache, from `TransformerStack.init_cache`; callers treat it as opaque.

  Attributes:
    self_attention: a `KVCache` per layer (a `RecurrentState` for kernelized attention kinds): one
      with a leading `[layers]` axis when scanned, a tuple
      when unrolled.
    context: with cross-attention, a `ContextCache` per layer in the same layout (empty until the
      first call with a context projects its keys/values), else None.
  """

  self_attention: Any
  context: Any


class Embedder(nnx.Module):
  """Token ids -> input vectors: token (+ absolute position) (+ token type) embeddings, then the
  optional embedding norm and dropout. Submodules: `token` (`Embed`, whose `attend` ties the output),
  `position` (`LearnedPositions`, for 'learned'), `token_type` (`Embed`), `norm`.
  """

  def __init__(self, config: TransformerConfig, *, vocab_size: int | None = None, rngs: nnx.Rngs):
    self.config = config
    dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
    self.token = Embed(config.vocab_size if vocab_size is None else vocab_size, config.d_model,
                       rngs=rngs, **dtypes)
    self.position = (LearnedPositions(config.max_length, config.d_model, rngs=rngs, **dtypes)
                     if config.positions == "learned" else None)
    self.token_type = (Embed(config.type_vocab_size, config.d_model, vocab_axis=None, rngs=rngs,
                             **dtypes) if config.type_vocab_size else None)
    self.norm = (make_norm(config.norm, config.d_model, eps=config.norm_eps, rngs=rngs, **dtypes)
                 if config.embedding_norm else None)

  def __call__(self, ids: jax.Array, positions: jax.Array, token_type_ids: jax.Array | None = None,
               *, deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
    """`ids`, `positions`, `token_type_ids`: int `[batch, length]` -> `[batch, length, d_model]`."""
    for name, array in (("positions", positions), ("token_type_ids", token_type_ids)):
      if array is not None and tuple(array.shape) != tuple(ids.shape):
        raise ValueError(f"{name} must match the ids' shape {tuple(ids.shape)}, got {tuple(array.shape)}")
      if array is not None and not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer, got dtype {array.dtype}")
    x = self.token(ids)
    if self.config.positions == "learned":
      x = x + self.position(positions)
    elif self.config.positions == "sinusoidal":
      x = x + sinusoidal(positions, self.config.d_model, dtype=x.dtype)
    if self.token_type is not None:
      x = x + self.token_type(jnp.zeros_like(ids) if token_type_ids is None else token_type_ids)
    elif token_type_ids is not None:
      raise ValueError("token_type_ids given but config.type_vocab_size is 0")
    if self.norm is not None:
      x = self.norm(x)
    x = dropout(x, self.config.dropout_rate, dropout_rng, deterministic)
    return constrain(x, ("batch", "length", "embed"))


class TransformerBlock(nnx.Module):
  """Self-attention, optional cross-attention, and MLP, each a residual sub-layer with dropout.

  Pre-LN (`config.pre_norm`): `x + drop(f(norm(x)))`; post-LN: `norm(x + drop(f(x)))`. Submodules:
  `attention_norm`, `attention`, (`cross_norm`, `cross_attention`), `mlp_norm`, `mlp`.
  """

  def __init__(self, config: TransformerConfig, *, cross_attention: bool = False, rngs: nnx.Rngs):
    self.config = config
    dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
    norm = lambda: make_norm(config.norm, config.d_model, eps=config.norm_eps, rngs=rngs, **dtypes)
    attention = dict(
        kv_heads=config.kv_heads, head_dim=config.head_dim, use_bias=config.use_bias,
        attention_dropout_rate=config.attention_dropout_rate, qk_norm=config.qk_norm,
        norm_eps=config.norm_eps, softcap=config.softcap, attention_impl=config.attention_impl,
        rngs=rngs, **dtypes)
    self.attention_norm = norm()
    self.attention = MultiHeadAttention(
        config.num_heads, config.d_model,
        positions=config.positions if config.positions in ("rope", "alibi") else "none",
        rope_base=config.rope_base, rotary_dim=config.rotary_dim,
        attention_kind=config.attention_kind, window=config.window,
        performer_features=config.performer_features, performer_seed=config.performer_seed,
        performer_redraw=config.performer_redraw, linear_chunk_size=config.linear_chunk_size,
        attention_sinks=config.attention_sinks, **attention)
    self.cross_norm = norm() if cross_attention else None
    self.cross_attention = (MultiHeadAttention(config.num_heads, config.d_model, **attention)
                            if cross_attention else None)
    self.mlp_norm = norm()
    self.mlp = MLP(config.d_model, config.mlp_dim, activation=config.activation,
                   gated=config.gated_mlp, use_bias=config.use_bias, rngs=rngs, **dtypes)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: Mask | None = None,
               bias: jax.Array | None = None, context: jax.Array | None = None,
               context_mask: Mask | None = None, cache: KVCache | None = None,
               context_cache: ContextCache | None = None, deterministic: bool = True,
               dropout_rng: jax.Array | None = None, position_bias: PositionBias | None = None,
               block_mask: BlockMask | None = None):
    """One block on `x` `[batch, length, d_model]`.

    `cache` is the self-attention `KVCache` (or `RecurrentState`); `context_cache` a filled
    `ContextCache` of the cross-attention keys/values (then `context` is not projected again and
    may be None); `position_bias` the stack's T5 bias for self-attention; `block_mask` the stack's
    shared self-attention block mask (`MultiHeadAttention.shared_block_mask`). Returns `(x, cache)`:
    the new self-attention cache, None without one.
    """
    if self.cross_attention is not None and context is None and context_cache is None:
      raise ValueError("this block has cross-attention: context (or context_cache) must be given")
    keys = jax.random.split(dropout_rng, 5) if dropout_rng is not None else [None] * 5
    x = hook(self, "resid_pre", x)
    h, cache = self.attention(self._in(self.attention_norm, x), mask=mask, bias=bias,
                              positions=positions, cache=cache, deterministic=deterministic,
                              dropout_rng=keys[0], position_bias=position_bias,
                              block_mask=block_mask)
    x = hook(self, "resid_mid", self._residual(self.attention_norm, x, h, keys[1], deterministic))
    if self.cross_attention is not None:
      h, _ = self.cross_attention(self._in(self.cross_norm, x), context, mask=context_mask,
                                  cache=context_cache, deterministic=deterministic,
                                  dropout_rng=keys[2])
      x = self._residual(self.cross_norm, x, h, keys[3], deterministic)
    h = self.mlp(self._in(self.mlp_norm, x))
    x = self._residual(self.mlp_norm, x, h, keys[4], deterministic)
    return hook(self, "resid_post", constrain(x, ("batch", "length", "embed"))), cache

  def _in(self, norm, x):
    """A sub-layer's input: `norm(x)` with pre-LN, `x` with post-LN."""
    return norm(x) if self.config.pre_norm else x

  def _residual(self, norm, x, h, key, deterministic):
    """The residual add of a sub-layer's output `h`: `x + drop(h)` (pre-LN) or `norm(x + drop(h))`
    (post-LN)."""
    x = x + dropout(h, self.config.dropout_rate, key, deterministic)
    return x if self.config.pre_norm else norm(x)


class TransformerStack(nnx.Module):
  """`num_layers` blocks (scanned or unrolled), an optional shared T5 relative bias, a final norm.

  Submodules: `layers` (scanned: one `TransformerBlock` whose parameters have a leading `layers`
  axis; unrolled: an `nnx.List` of blocks), `relative_bias`, `final_norm`.
  """

  def __init__(self, config: TransformerConfig, *, num_layers: int, causal: bool,
               cross_attention: bool, rngs: nnx.Rngs):
    self.config, self.num_layers, self.causal = config, num_layers, causal
    self.has_cross_attention = cross_attention
    if config.scan_layers:
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def create(rngs):
        return TransformerBlock(config, cross_attention=cross_attention, rngs=rngs)

      self.layers = create(rngs)
    else:
      self.layers = nnx.List([TransformerBlock(config, cross_attention=cross_attention, rngs=rngs)
                              for _ in range(num_layers)])
    self.relative_bias = (
        RelativePositionBias(config.num_heads, num_buckets=config.relative_buckets,
                             max_distance=config.relative_max_distance, bidirectional=not causal,
                             param_dtype=config.param_dtype, rngs=rngs)
        if config.positions == "relative" else None)
    self.final_norm = (make_norm(config.norm, config.d_model, eps=config.norm_eps,
                                 dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
                       if config.final_norm else None)

  def init_cache(self, batch: int, max_length: int, dtype: Any = None) -> DecoderCache:
    """An empty `DecoderCache` for `batch` rows of up to `max_length` tokens (dtype defaults to the
    compute dtype). With cross-attention it also holds each layer's context keys/values, projected
    on the first call and reused by the later ones. Treat it as opaque; `next_positions` reads it.
    """
    config = self.config
    dtype = config.dtype if dtype is None else dtype
    # Every layer's attention has the same shapes: the first (or the scanned) block's tells them.
    block = self._block()
    caches = [lambda: block.attention.init_cache(batch, max_length, dtype)]
    if self.has_cross_attention:
      caches.append(lambda: block.cross_attention.init_context_cache(batch, dtype))
    if config.scan_layers:
      stacked = [jax.tree.map(lambda a: jnp.broadcast_to(a, (self.num_layers,) + a.shape), one())
                 for one in caches]
    else:
      stacked = [tuple(one() for _ in range(self.num_layers)) for one in caches]
    return DecoderCache(stacked[0], stacked[1] if self.has_cross_attention else None)

  def _block(self) -> TransformerBlock:
    """The block whose static settings all layers share: the scanned one, or the first."""
    return self.layers if self.config.scan_layers else self.layers[0]

  def _first_layer(self, caches):
    return jax.tree.map(lambda a: a[0], caches) if self.config.scan_layers else caches[0]

  def next_positions(self, cache: DecoderCache) -> jax.Array:
    """int32 `[batch]`: the position each row's next real token takes, given this stack's cache."""
    return self._first_layer(cache.self_attention).next_positions()

  def _context_caches(self, caches, context: jax.Array | None):
    """The per-layer `ContextCache`s, projected from `context` when still empty."""
    if self._first_layer(caches).filled:
      return caches
    if context is None:
      raise ValueError("the cache holds no context keys/values yet: context must be given")
    dtype = self._first_layer(caches).key.dtype
    if not self.config.scan_layers:
      return tuple(block.cross_attention.context_cache(context, dtype) for block in self.layers)
    graphdef, state = nnx.split(self.layers)
    return jax.lax.map(
        lambda layer: nnx.merge(graphdef, layer).cross_attention.context_cache(context, dtype), state)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: Mask | None = None,
               context: jax.Array | None = None, context_mask: Mask | None = None, cache=None,
               deterministic: bool = True, dropout_rng: jax.Array | None = None):
    """Runs the blocks on `x` `[batch, length, d_model]`; returns `(x, cache)`.

    Args:
      positions: int `[batch, length]`, -1 for padding (see `positions_from_mask`).
      mask: self-attention `Mask` (without a cache).
      context, context_mask: encoder output `[batch, src_len, d_model]` and its mask, for
        cross-attention.
      cache: from `init_cache` (causal stacks only). With cross-attention, the first call fills the
        cache's context keys/values from `context`; later calls reuse them (`context` is then only
        shape-checked, and may be None).

    Returns:
      `(x, cache)`: `x` after the final norm, and the new `DecoderCache` (None without one). What
      the blocks sow is sown on `layers` (stacked on a leading `[layers]` axis when scanned).
    """
    config = self.config
    if cache is not None and not self.causal:
      raise ValueError("a cache is only for causal (decoder) stacks")
    if cache is not None and not isinstance(cache, DecoderCache):
      raise ValueError(f"cache must come from init_cache (a DecoderCache), got {type(cache).__name__}")
    context_caches = None
    if cache is not None and self.has_cross_attention:
      context_caches = self._context_caches(cache.context, context)
    cache = None if cache is None else cache.self_attention
    # The table as a value; each layer materialises it or applies it as a score_mod (its keys'
    # positions, with a cache, are the cache's slots).
    position_bias = None if self.relative_bias is None else self.relative_bias.as_bias()
    x = hook(self, "embed", x)
    # Every layer sees the same mask: on the flex path its tiles are classified once, here.
    block_mask = None if cache is not None else self._block().attention.shared_block_mask(
        mask, x.shape[0], x.shape[1], position_biased=position_bias is not None,
        deterministic=deterministic)

    def run_block(graphdef, x, layer_state, layer_cache, layer_context_cache, rng):
      # A pure function of the block's state (for scan and remat): what the block sows comes back
      # as a value, `sown`, for `resow`.
      block = nnx.merge(graphdef, layer_state)
      (x, layer_cache), sown = nnx.capture(block, nnx.Intermediate)(
          x, positions=positions, mask=mask, context=context, context_mask=context_mask,
          cache=layer_cache, context_cache=layer_context_cache, deterministic=deterministic,
          dropout_rng=rng, position_bias=position_bias, block_mask=block_mask)
      return x, layer_cache, sown

    if config.remat != "none":
      run_block = jax.checkpoint(run_block, policy=_REMAT_POLICIES[config.remat],
                                 static_argnums=(0,))
    rngs = (None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers))

    if config.scan_layers:
      graphdef, state = nnx.split(self.layers)

      # The stacked cache rides in the carry and each layer's slice is updated in place: as a
      # scanned input/output it is copied whole every step (SmolLM2-sized decoding, batch 8, CPU:
      # 1.6x slower step). The context keys/values are only read, so they are a scanned input.
      def body(carry, xs):
        x, cache = carry
        layer_state, index, rng, layer_context_cache = xs
        layer_cache = None if cache is None else jax.tree.map(lambda a: a[index], cache)
        with hook_layer(index):
          x, layer_cache, sown = run_block(graphdef, x, layer_state, layer_cache,
                                           layer_context_cache, rng)
        if cache is not None:
          cache = jax.tree.map(lambda a, u: jax.lax.dynamic_update_index_in_dim(a, u, index, 0),
                               cache, layer_cache)
        return (x, cache), sown

      (x, cache), sown = jax.lax.scan(
          body, (x, cache), (state, jnp.arange(self.num_layers), rngs, context_caches))
      resow(self.layers, sown)
    else:
      new_cache = []
      for i, block in enumerate(self.layers):
        graphdef, state = nnx.split(block)
        with hook_layer(i):
          x, layer_cache, sown = run_block(
              graphdef, x, state, None if cache is None else cache[i],
              None if context_caches is None else context_caches[i],
              None if rngs is None else rngs[i])
        new_cache.append(layer_cache)
        resow(block, sown)
      cache = None if cache is None else tuple(new_cache)
    if self.final_norm is not None:
      x = hook(self, "final_norm", self.final_norm(x))
    return x, (None if cache is None else DecoderCache(cache, context_caches))


class Encoder(TransformerStack):
  """Bidirectional stack of `config.num_layers` blocks (no cross-attention, no cache)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    super().__init__(config, num_layers=config.num_layers, causal=False, cross_attention=False,
                     rngs=rngs)

  def __call__(self, x: jax.Array, *, positions: jax.Array, mask: Mask | None = None,
               deterministic: bool = True, dropout_rng: jax.Array | None = None) -> jax.Array:
    """`x` `[batch, length, d_model]` through the blocks and the final norm (see
    `TransformerStack.__call__`); an encoder never decodes, so only `x` comes back."""
    x, _ = super().__call__(x, positions=positions, mask=mask, deterministic=deterministic,
                            dropout_rng=dropout_rng)
    return x


class Decoder(TransformerStack):
  """Causal stack; with `cross_attention=True` (encoder-decoder) each block also attends to a context.

  `num_layers` defaults to `config.num_layers` without cross-attention and `config.decoder_layers`
  with it. The causal mask comes from the caller (`Mask(causal=True, ...)`) or, with a cache, from
  the cache's positions.
  """

  def __init__(self, config: TransformerConfig, *, cross_attention: bool = False,
               num_layers: int | None = None, rngs: nnx.Rngs):
    if num_layers is None:
      num_layers = config.decoder_layers if cross_attention else config.num_layers
    super().__init__(config, num_layers=num_layers, causal=True, cross_attention=cross_attention,
                     rngs=rngs)
