"""Attention kernels: one API over interchangeable implementations.

`dot_product_attention(query, key, value, *, mask, bias, ...)` with `Mask` for structured masks;
`implementations()` lists what each implementation supports. `flaxattn.attention.linear` holds the
kernelized approximations (elu+1 linear attention, Performer FAVOR+), which are not softmax and so
sit beside the dispatcher rather than behind it.
"""

from flaxattn.attention.api import dot_product_attention, implementations
from flaxattn.attention.mask import MASK_KINDS, Mask

__all__ = ["MASK_KINDS", "Mask", "dot_product_attention", "implementations"]
