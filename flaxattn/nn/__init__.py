"""Flax NNX modules on top of `flaxattn.attention`: attention, positions, norms, MLPs, blocks, stacks."""

from flaxattn.nn.attention import (ContextCache, KVCache, MultiHeadAttention, mask_from_keras,
                                   mask_from_torch)
from flaxattn.nn.config import TransformerConfig
from flaxattn.nn.intermediates import capture_attention_probes, capture_attention_weights, resow
from flaxattn.nn.layers import MLP, Dense, Embed, LayerNorm, RMSNorm
from flaxattn.nn.probing import AttentionProbe
from flaxattn.nn.pooling import AttentionPooling, mean_pool
from flaxattn.nn.positions import (LearnedPositions, PositionBias, RelativePositionBias, alibi_bias, alibi_slopes,
                                   apply_rope, relative_position_bucket, sinusoidal)
from flaxattn.nn.recurrent import GRU, LSTM, Recurrent, RecurrentAttentionEncoder, RecurrentCell
from flaxattn.nn.sharding import constrain
from flaxattn.nn.summaries import ModelSummary, ParamRow, summary
from flaxattn.nn.transformer import (Decoder, Embedder, Encoder, TransformerBlock, TransformerStack,
                                     positions_from_mask)

__all__ = [
    "AttentionPooling", "AttentionProbe", "ContextCache", "Decoder", "GRU", "LSTM", "Recurrent", "RecurrentAttentionEncoder",
    "RecurrentCell", "Dense", "Embed", "Embedder", "Encoder", "KVCache", "LayerNorm",
    "LearnedPositions", "MLP", "PositionBias", "ModelSummary", "MultiHeadAttention", "ParamRow", "RMSNorm", "RelativePositionBias",
    "TransformerBlock", "TransformerConfig", "TransformerStack", "alibi_bias", "alibi_slopes",
    "apply_rope", "capture_attention_probes", "capture_attention_weights", "constrain", "mask_from_keras", "mask_from_torch", "mean_pool",
    "positions_from_mask", "relative_position_bucket", "resow", "sinusoidal", "summary",
]
