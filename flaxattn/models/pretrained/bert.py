"""BERT-family checkpoints from a Hugging Face directory: `config.json`, `model.safetensors`, `vocab.txt`.

Sentence-transformers directories (all-MiniLM-L6-v2, ...) are such directories plus pooling configs;
`sentence_embeddings` reproduces their mean pooling and normalisation.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
                        normalize: bool = True, batch_size: int = 256, length_multiple: int = 8,
                        batch_tokens: int | None = None) -> np.ndarray:
  """Sentence-transformers embeddings: mean of the last hidden states over real tokens, L2-normalised.

  The texts are tokenized in one batch, sorted by token count and encoded a batch at a time by one
  `jax.jit` over the split model state, each batch padded to a multiple of `length_multiple`
  tokens and to a power-of-two row count, so that a few compiled shapes serve any list; the result
  is in the order of `texts`. Inputs longer than the tokenizer's `max_length` are truncated as
  sentence-transformers truncates them (at its `max_seq_length`).

  Args:
    model: an `EncoderModel` (`load_pretrained` of a sentence-transformers directory).
    tokenizer: its tokenizer.
    texts: the sentences (an empty sequence gives `[0, d_model]`).
    normalize: divide each embedding by its L2 norm (sentence-transformers' `Normalize`).
    batch_size: the most sentences per forward pass.
    length_multiple: each batch is padded to a multiple of this many tokens (1: to its longest).
    batch_tokens: the most padded tokens per batch (default `batch_size * 64`): longer texts go
      fewer to a batch, so that one long text does not pad a whole batch of short ones.

  Returns:
    float32 `[len(texts), d_model]`.
  """
  if isinstance(texts, str):
    raise ValueError(f"texts must be a sequence of str, not one str: got {texts[:40]!r}")
  batch_tokens = batch_size * 64 if batch_tokens is None else batch_tokens
  for name, value in (("batch_size", batch_size), ("length_multiple", length_multiple),
                      ("batch_tokens", batch_tokens)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if not texts:
    return np.zeros((0, model.config.d_model), np.float32)
  ids, valid = tokenizer.encode_batch(texts)
  graphdef, state = nnx.split(model)
  results = []
  for rows, padded_rows, length in _length_batches(valid.sum(axis=1), batch_size, batch_tokens,
                                                   length_multiple):
    batch_ids = np.full((padded_rows, length), tokenizer.pad_id, np.int32)
    batch_valid = np.zeros((padded_rows, length), bool)
    width = min(length, ids.shape[1])
    batch_ids[:len(rows), :width] = ids[rows, :width]
    batch_valid[:len(rows), :width] = valid[rows, :width]
    # Dispatched without waiting: the next batch is prepared while this one runs.
    results.append((rows, _pooled_embeddings(graphdef, state, batch_ids, batch_valid,
                                             normalize=normalize)))
  embeddings = np.empty((len(texts), model.config.d_model), np.float32)
  for rows, pooled in results:
    embeddings[rows] = np.asarray(pooled)[:len(rows)]
  return embeddings


def _length_batches(lengths: np.ndarray, batch_size: int, batch_tokens: int, length_multiple: int):
  """Yields `(rows, padded_rows, length)` per batch: the indices of its texts, longest first, the
  row count to pad to (a power of two, at most `batch_size`) and the padded length."""
  order = np.argsort(-lengths, kind="stable")  # Longest first: a batch too big fails at once.
  start = 0
  while start < len(order):
    length = -(-int(lengths[order[start]]) // length_multiple) * length_multiple
    capacity = min(batch_size, 1 << max(0, (batch_tokens // length).bit_length() - 1))
    rows = order[start:start + capacity]
    yield rows, min(capacity, 1 << (len(rows) - 1).bit_length()), length
    start += len(rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "normalize"))
def _pooled_embeddings(graphdef, state, ids, valid, *, normalize: bool):
  """float32 `[batch, d_model]` mean-pooled (and normalised) last hidden states of one batch."""
  model = nnx.merge(graphdef, state)
  pooled = mean_pool(model(ids, attention_mask=valid), valid).astype(jnp.float32)
  if normalize:
    # sentence-transformers' Normalize divides by max(norm, 1e-12) (torch.nn.functional.normalize).
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled
