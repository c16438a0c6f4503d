"""`TransformerConfig`: every knob of the flaxattn Transformer stacks and models, documented once."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTION_KINDS = ("softmax", "linear", "performer")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a Transformer encoder, decoder, or encoder-decoder.

  Attributes:
    vocab_size: number of token ids (embedding rows, output logits).
    d_model: width of the residual stream (`embed` axis).
    num_heads: query heads per attention layer.
    num_kv_heads: key/value heads (GQA/MQA); must divide `num_heads`. None = `num_heads`.
    head_dim: width of one head. None = `d_model // num_heads` (then `num_heads` must divide
      `d_model`).
    mlp_dim: hidden width of the MLP (`mlp` axis).
    num_layers: Transformer blocks in the stack (the encoder's, in an encoder-decoder).
    num_decoder_layers: decoder blocks of an encoder-decoder. None = `num_layers`.
    activation: MLP non-linearity: 'gelu' (exact erf form, BERT), 'gelu_tanh' (tanh approximation,
      GPT-2), 'relu' (original Transformer, T5), 'silu' (Llama).
    gated_mlp: gated MLP `down(act(gate(x)) * up(x))`: SwiGLU with 'silu', GeGLU with 'gelu'.
    norm: 'layernorm' (mean and variance, scale and bias) or 'rmsnorm' (root mean square, scale only).
    norm_eps: epsilon added to the variance in every norm (BERT 1e-12, Llama 1e-5).
    pre_norm: True: pre-LN (`x + f(norm(x))`, GPT-2 / Llama); False: post-LN (`norm(x + f(x))`, the
      original Transformer and BERT).
    use_bias: biases in attention and MLP projections (BERT yes, Llama no).
    final_norm: a norm after the last block (standard with pre-LN; BERT has none).
    positions: 'sinusoidal' (fixed, added to embeddings), 'learned' (table of `max_length` rows, added),
      'rope' (rotary, applied to queries and keys in every layer), 'alibi' (linear bias on the logits),
      'relative' (T5 bucketed bias, one table shared by the layers of a stack), 'none'.
    max_length: longest sequence for 'learned' positions (and the default cache length).
    rope_base: RoPE wavelength base (10000 originally; Llama 3 uses 500000, SmolLM2 100000).
    rope_fraction: fraction of `head_dim` that RoPE rotates (partial rotation, GPT-NeoX / Phi); the
      rest passes through. Rotation uses the Hugging Face Llama "half" layout: the rotated part
      `[x1, x2]` becomes `[x1 cos - x2 sin, x2 cos + x1 sin]` (`rotate_half`).
    relative_buckets: T5 relative-position buckets (for `positions='relative'`).
    relative_max_distance: T5 distance beyond which all offsets share the last bucket.
    type_vocab_size: token-type (segment) embeddings added to the input (BERT: 2). 0 = none.
    embedding_norm: a norm right after the summed embeddings (BERT's embeddings LayerNorm).
    dropout_rate: dropout on embeddings, and on each sub-layer output before the residual add.
    attention_dropout_rate: dropout on the attention weights (needs an implementation with dropout,
      i.e. 'reference').
    attention_impl: a name from `flaxattn.attention.implementations()`, or None to let the dispatcher
      pick per call. 'ring' splits the sequence over the mesh's `context` axis (context
      parallelism; the model must run inside `jax.set_mesh`, as the training steps do).
    window: local (sliding-window) self-attention: each query sees the `window` nearest keys on each
      side, itself included (`Mask(window=(window - 1, window - 1))`): in a causal stack the previous
      `window` keys including itself, in a bidirectional one `2 * window - 1` keys centred on it.
      Applied in training and in KV-cache decoding (by token position); the blockwise kernel skips
      the tiles outside the window, so cost grows linearly in length. Distances count array indices
      in a full forward pass and token positions with a cache: the same unless padding sits between
      real tokens. None = global attention. 'softmax' only; cross-attention is never windowed.
    attention_kind: self-attention's form: 'softmax' (exact, through `attention_impl`), 'linear'
      (elu+1 kernelized linear attention, Katharopoulos et al. 2020) or 'performer' (FAVOR+ random
      features estimating softmax, Choromanski et al. 2021); see `flaxattn.attention.linear`. The
      kernelized kinds are O(length) in time and memory, decode with a constant-size recurrent state
      instead of a KV cache, honour causality and padding (and packed segments when causal), and
      take no bias ('alibi'/'relative' positions), softcap or attention dropout. Their attention
      weights (`return_attention_weights`, attention maps) are materialised on request, without a
      cache.
      Cross-attention stays softmax.
    performer_features: random features per head for 'performer' (more: closer to softmax, slower).
    performer_seed: seed of the fixed feature draw used in evaluation and decoding.
    performer_redraw: True: in training (calls with `deterministic=False` and a `dropout_rng`), the
      features are redrawn every call from that step's dropout key, so no projection is stored,
      optimised or weight-decayed (the model's state stays `nnx.Param`s only); False: the fixed draw
      from `performer_seed` everywhere. One draw serves all heads of a layer; the fixed draw is
      shared by the layers, while in training each layer gets its own (its own dropout key).
    linear_chunk_size: tokens per chunk of the causal kernelized scan (quadratic inside a chunk).
    qk_norm: RMS-normalise queries and keys per head before the dot product (OLMo 2, Gemma 3).
    softcap: soft-cap the attention logits at this value (`c * tanh(logits / c)`, Gemma 2); None = off.
    tie_embeddings: output logits use the input embedding table (`Embed.attend`) instead of a separate
      `[embed, vocab]` kernel.
    scan_layers: True: one block's parameters stacked on a leading `layers` axis, applied with
      `jax.lax.scan` (compile time flat in depth); False: a Python list of blocks (unrolled).
      On CPU the unrolled stack runs faster (a SmolLM2-sized decode step at batch 8 measured
      66 ms unrolled vs 170 ms scanned): scan for compile time and training, unroll for decoding.
    remat: rematerialisation of each block in the backward pass: 'none', 'full' (save nothing),
      'dots' (save matmul outputs), 'dots_no_batch' (save matmuls without batch dimensions).
    dtype: compute dtype of activations (e.g. bfloat16). Norms and softmax accumulate in float32.
    param_dtype: dtype parameters are stored in (float32 for mixed precision).
  """

  vocab_size: int = 32000
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  activation: str = "gelu"
  gated_mlp: bool = False
  norm: str = "layernorm"
  norm_eps: float = 1e-6
  pre_norm: bool = True
  use_bias: bool = True
  final_norm: bool = True
  positions: str = "learned"
  max_length: int = 512
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  type_vocab_size: int = 0
  embedding_norm: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str | None = None
  window: int | None = None
  attention_kind: str = "softmax"
  performer_features: int = 128
  performer_seed: int = 0
  performer_redraw: bool = True
  linear_chunk_size: int = 64
  qk_norm: bool = False
  softcap: float | None = None
  tie_embeddings: bool = True
  scan_layers: bool = False
  remat: str = "none"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    def positive(name):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")

    for name in ("vocab_size", "d_model", "num_heads", "mlp_dim", "num_layers", "max_length",
                 "relative_buckets", "relative_max_distance"):
      positive(name)
    for name in ("performer_features", "linear_chunk_size"):
      positive(name)
    for name in ("num_kv_heads", "head_dim", "num_decoder_layers", "window"):
      if getattr(self, name) is not None:
        positive(name)
    if self.num_heads % self.kv_heads:
      raise ValueError(
          f"TransformerConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads})")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"TransformerConfig.d_model ({self.d_model}) must be divisible by num_heads "
          f"({self.num_heads}) when head_dim is None")
    for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("positions", POSITIONS),
                          ("remat", REMAT_POLICIES), ("attention_kind", ATTENTION_KINDS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"TransformerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if not 0.0 < self.rope_fraction <= 1.0:
      raise ValueError(f"TransformerConfig.rope_fraction must be in (0, 1], got {self.rope_fraction!r}")
    if self.positions == "rope" and self.rotary_dim < 2:
      raise ValueError(
          f"TransformerConfig.rope_fraction={self.rope_fraction} of head_dim={self.features_per_head} "
          "rotates fewer than 2 dimensions")
    if self.rope_base <= 0:
      raise ValueError(f"TransformerConfig.rope_base must be positive, got {self.rope_base!r}")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      raise ValueError(
          f"TransformerConfig.type_vocab_size must be a non-negative int, got {self.type_vocab_size!r}")
    if self.norm_eps <= 0:
      raise ValueError(f"TransformerConfig.norm_eps must be positive, got {self.norm_eps!r}")
    for name in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
    if self.softcap is not None and not self.softcap > 0:
      raise ValueError(f"TransformerConfig.softcap must be positive or None, got {self.softcap!r}")
    if self.attention_impl is not None:
      from flaxattn.attention import implementations  # Deferred: only needed to validate the name.
      names = [impl["name"] for impl in implementations()]
      if self.attention_impl not in names:
        raise ValueError(
            f"TransformerConfig.attention_impl must be None or one of {names}, got {self.attention_impl!r}")
    if self.attention_kind != "softmax":
      clashes = {"window": self.window is not None,
                 "positions": self.positions in ("alibi", "relative"),
                 "softcap": self.softcap is not None,
                 "attention_dropout_rate": self.attention_dropout_rate > 0,
                 "attention_impl": self.attention_impl is not None}
      for name, clash in clashes.items():
        if clash:
          raise ValueError(
              f"TransformerConfig.{name}={getattr(self, name)!r} does not apply to "
              f"attention_kind={self.attention_kind!r} (softmax attention only)")
    if not isinstance(self.performer_seed, int):
      raise ValueError(f"TransformerConfig.performer_seed must be an int, got {self.performer_seed!r}")
    for name in ("dtype", "param_dtype"):
      try:
        dtype = jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"TransformerConfig.{name} is not a dtype: {getattr(self, name)!r}") from None
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"TransformerConfig.{name} must be a floating dtype, got {dtype}")

  @property
  def kv_heads(self) -> int:
    """Key/value heads actually used (`num_kv_heads`, or `num_heads`)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def features_per_head(self) -> int:
    """Head width actually used (`head_dim`, or `d_model // num_heads`)."""
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def kernel_features(self) -> int:
    """Features per head of the kernelized kinds' state ('linear': head_dim; 'performer':
    `performer_features`)."""
    return self.performer_features if self.attention_kind == "performer" else self.features_per_head

  @property
  def rotary_dim(self) -> int:
    """Dimensions of each head that RoPE rotates (even)."""
    return int(self.features_per_head * self.rope_fraction) // 2 * 2

  @property
  def decoder_layers(self) -> int:
    """Blocks in the decoder of an encoder-decoder."""
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers
