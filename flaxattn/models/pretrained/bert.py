"""BERT-family checkpoints from a Hugging Face directory: `config.json`, `model.safetensors`, `vocab.txt`.

Sentence-transformers directories (all-MiniLM-L6-v2, ...) are such directories plus pooling configs;
`sentence_embeddings` reproduces their mean pooling and normalisation.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from flaxattn.data.tokenizers import HFTokenizer, WordPieceTokenizer
from flaxattn.models.encoder import EncoderModel
from flaxattn.models.pretrained.weights import Checkpoint, build, linear, override, stack_layers
from flaxattn.nn import TransformerConfig, mean_pool

try:
  from safetensors.numpy import load_file
except ImportError as error:  # Optional dependency: only loading Hugging Face checkpoints needs it.
  raise ImportError(
      "reading Hugging Face checkpoints needs the `safetensors` package: "
      "pip install 'flaxattn[pretrained]'") from error

MODEL_TYPE = "bert"

# Hugging Face `hidden_act` -> `TransformerConfig.activation`.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu", "silu": "silu"}
# Stored in the file but not weights of the encoder: the `position_ids` buffer (always `arange`), and the
# `[CLS]` pooler head, which `EncoderModel` does not have (sentence-transformers does not use it either).
_NOT_ENCODER_WEIGHTS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def read_config(directory: pathlib.Path) -> dict:
  """`config.json` of a Hugging Face checkpoint directory, as a dict."""
  with open(directory / "config.json") as file:
    return json.load(file)


def transformer_config(hf: dict, source: str) -> TransformerConfig:
  """The flaxattn config of a Hugging Face `BertConfig` dict (post-LN, learned positions, GELU)."""
  position_type = hf.get("position_embedding_type", "absolute")
  if position_type != "absolute":
    raise ValueError(f"{source}: position_embedding_type={position_type!r} is not supported "
                     "(only 'absolute')")
  if hf.get("hidden_act") not in _ACTIVATIONS:
    raise ValueError(f"{source}: hidden_act={hf.get('hidden_act')!r} is not supported; supported: "
                     f"{sorted(_ACTIVATIONS)}")
  return TransformerConfig(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_heads=hf["num_attention_heads"],
      mlp_dim=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
      activation=_ACTIVATIONS[hf["hidden_act"]], norm="layernorm", norm_eps=hf["layer_norm_eps"],
      pre_norm=False, use_bias=True, final_norm=False, positions="learned",
      max_length=hf["max_position_embeddings"], type_vocab_size=hf["type_vocab_size"],
      embedding_norm=True, tie_embeddings=False)


def read_weights(directory: pathlib.Path) -> Checkpoint:
  """The tensors of `model.safetensors`, names without a task model's `bert.` prefix."""
  path = directory / "model.safetensors"
  tensors = load_file(str(path))
  tensors = {name.removeprefix("bert."): value for name, value in tensors.items()}
  return Checkpoint(tensors, path, ignore=_NOT_ENCODER_WEIGHTS)


def read_tokenizer(directory: pathlib.Path, config: TransformerConfig) -> WordPieceTokenizer:
  """WordPiece from `vocab.txt`; lower-casing from `tokenizer_config.json` (default: uncased); inputs
  truncated to sentence-transformers' `max_seq_length` if the directory sets one, else to the
  model's position table."""
  tokenizer_config = directory / "tokenizer_config.json"
  lowercase = (json.loads(tokenizer_config.read_text()).get("do_lower_case", True)
               if tokenizer_config.exists() else True)
  sentence_config = directory / "sentence_bert_config.json"
  max_length = (json.loads(sentence_config.read_text()).get("max_seq_length", config.max_length)
                if sentence_config.exists() else config.max_length)
  return WordPieceTokenizer(directory / "vocab.txt", lowercase=lowercase, max_length=max_length)


def encoder_params(checkpoint: Checkpoint, config: TransformerConfig) -> dict[str, np.ndarray]:
  """`EncoderModel` parameters (by path) from Hugging Face `BertModel` tensors."""
  take = checkpoint.take
  embed, heads, head_dim = config.d_model, config.num_heads, config.features_per_head
  params = {
      "embedder/token/embedding": take("embeddings.word_embeddings.weight"),
      "embedder/position/embedding": take("embeddings.position_embeddings.weight"),
      "embedder/token_type/embedding": take("embeddings.token_type_embeddings.weight"),
      "embedder/norm/scale": take("embeddings.LayerNorm.weight"),
      "embedder/norm/bias": take("embeddings.LayerNorm.bias"),
  }
  layers = []
  for index in range(config.num_layers):
    name = f"encoder.layer.{index}."
    layer = {}
    for projection in ("query", "key", "value"):
      layer[f"attention/{projection}/kernel"] = linear(
          take(f"{name}attention.self.{projection}.weight"), (embed,), (heads, head_dim))
      layer[f"attention/{projection}/bias"] = take(
          f"{name}attention.self.{projection}.bias").reshape(heads, head_dim)
    layer["attention/out/kernel"] = linear(
        take(f"{name}attention.output.dense.weight"), (heads, head_dim), (embed,))
    layer["attention/out/bias"] = take(f"{name}attention.output.dense.bias")
    # Post-LN: the norm after the attention residual, and the one after the MLP residual.
    layer["attention_norm/scale"] = take(f"{name}attention.output.LayerNorm.weight")
    layer["attention_norm/bias"] = take(f"{name}attention.output.LayerNorm.bias")
    layer["mlp/up/kernel"] = linear(take(f"{name}intermediate.dense.weight"), (embed,),
                                    (config.mlp_dim,))
    layer["mlp/up/bias"] = take(f"{name}intermediate.dense.bias")
    layer["mlp/down/kernel"] = linear(take(f"{name}output.dense.weight"), (config.mlp_dim,),
                                      (embed,))
    layer["mlp/down/bias"] = take(f"{name}output.dense.bias")
    layer["mlp_norm/scale"] = take(f"{name}output.LayerNorm.weight")
    layer["mlp_norm/bias"] = take(f"{name}output.LayerNorm.bias")
    layers.append(layer)
  return params | stack_layers("encoder", layers, scanned=config.scan_layers)


def load(directory: pathlib.Path, **overrides) -> tuple[EncoderModel, WordPieceTokenizer]:
  """`EncoderModel` with the checkpoint's weights and its WordPiece tokenizer.

  `overrides`: `TransformerConfig` fields that keep the weights' meaning (see `weights.OVERRIDABLE`),
  e.g. `dtype=jnp.bfloat16`.
  """
  config = override(transformer_config(read_config(directory), str(directory)), overrides,
                    str(directory))
  checkpoint = read_weights(directory)
  model = build(EncoderModel, config, encoder_params(checkpoint, config), checkpoint)
  return model, read_tokenizer(directory, config)


def sentence_embeddings(model, tokenizer: HFTokenizer, texts: Sequence[str], *,
                        normalize: bool = True) -> np.ndarray:
  """Sentence-transformers embeddings: mean of the last hidden states over real tokens, L2-normalised.

  Returns float32 `[len(texts), d_model]`.
  """
  ids, valid = tokenizer.encode_batch(texts)
  pooled = mean_pool(model(ids, attention_mask=valid), jnp.asarray(valid)).astype(jnp.float32)
  if normalize:
    # sentence-transformers' Normalize divides by max(norm, 1e-12) (torch.nn.functional.normalize).
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return np.asarray(pooled)
