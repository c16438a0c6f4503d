"""Llama-family checkpoints from a GGUF file (llama.cpp's format), dequantized to float32.

The hyper-parameters come from the GGUF metadata (`llama.block_count`, `llama.attention.head_count`,
...), the tokenizer from `tokenizer.ggml.*`. llama.cpp's converter permutes the rows of the query and
key projections from the Hugging Face "rotate half" RoPE layout to its interleaved-pairs layout; they
are permuted back here, because flaxattn's RoPE uses the half layout.
"""

from __future__ import annotations

import numpy as np

try:
  import gguf
except ImportError as error:  # Optional dependency: only loading GGUF checkpoints needs it.
  raise ImportError(
      "reading GGUF checkpoints needs the `gguf` package: pip install 'flaxattn[pretrained]'"
  ) from error

ARCHITECTURE = "llama"


def read_metadata(reader: "gguf.GGUFReader") -> dict:
  """The GGUF key/value metadata as Python values (str, int, float, bool, lists of those)."""
  return {name: field.contents() for name, field in reader.fields.items()}


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
  """Undoes llama.cpp's RoPE row permutation of a query/key projection.

  Args:
    weight: `[heads * head_dim, embed]`, rows of each head in llama.cpp's order, where output pair
      `(2i, 2i+1)` is rotated together.
    heads: heads in this projection (query heads for `attn_q`, key/value heads for `attn_k`).

  Returns:
    Same shape, rows of each head in the half layout, where `(i, i + head_dim / 2)` are rotated together:
    llama.cpp row `2i + s` of a head becomes row `s * head_dim / 2 + i`.
  """
  rows = weight.shape[0]
  if rows % (2 * heads):
    raise ValueError(f"cannot split {rows} projection rows into {heads} heads of pairs: weight "
                     f"shape {weight.shape}")
  half = rows // heads // 2
  pairs = weight.reshape(heads, half, 2, *weight.shape[1:])
  return pairs.swapaxes(1, 2).reshape(weight.shape)


def read_tensors(reader: "gguf.GGUFReader", *, heads: int, kv_heads: int) -> dict[str, np.ndarray]:
  """Every tensor of the file by GGUF name, dequantized to float32 in Hugging Face orientation.

  Linear weights are `[out_features, in_features]` (GGUF lists dims innermost first, so the numpy view of
  a `[in, out]` GGUF tensor already is `[out, in]`); `attn_q`/`attn_k` rows are in the half RoPE layout.
  """
  tensors = {}
  for tensor in reader.tensors:
    weight = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    if tensor.name.endswith(".attn_q.weight"):
      weight = unpermute_rotary_rows(weight, heads)
    elif tensor.name.endswith(".attn_k.weight"):
      weight = unpermute_rotary_rows(weight, kv_heads)
    tensors[tensor.name] = weight
  return tensors
