"""Attention kernels: one API over interchangeable implementations.

`dot_product_attention(query, key, value, *, mask, bias, ...)` with `Mask` for structured masks;
`implementations()` lists what each implementation supports.
"""

from flaxattn.attention.api import dot_product_attention, implementations
from flaxattn.attention.mask import MASK_KINDS, Mask

__all__ = ["MASK_KINDS", "Mask", "dot_product_attention", "implementations"]
