"""`TransformerConfig`: every knob of the flaxattn Transformer stacks and models, each documented
where it is declared."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from flaxattn.nn.attention import check_attention_knobs

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("sinusoidal", "learned", "rope", "alibi", "relative", "none")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of a Transformer encoder, decoder, or encoder-decoder: each knob documented
  where it is declared. The attention knobs carry the names `MultiHeadAttention` takes."""

  # Number of token ids (embedding rows, output logits).
  vocab_size: int = 32000
  # Width of the residual stream (`embed` axis).
  d_model: int = 512
  # Query heads per attention layer.
  num_heads: int = 8
  # Key/value heads (GQA/MQA); must divide `num_heads`. None = `num_heads`.
  kv_heads: int | None = None
  # Width of one head. None = `d_model // num_heads` (then `num_heads` must divide `d_model`).
  head_dim: int | None = None
  # Hidden width of the MLP (`mlp` axis).
  mlp_dim: int = 2048
  # Transformer blocks in the stack (the encoder's, in an encoder-decoder).
  num_layers: int = 6
  # Decoder blocks of an encoder-decoder. None = `num_layers`.
  num_decoder_layers: int | None = None
  # MLP non-linearity: 'gelu' (exact erf form, BERT), 'gelu_tanh' (tanh approximation, GPT-2),
  # 'relu' (original Transformer, T5), 'silu' (Llama).
  activation: str = "gelu"
  # Gated MLP `down(act(gate(x)) * up(x))`: SwiGLU with 'silu', GeGLU with 'gelu'.
  gated_mlp: bool = False
  # 'layernorm' (mean and variance, scale and bias) or 'rmsnorm' (root mean square, scale only).
  norm: str = "layernorm"
  # Epsilon added to the variance in every norm (BERT 1e-12, Llama 1e-5).
  norm_eps: float = 1e-6
  # True: pre-LN (`x + f(norm(x))`, GPT-2 / Llama); False: post-LN (`norm(x + f(x))`, the original
  # Transformer and BERT).
  pre_norm: bool = True
  # Biases in attention and MLP projections (BERT yes, Llama no).
  use_bias: bool = True
  # A norm after the last block (standard with pre-LN; BERT has none).
  final_norm: bool = True
  # 'sinusoidal' (fixed, added to embeddings), 'learned' (table of `max_length` rows, added), 'rope'
  # (rotary, applied to queries and keys in every layer), 'alibi' (linear bias on the logits),
  # 'relative' (T5 bucketed bias, one table shared by the layers of a stack), 'none'.
  positions: str = "learned"
  # Longest sequence for 'learned' positions (and the default cache length).
  max_length: int = 512
  # RoPE wavelength base (10000 originally; Llama 3 uses 500000, SmolLM2 100000).
  rope_base: float = 10000.0
  # Dimensions of each head that RoPE rotates (even; partial rotation as in GPT-NeoX / Phi, the
  # rest passes through). None = all of the head. Hugging Face "half" layout: the rotated part
  # `[x1, x2]` becomes `[x1 cos - x2 sin, x2 cos + x1 sin]` (`rotate_half`).
  rotary_dim: int | None = None
  # T5 relative-position buckets (for `positions='relative'`).
  relative_buckets: int = 32
  # T5 distance beyond which all offsets share the last bucket.
  relative_max_distance: int = 128
  # Token-type (segment) embeddings added to the input (BERT: 2). 0 = none.
  type_vocab_size: int = 0
  # A norm right after the summed embeddings (BERT's embeddings LayerNorm).
  embedding_norm: bool = False
  # Dropout on embeddings, and on each sub-layer output before the residual add.
  dropout_rate: float = 0.0
  # Dropout on the attention weights (needs an implementation with dropout, i.e. 'reference').
  attention_dropout_rate: float = 0.0
  # A name from `flaxattn.attention.implementations()`, or None to let the dispatcher pick per call.
  # 'ring' splits the sequence over the mesh's `context` axis (context parallelism; the model must
  # run inside `jax.set_mesh`, as the training steps do).
  attention_impl: str | None = None
  # Sliding-window self-attention, `window` keys per side with the query itself counted on both:
  # a query sees the keys within `window - 1` positions (`Mask(window=(window - 1, window - 1))`),
  # so a causal stack sees the previous `window` keys including itself and a bidirectional one
  # `2 * window - 1` keys centred on it. Applied in training and in KV-cache decoding (by token
  # position); the blockwise kernel skips the tiles outside the window, so cost grows linearly in
  # length. Distances count array indices in a full forward pass and token positions with a
  # cache: the same unless padding sits between real tokens. None = global attention. 'softmax'
  # only; cross-attention is never windowed.
  window: int | None = None
  # Self-attention's form: 'softmax' (exact, through `attention_impl`), 'linear' (elu+1 kernelized
  # linear attention, Katharopoulos et al. 2020) or 'performer' (FAVOR+ random features estimating
  # softmax, Choromanski et al. 2021); see `flaxattn.attention.linear`. The kernelized kinds are
  # O(length) in time and memory, decode with a constant-size recurrent state instead of a KV
  # cache, honour causality and padding (and packed segments when causal), and take no bias
  # ('alibi'/'relative' positions), softcap, attention dropout or `attention_impl`. Their weights
  # (`flaxattn.nn.capture_attention_weights`, attention maps) are materialised on request, without a cache.
  # Cross-attention stays softmax.
  attention_kind: str = "softmax"
  # Random features per head for 'performer' (more: closer to softmax, slower).
  performer_features: int = 128
  # Seed of the fixed 'performer' feature draw used in evaluation and decoding.
  performer_seed: int = 0
  # True: in training (calls with `deterministic=False` and a `dropout_rng`) the 'performer'
  # features are redrawn every call from that step's dropout key, so no projection is stored,
  # optimised or weight-decayed; False: the fixed draw from `performer_seed` everywhere. One draw
  # serves all heads of a layer; the fixed draw is shared by the layers, while in training each
  # layer gets its own (its own dropout key).
  performer_redraw: bool = True
  # Tokens per chunk of the causal kernelized scan ('linear', 'performer'; quadratic inside a chunk).
  linear_chunk_size: int = 64
  # RMS-normalise queries and keys per head before the dot product (OLMo 2, Gemma 3).
  qk_norm: bool = False
  # Soft-cap the attention logits at this value (`c * tanh(logits / c)`, Gemma 2); None = off.
  softcap: float | None = None
  # A learned sink logit per head in self-attention (gpt-oss, StreamingLLM), through flex_attention.
  attention_sinks: bool = False
  # Output logits use the input embedding table (`Embed.attend`) instead of a separate
  # `[embed, vocab]` kernel.
  tie_embeddings: bool = True
  # True: one block's parameters stacked on a leading `layers` axis, applied with `jax.lax.scan`
  # (compile time flat in depth); False: a Python list of blocks (unrolled). On CPU the unrolled
  # stack runs faster (a SmolLM2-sized decode step at batch 8 measured 66 ms unrolled vs 170 ms
  # scanned): scan for compile time and training, unroll for decoding.
  scan_layers: bool = False
  # Rematerialisation of each block in the backward pass: 'none', 'full' (save nothing), 'dots'
  # (save matmul outputs), 'dots_no_batch' (save matmuls without batch dimensions).
  remat: str = "none"
  # Compute dtype of activations (e.g. bfloat16). Norms and softmax accumulate in float32.
  dtype: Any = jnp.float32
  # Dtype parameters are stored in (float32 for mixed precision).
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    # The attention knobs follow `MultiHeadAttention`'s rules, checked by the same function.
    check_attention_knobs(
        "TransformerConfig.", width=("d_model", self.d_model), num_heads=self.num_heads,
        kv_heads=self.kv_heads, head_dim=self.head_dim, rotary_dim=self.rotary_dim,
        positions=self.positions, attention_dropout_rate=self.attention_dropout_rate,
        softcap=self.softcap, attention_impl=self.attention_impl,
        attention_kind=self.attention_kind, window=self.window,
        performer_features=self.performer_features, performer_seed=self.performer_seed,
        linear_chunk_size=self.linear_chunk_size, attention_sinks=self.attention_sinks)
    for name in ("vocab_size", "d_model", "mlp_dim", "num_layers", "max_length", "relative_buckets",
                 "relative_max_distance", "num_decoder_layers"):
      value = getattr(self, name)
      if not (value is None and name == "num_decoder_layers") and (
          isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
    for name, allowed in (("activation", ACTIVATIONS), ("norm", NORMS), ("positions", POSITIONS),
                          ("remat", REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"TransformerConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.positions == "rope" and self.rotary_dim is not None and self.rotary_dim < 2:
      raise ValueError(f"TransformerConfig.rotary_dim={self.rotary_dim} rotates fewer than 2 dimensions")
    if self.rope_base <= 0:
      raise ValueError(f"TransformerConfig.rope_base must be positive, got {self.rope_base!r}")
    if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
      raise ValueError(
          f"TransformerConfig.type_vocab_size must be a non-negative int, got {self.type_vocab_size!r}")
    if self.norm_eps <= 0:
      raise ValueError(f"TransformerConfig.norm_eps must be positive, got {self.norm_eps!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"TransformerConfig.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
    for name in ("dtype", "param_dtype"):
      try:
        dtype = jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"TransformerConfig.{name} is not a dtype: {getattr(self, name)!r}") from None
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"TransformerConfig.{name} must be a floating dtype, got {dtype}")

  @property
  def features_per_head(self) -> int:
    """Head width actually used (`head_dim`, or `d_model // num_heads`)."""
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def decoder_layers(self) -> int:
    """Blocks in the decoder of an encoder-decoder."""
    return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers
