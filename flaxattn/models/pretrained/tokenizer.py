"""Tokenizers of pretrained checkpoints: WordPiece from a BERT `vocab.txt`, byte-level BPE from GGUF.

Both are `Tokenizer`s: one wrapper over a Hugging Face `tokenizers.Tokenizer` (Rust, fast), built from the
checkpoint's own files so that ids match the model's embedding table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

try:
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors
except ImportError as error:  # Optional dependency: only loading pretrained checkpoints needs it.
  raise ImportError(
      "flaxattn.models.pretrained needs the `tokenizers` package: pip install 'flaxattn[pretrained]'"
  ) from error


class Tokenizer:
  """Text to token ids and back, with right-padded batching.

  Attributes:
    pad_id: id used to pad batches (positions the attention mask marks False).
    max_length: inputs longer than this many tokens are truncated (None: never).
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, pad_id: int, max_length: int | None = None):
    self._backend = backend
    self.pad_id = int(pad_id)
    self.max_length = max_length
    if max_length is not None:
      backend.enable_truncation(max_length)

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included."""
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """The id of one vocabulary entry (e.g. `'[CLS]'`, `'<|im_end|>'`), or None if absent."""
    return self._backend.token_to_id(token)

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, with the special tokens the checkpoint adds (BERT: `[CLS] ... [SEP]`)
    unless `add_special_tokens=False`."""
    if not isinstance(text, str):
      raise ValueError(f"text must be a str, got {type(text).__name__}")
    return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

  def id_to_token(self, index: int) -> str | None:
    """The vocabulary entry of one id (e.g. `'##ing'`), or None if out of range."""
    return self._backend.id_to_token(int(index))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` (a list or 1-D array of ints); special tokens are kept, as in `transformers`."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"ids must be a 1-D sequence of ints, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(
          f"ids must lie in [0, {self.vocab_size}), got values in [{ids.min()}, {ids.max()}]")
    return self._backend.decode(ids.tolist(), skip_special_tokens=False)

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes and right-pads `texts` to the longest one.

    Returns:
      `(ids, mask)`: `ids` `[batch, length]` int32 padded with `pad_id`; `mask` `[batch, length]` bool,
      True on real tokens.
    """
    if isinstance(texts, str) or not texts:
      raise ValueError(f"texts must be a non-empty sequence of str, got {texts!r}")
    encoded = [self.encode(text) for text in texts]
    length = max(len(ids) for ids in encoded)
    batch = np.full((len(encoded), length), self.pad_id, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for row, ids in enumerate(encoded):
      batch[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    return batch, mask


def wordpiece(vocab_path: str, *, lowercase: bool, max_length: int | None) -> Tokenizer:
  """BERT's WordPiece tokenizer from `vocab.txt` (one token a line, id = line number).

  BERT's text cleaning and CJK splitting; uncased checkpoints (`lowercase=True`) also strip accents, as
  BERT's `BasicTokenizer` does. `encode` adds `[CLS] ... [SEP]`.
  """
  backend = tokenizers.Tokenizer(models.WordPiece.from_file(str(vocab_path), unk_token="[UNK]"))
  special = {token: backend.token_to_id(token)
             for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
  absent = [token for token, index in special.items() if index is None]
  if absent:
    raise ValueError(f"vocab.txt at {vocab_path} lacks the special tokens {absent}")
  backend.add_special_tokens(list(special))
  backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
  backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  backend.post_processor = processors.BertProcessing(
      ("[SEP]", special["[SEP]"]), ("[CLS]", special["[CLS]"]))
  backend.decoder = decoders.WordPiece()
  return Tokenizer(backend, pad_id=special["[PAD]"], max_length=max_length)


# Pre-tokenizer (how text is split into words before the merges) per GGUF `tokenizer.ggml.pre`. GPT-2's
# split for the classic files; SmolLM additionally isolates every digit, as its merges were learned.
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL,
    "gpt-2": _BYTE_LEVEL,
    "smollm": pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL]),
}

# GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
_CONTROL = 3
_USER_DEFINED = 4


def gguf_bpe(metadata: dict) -> Tokenizer:
  """Byte-level BPE tokenizer (`tokenizer.ggml.model == 'gpt2'`) from GGUF metadata.

  Args:
    metadata: the GGUF key/value metadata as Python values (`tokenizer.ggml.tokens`, `.merges`,
      `.token_type`, `.pre`, `.bos_token_id`, `.add_bos_token`, `.padding_token_id`, ...).
  """
  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(
        f"only byte-level BPE GGUF tokenizers (tokenizer.ggml.model 'gpt2') are supported, got {kind!r}")
  pre = metadata.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise ValueError(
        f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: {sorted(_PRE_TOKENIZERS)}")
  tokens = metadata["tokenizer.ggml.tokens"]
  vocab = {token: index for index, token in enumerate(tokens)}
  merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
  backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
  backend.pre_tokenizer = _PRE_TOKENIZERS[pre]
  backend.decoder = decoders.ByteLevel()
  # Control (`<|im_start|>`) and user-defined tokens are matched whole in the text, never split by BPE.
  token_types = metadata.get("tokenizer.ggml.token_type", ())
  backend.add_special_tokens([
      tokenizers.AddedToken(token, special=True, normalized=False)
      for token, kind in zip(tokens, token_types) if kind == _CONTROL])
  backend.add_tokens([
      tokenizers.AddedToken(token, special=False, normalized=False)
      for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
  if metadata.get("tokenizer.ggml.add_bos_token", False):
    bos = tokens[metadata["tokenizer.ggml.bos_token_id"]]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, metadata["tokenizer.ggml.bos_token_id"])])
  pad_id = metadata.get("tokenizer.ggml.padding_token_id", metadata.get("tokenizer.ggml.eos_token_id"))
  if pad_id is None:
    raise ValueError("GGUF metadata has neither tokenizer.ggml.padding_token_id nor eos_token_id")
  return Tokenizer(backend, pad_id=pad_id)
