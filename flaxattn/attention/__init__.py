"""Attention kernels: one API over interchangeable implementations.

`dot_product_attention(query, key, value, *, mask, bias, ...)` with `Mask` for structured masks;
`implementations()` names the implementations (`describe_implementations()`: what each
supports); `activation_layout(spec)` states how the caller's activations lie on the mesh (the kernels
that run per device, and ring attention, which rings over the axis it gives the length).
`flaxattn.attention.linear` holds the kernelized approximations (elu+1 linear attention, Performer
FAVOR+), which are not softmax and so sit beside the dispatcher rather than behind it.
`flex_attention(query, key, value, score_mod=, mask_mod=, block_mask=)` runs user-defined scalar
score and mask functions inside the blockwise tiles (`create_block_mask`, `and_masks`, `or_masks`
build and combine masks); `dot_product_attention` takes the same mods (`score_mod=`, `mask_mod=`,
`block_mask=`). `causal_mask`, `sliding_window`, `document_mask`, `padding_mask` and `soft_cap` are
mods a `Mask`/`softcap=` also states, which flex hands to the fused GPU/TPU kernels. `attention_rows` and `attention_statistics` (`flaxattn.attention.probes`)
recompute chosen rows of attention weights, and per-query entropy / sink mass / top-k keys, from a
kernel's log-sum-exp without a `[q_len, kv_len]` array.
"""

from flaxattn.attention.api import describe_implementations, dot_product_attention, implementations
from flaxattn.attention.flex import (BlockMask, and_masks, causal_mask, create_block_mask,
                                     document_mask, flex_attention, or_masks, padding_mask,
                                     sliding_window, soft_cap)
from flaxattn.attention.mask import MASK_KINDS, Mask
from flaxattn.attention.placement import activation_layout
from flaxattn.attention.probes import attention_rows, attention_statistics

__all__ = ["MASK_KINDS", "BlockMask", "Mask", "activation_layout", "and_masks", "attention_rows",
           "attention_statistics", "causal_mask", "create_block_mask", "describe_implementations",
           "document_mask", "dot_product_attention", "flex_attention", "implementations", "or_masks",
           "padding_mask", "sliding_window", "soft_cap"]
