"""Llama-family checkpoints from a GGUF file (llama.cpp's format), dequantized to float32.

The hyper-parameters come from the GGUF metadata (`llama.block_count`, `llama.attention.head_count`,
...), the tokenizer from `tokenizer.ggml.*`. llama.cpp's converter permutes the rows of the query and
key projections from the Hugging Face "rotate half" RoPE layout to its interleaved-pairs layout; they
are permuted back here, because flaxattn's RoPE uses the half layout.
"""

from __future__ import annotations

import pathlib

import numpy as np

from flaxattn.data.tokenizers import HFTokenizer
from flaxattn.models.decoder import DecoderLM
from flaxattn.models.pretrained import tokenizer as tokenizers_lib
from flaxattn.models.pretrained.weights import Checkpoint, build, linear, override, stack_layers
from flaxattn.nn import TransformerConfig

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


def transformer_config(metadata: dict, tensor_names, source: str) -> TransformerConfig:
  """The flaxattn config of a GGUF `llama` file: pre-RMSNorm, RoPE (half layout), SwiGLU, GQA, no
  biases; embeddings tied when the file has no separate `output.weight`."""
  arch = ARCHITECTURE

  def get(key, default=None):
    value = metadata.get(f"{arch}.{key}", default)
    if value is None:
      raise ValueError(f"{source}: GGUF metadata lacks {arch}.{key}")
    if isinstance(value, list):
      raise ValueError(f"{source}: per-layer {arch}.{key}={value!r} is not supported")
    return value

  scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise ValueError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported")
  heads = get("attention.head_count")
  head_dim = get("attention.key_length", get("embedding_length") // heads)
  rotary_dim = get("rope.dimension_count", head_dim)
  return TransformerConfig(
      vocab_size=len(metadata["tokenizer.ggml.tokens"]), d_model=get("embedding_length"),
      num_heads=heads, kv_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
      mlp_dim=get("feed_forward_length"), num_layers=get("block_count"), activation="silu",
      gated_mlp=True, norm="rmsnorm", norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      pre_norm=True, use_bias=False, final_norm=True, positions="rope",
      max_length=get("context_length"), rope_base=float(get("rope.freq_base", 10000.0)),
      rotary_dim=rotary_dim, tie_embeddings="output.weight" not in tensor_names)


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


def decoder_params(checkpoint: Checkpoint, config: TransformerConfig) -> dict[str, np.ndarray]:
  """`DecoderLM` parameters (by path) from GGUF llama tensors (`read_tensors`)."""
  take = checkpoint.take
  embed, head_dim = config.d_model, config.features_per_head
  params = {
      "embedder/token/embedding": take("token_embd.weight"),
      "decoder/final_norm/scale": take("output_norm.weight"),
  }
  if not config.tie_embeddings:
    params["lm_head/kernel"] = linear(take("output.weight"), (embed,), (config.vocab_size,))
  layers = []
  for index in range(config.num_layers):
    name = f"blk.{index}."
    layers.append({
        "attention_norm/scale": take(f"{name}attn_norm.weight"),
        "attention/query/kernel": linear(take(f"{name}attn_q.weight"), (embed,),
                                         (config.num_heads, head_dim)),
        "attention/key/kernel": linear(take(f"{name}attn_k.weight"), (embed,),
                                       (config.kv_heads, head_dim)),
        "attention/value/kernel": linear(take(f"{name}attn_v.weight"), (embed,),
                                         (config.kv_heads, head_dim)),
        "attention/out/kernel": linear(take(f"{name}attn_output.weight"),
                                       (config.num_heads, head_dim), (embed,)),
        "mlp_norm/scale": take(f"{name}ffn_norm.weight"),
        "mlp/gate/kernel": linear(take(f"{name}ffn_gate.weight"), (embed,), (config.mlp_dim,)),
        "mlp/up/kernel": linear(take(f"{name}ffn_up.weight"), (embed,), (config.mlp_dim,)),
        "mlp/down/kernel": linear(take(f"{name}ffn_down.weight"), (config.mlp_dim,), (embed,)),
    })
  return params | stack_layers("decoder", layers, scanned=config.scan_layers)


def load(reader: "gguf.GGUFReader", path: pathlib.Path,
         **overrides) -> tuple[DecoderLM, HFTokenizer]:
  """`DecoderLM` with the weights of the GGUF file `reader` read from `path` (dequantized to float32,
  stored as `param_dtype`) and its BPE tokenizer. `overrides`: `TransformerConfig` fields that keep the
  weights' meaning (see `weights.OVERRIDABLE`), e.g. `scan_layers=True`."""
  metadata = read_metadata(reader)
  names = [tensor.name for tensor in reader.tensors]
  config = override(transformer_config(metadata, names, str(path)), overrides, str(path))
  checkpoint = Checkpoint(
      read_tensors(reader, heads=config.num_heads, kv_heads=config.kv_heads), path)
  model = build(DecoderLM, config, decoder_params(checkpoint, config), checkpoint)
  return model, tokenizers_lib.gguf_bpe(metadata)
