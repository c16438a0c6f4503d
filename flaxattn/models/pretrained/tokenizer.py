"""Tokenizers of pretrained checkpoints: byte-level BPE from GGUF metadata (BERT's WordPiece from a
`vocab.txt` is `flaxattn.data.tokenizers.WordPieceTokenizer`).

Both are `flaxattn.data.tokenizers.HFTokenizer`s: a Hugging Face `tokenizers.Tokenizer` (Rust,
fast) built from the checkpoint's own files, so that ids match the model's embedding table, under the
one tokenizer contract of `flaxattn.data.tokenizers`.
"""

from __future__ import annotations

from flaxattn.data.tokenizers import HFTokenizer

try:
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors
except ImportError as error:  # Optional dependency: only loading pretrained checkpoints needs it.
  raise ImportError(
      "flaxattn.models.pretrained needs the `tokenizers` package: pip install 'flaxattn[pretrained]'"
  ) from error


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


def gguf_bpe(metadata: dict) -> HFTokenizer:
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
  return HFTokenizer(backend, pad_id=pad_id, bos_id=metadata.get("tokenizer.ggml.bos_token_id"),
                     eos_id=metadata.get("tokenizer.ggml.eos_token_id"),
                     unk_id=metadata.get("tokenizer.ggml.unknown_token_id"))
