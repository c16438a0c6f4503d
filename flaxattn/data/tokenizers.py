"""Tokenizers: bytes, whitespace words, SentencePiece (trained here or loaded), BERT WordPiece, and
the wrapper of Hugging Face `tokenizers` that pretrained checkpoints' tokenizers use.

Every tokenizer, here and in `flaxattn.models.pretrained`, satisfies the one `Tokenizer` protocol, so
pipelines, tasks, evaluation and attention maps need not know which one they hold:

  vocab_size: int                          number of ids, special tokens included
  pad_id, bos_id, eos_id, unk_id: int | None
                                           the special ids; None: the tokenizer has no such token
  encode(text, *, add_special_tokens=False) -> list[int]
                                           the ids of `text`, nothing added; with
                                           `add_special_tokens`, framed as its models take one text:
                                           `[bos] + ids + [eos]` (those that exist; BERT: `[CLS] ...
                                           [SEP]`), or a checkpoint's own template (GGUF: bos only)
  decode(ids, *, skip_special_tokens=True) -> str
                                           the text of `ids` (ints in `[0, vocab_size)`), pad, bos and
                                           eos dropped; `skip_special_tokens=False` keeps them, spelled
                                           as their pieces
  pieces(ids) -> list[str]                 one display label per id (attention-map axes)

The tokenizers of this module also have `save(directory) -> path` (the model file, with
`tokenizer.json` for `load_tokenizer`).

`build_tokenizer` trains or loads one cached in a directory (a run's workdir); `load_tokenizer` reloads
what it saved. Every file is written atomically (a temporary file, then `os.replace`), so a run killed
mid-write never leaves a truncated model that a later run would load.
"""

from __future__ import annotations

import collections
import io
import json
import pathlib
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import numpy as np

from flaxattn.files import write_atomically

DESCRIPTOR_FILE = "tokenizer.json"
WORDS_FILE = "tokenizer.words"
SENTENCEPIECE_FILE = "tokenizer.model"
WORDPIECE_FILE = "vocab.txt"
KINDS = ("byte", "word", "sentencepiece", "wordpiece")


def _write_atomic(path: pathlib.Path, data: bytes) -> pathlib.Path:
  write_atomically(path, lambda file: file.write(data), binary=True)
  return path


def _write_descriptor(directory, **description) -> pathlib.Path:
  """Writes `tokenizer.json` (`{'kind': ..., options}`), which `load_tokenizer` reads."""
  text = json.dumps(description, indent=2, sort_keys=True) + "\n"
  return _write_atomic(pathlib.Path(directory) / DESCRIPTOR_FILE, text.encode())


def _as_id_list(ids, vocab_size: int) -> list[int]:
  """`ids` (a sequence or 1-D array of ints) as a list, checked against `[0, vocab_size)`."""
  array = np.asarray(ids)
  if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"ids must be a 1-D sequence of ints, got shape {array.shape} dtype {array.dtype}")
  if array.size and (array.min() < 0 or array.max() >= vocab_size):
    raise ValueError(f"ids must lie in [0, {vocab_size}), got values in [{array.min()}, {array.max()}]")
  return array.tolist()


def _sentencepiece():
  """The `sentencepiece` module (an optional dependency: the 'data' extra)."""
  try:
    import sentencepiece  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("SentencePiece tokenizers need the `sentencepiece` package: "
                      "pip install 'flaxattn[data]'") from error
  return sentencepiece


def _check_text(text) -> str:
  if not isinstance(text, str):
    raise ValueError(f"text must be a str, got {type(text).__name__}")
  return text


class Tokenizer(Protocol):
  """What every tokenizer provides (the module docstring states the contract)."""

  vocab_size: int
  pad_id: int | None
  bos_id: int | None
  eos_id: int | None
  unk_id: int | None

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str: ...

  def pieces(self, ids) -> list[str]: ...


def framed(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
  """`[bos] + ids + [eos]`, leaving out a special the tokenizer lacks."""
  head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
  tail = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
  return head + list(ids) + tail


class _Contract:
  """`encode` and `decode` of the contract over a class's `_encode(text)` (nothing added) and
  `_decode(ids)` (a list of ids without pad, bos or eos)."""

  # Between decoded runs and kept special pieces (`decode(skip_special_tokens=False)`).
  separator = ""

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    ids = self._encode(_check_text(text))
    return framed(self, ids) if add_special_tokens else ids

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    ids = _as_id_list(ids, self.vocab_size)
    specials = {self.pad_id, self.bos_id, self.eos_id} - {None}
    if skip_special_tokens:
      return self._decode([index for index in ids if index not in specials])
    parts, run = [], []
    for index in ids:
      if index in specials:
        parts.extend([self._decode(run)] if run else [])
        parts.append(self.pieces([index])[0])
        run = []
      else:
        run.append(index)
    parts.extend([self._decode(run)] if run else [])
    return self.separator.join(parts)


class ByteTokenizer(_Contract):
  """UTF-8 bytes: id 0 pad, 1 bos, 2 eos, byte `b` at id `b + 3` (vocabulary 259, no unknown)."""

  pad_id, bos_id, eos_id, unk_id = 0, 1, 2, None
  offset = 3
  vocab_size = 256 + offset
  _SPECIAL_PIECES = ("<pad>", "<bos>", "<eos>")

  def _encode(self, text: str) -> list[int]:
    """The UTF-8 bytes of `text` shifted by 3."""
    return [byte + self.offset for byte in text.encode("utf-8")]

  def _decode(self, ids: list[int]) -> str:
    """Text of the byte ids; invalid UTF-8 becomes U+FFFD, never an error."""
    return bytes(index - self.offset for index in ids).decode("utf-8", errors="replace")

  def pieces(self, ids) -> list[str]:
    """Printable ASCII bytes as themselves, other bytes as `<0xNN>`, specials as `<pad>`/`<bos>`/`<eos>`."""
    labels = []
    for index in _as_id_list(ids, self.vocab_size):
      if index < self.offset:
        labels.append(self._SPECIAL_PIECES[index])
      else:
        byte = index - self.offset
        labels.append(chr(byte) if 0x20 <= byte < 0x7F else f"<0x{byte:02X}>")
    return labels

  def save(self, directory) -> pathlib.Path:
    """Writes `tokenizer.json` (a byte tokenizer has no model file) and returns its path."""
    return _write_descriptor(directory, kind="byte")


DEFAULT_WORD_SPECIALS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
_ROLES = ("pad", "bos", "eos", "unk")


class WordTokenizer(_Contract):
  """Whitespace-separated words, each one id; words outside the vocabulary map to `unk_id`.

  The special tokens take the first ids in the order pad, bos, eos, unk. A text that already contains
  the unknown token's spelling (Penn Treebank's `<unk>`) maps it to `unk_id`, so word-level perplexity
  counts those tokens like the published numbers do.

  Attributes:
    words: the vocabulary, id = position (specials first).
    unknown_count: how many words `encode` has mapped to `unk_id` so far, out of `encoded_count` words
      (a text's own `<unk>` tokens are not counted: they are in the vocabulary).
  """

  def __init__(self, words: Sequence[str], specials: Mapping[str, str | None] = DEFAULT_WORD_SPECIALS):
    """Args:
      words: the vocabulary including the specials, id = position.
      specials: role -> token for the roles 'pad', 'bos', 'eos' (required) and 'unk' (None: unknown
        words raise ValueError, for closed vocabularies such as ListOps').
    """
    unknown_roles = set(specials) - set(_ROLES)
    if unknown_roles:
      raise ValueError(f"specials roles must be among {_ROLES}, got {sorted(unknown_roles)}")
    self.words = list(words)
    self._ids = {word: index for index, word in enumerate(self.words)}
    if len(self._ids) != len(self.words):
      duplicated = [word for word, count in collections.Counter(self.words).items() if count > 1]
      raise ValueError(f"words must be distinct, got duplicates {duplicated[:10]}")
    bad = [word for word in self.words if not word or any(char.isspace() for char in word)]
    if bad:
      raise ValueError(f"words must be non-empty and contain no whitespace, got {bad[:10]!r}")
    self.specials = {role: specials.get(role) for role in _ROLES}
    for role in _ROLES:
      token = self.specials[role]
      if token is None and role != "unk":
        raise ValueError(f"specials must name a {role!r} token, got {dict(specials)!r}")
      if token is not None and token not in self._ids:
        raise ValueError(f"special token {token!r} ({role}) is not in the vocabulary")
    self.pad_id, self.bos_id, self.eos_id = (self._ids[self.specials[role]]
                                             for role in ("pad", "bos", "eos"))
    self.unk_id = None if self.specials["unk"] is None else self._ids[self.specials["unk"]]
    self.unknown_count = 0
    self.encoded_count = 0
    self._count_lock = threading.Lock()  # Pipelines may encode from several reading threads.

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  @classmethod
  def build(cls, texts: Iterable[str], *, max_size: int | None = None, min_count: int = 1,
            specials: Mapping[str, str | None] = DEFAULT_WORD_SPECIALS) -> WordTokenizer:
    """The vocabulary of `texts`: specials, then words by descending count, ties by word (deterministic).

    Args:
      texts: strings, split on whitespace.
      max_size: most ids in all, specials included (None: every word with `min_count`).
      min_count: words seen fewer times are left out (they become `<unk>`).
      specials: as in `__init__`; their spellings in `texts` are not counted as words.
    """
    if min_count < 1:
      raise ValueError(f"min_count must be >= 1, got {min_count!r}")
    special_tokens = [specials[role] for role in _ROLES if specials.get(role) is not None]
    if len(set(special_tokens)) != len(special_tokens):
      raise ValueError(f"special tokens must be distinct, got {dict(specials)!r}")
    if max_size is not None and max_size < len(special_tokens):
      raise ValueError(f"max_size must be >= the {len(special_tokens)} specials, got {max_size!r}")
    counts = collections.Counter()
    for text in texts:
      counts.update(_check_text(text).split())
    for token in special_tokens:
      counts.pop(token, None)
    ranked = sorted((item for item in counts.items() if item[1] >= min_count),
                    key=lambda item: (-item[1], item[0]))
    words = [word for word, _ in ranked]
    if max_size is not None:
      words = words[:max_size - len(special_tokens)]
    return cls(special_tokens + words, specials)

  separator = " "

  def _encode(self, text: str) -> list[int]:
    """Ids of the whitespace-separated words of `text`; unknown words give `unk_id` (counted)."""
    ids, unknown = [], 0
    for word in text.split():
      index = self._ids.get(word)
      if index is None:
        if self.unk_id is None:
          raise ValueError(f"word {word!r} is not in the vocabulary and this tokenizer has no unk token")
        index = self.unk_id
        unknown += 1
      ids.append(index)
    with self._count_lock:
      self.unknown_count += unknown
      self.encoded_count += len(ids)
    return ids

  def _decode(self, ids: list[int]) -> str:
    """Words joined by single spaces."""
    return " ".join(self.words[index] for index in ids)

  def pieces(self, ids) -> list[str]:
    return [self.words[index] for index in _as_id_list(ids, self.vocab_size)]

  def save(self, directory) -> pathlib.Path:
    """Writes `tokenizer.words` (JSON: specials and words) and `tokenizer.json`; returns the former."""
    content = json.dumps({"specials": self.specials, "words": self.words}, ensure_ascii=False)
    path = _write_atomic(pathlib.Path(directory) / WORDS_FILE, content.encode("utf-8"))
    _write_descriptor(directory, kind="word")
    return path

  @classmethod
  def load(cls, path) -> WordTokenizer:
    """Reads a `tokenizer.words` file written by `save`."""
    try:
      content = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
      return cls(content["words"], content["specials"])
    except (json.JSONDecodeError, KeyError, TypeError) as error:
      raise ValueError(f"{path} is not a tokenizer.words file written by WordTokenizer.save: {error}") from error


class SentencePieceTokenizer(_Contract):
  """A SentencePiece model (unigram or BPE); models trained by `train` use pad 0, unk 1, bos 2, eos 3."""

  def __init__(self, model_path=None, *, model_proto: bytes | None = None):
    """Loads a `.model` file (`model_path`) or its serialised bytes (`model_proto`), exactly one."""
    sentencepiece = _sentencepiece()
    if (model_path is None) == (model_proto is None):
      raise ValueError(f"give exactly one of model_path and model_proto, got model_path={model_path!r} "
                       f"and model_proto of {None if model_proto is None else len(model_proto)} bytes")
    if model_proto is None:
      model_proto = pathlib.Path(model_path).read_bytes()
    self.model_proto = bytes(model_proto)
    self._processor = sentencepiece.SentencePieceProcessor(model_proto=self.model_proto)
    special = {"pad": self._processor.pad_id(), "bos": self._processor.bos_id(),
               "eos": self._processor.eos_id(), "unk": self._processor.unk_id()}
    absent = [role for role in ("pad", "bos", "eos") if special[role] < 0]
    if absent:
      raise ValueError(f"the SentencePiece model {model_path or '(bytes)'} has no {absent} id; "
                       "train it with pad_id, bos_id and eos_id set (as `train` does)")
    self.pad_id, self.bos_id, self.eos_id = special["pad"], special["bos"], special["eos"]
    self.unk_id = special["unk"] if special["unk"] >= 0 else None

  @property
  def vocab_size(self) -> int:
    return self._processor.get_piece_size()

  @classmethod
  def train(cls, texts: Iterable[str], model_prefix=None, *, vocab_size: int,
            model_type: str = "unigram", character_coverage: float = 1.0, seed: int = 0,
            max_sentence_length: int = 1 << 16, **options) -> SentencePieceTokenizer:
    """Trains on `texts` in this process (streamed from the iterable, no temporary corpus file).

    Training is single-threaded and seeded, so the same texts give the same model bytes.

    Args:
      texts: training sentences (lines longer than `max_sentence_length` bytes are skipped by
        SentencePiece, so the default is generous).
      model_prefix: when given, the model is also written (atomically) to `f'{model_prefix}.model'`.
      vocab_size: pieces in all, the 4 specials included.
      model_type: 'unigram' or 'bpe'.
      character_coverage: fraction of characters covered by the alphabet (1.0: every character).
      seed: SentencePiece's random seed.
      **options: further `SentencePieceTrainer` flags (e.g. `user_defined_symbols`).
    """
    sentencepiece = _sentencepiece()
    if model_type not in ("unigram", "bpe"):
      raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if not isinstance(vocab_size, int) or vocab_size < 5:
      raise ValueError(f"vocab_size must be an int >= 5 (4 specials and a piece), got {vocab_size!r}")
    sentencepiece.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
      sentencepiece.SentencePieceTrainer.train(
          sentence_iterator=(_check_text(text) for text in texts), model_writer=model,
          vocab_size=vocab_size, model_type=model_type, character_coverage=character_coverage,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1,
          max_sentence_length=max_sentence_length, minloglevel=2, **options)
    except RuntimeError as error:  # e.g. "Vocabulary size is too high" for a small corpus.
      raise ValueError(f"SentencePiece training failed (vocab_size={vocab_size}, "
                       f"model_type={model_type!r}): {error}") from error
    tokenizer = cls(model_proto=model.getvalue())
    if model_prefix is not None:
      _write_atomic(pathlib.Path(f"{model_prefix}.model"), tokenizer.model_proto)
    return tokenizer

  def _encode(self, text: str) -> list[int]:
    return self._processor.encode(text, out_type=int)

  def _decode(self, ids: list[int]) -> str:
    """Text of `ids` (unk decodes to SentencePiece's ` ⁇ `)."""
    return self._processor.decode(ids)

  def pieces(self, ids) -> list[str]:
    """The pieces, with SentencePiece's word-start mark `▁`."""
    return [self._processor.id_to_piece(index) for index in _as_id_list(ids, self.vocab_size)]

  def save(self, directory) -> pathlib.Path:
    """Writes `tokenizer.model` and `tokenizer.json`; returns the former."""
    path = _write_atomic(pathlib.Path(directory) / SENTENCEPIECE_FILE, self.model_proto)
    _write_descriptor(directory, kind="sentencepiece")
    return path


def _hf_tokenizers():
  """The Hugging Face `tokenizers` package (an optional dependency: the 'pretrained' extra)."""
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError("WordPiece and pretrained checkpoints' tokenizers need the `tokenizers` "
                      "package: pip install 'flaxattn[pretrained]'") from error
  return tokenizers


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` (Rust, fast) with its special ids stated, under the
  contract of this module; `encode(add_special_tokens=True)` applies the backend's own template.

  Attributes:
    max_length: inputs longer than this many tokens are truncated (None: never).
  """

  def __init__(self, backend, *, pad_id: int, bos_id: int | None = None,
               eos_id: int | None = None, unk_id: int | None = None,
               max_length: int | None = None):
    self._backend = backend
    self.pad_id = int(pad_id)
    self.bos_id, self.eos_id, self.unk_id = (None if index is None else int(index)
                                             for index in (bos_id, eos_id, unk_id))
    self.max_length = max_length
    if max_length is not None:
      backend.enable_truncation(max_length)

  @property
  def vocab_size(self) -> int:
    return self._backend.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    """The id of one vocabulary entry (e.g. `'[CLS]'`, `'<|im_end|>'`), or None if absent."""
    return self._backend.token_to_id(token)

  def id_to_token(self, index: int) -> str | None:
    """The vocabulary entry of one id (e.g. `'##ing'`), or None if out of range."""
    return self._backend.id_to_token(int(index))

  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    return self._backend.encode(_check_text(text), add_special_tokens=add_special_tokens).ids

  def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
    ids = _as_id_list(ids, self.vocab_size)
    if skip_special_tokens:
      dropped = {self.pad_id, self.bos_id, self.eos_id}
      ids = [index for index in ids if index not in dropped]
    # The backend's own skipping would drop every added token (`<|im_start|>`, `[MASK]`), not
    # the three of the contract.
    return self._backend.decode(ids, skip_special_tokens=False)

  def pieces(self, ids) -> list[str]:
    return [self._backend.id_to_token(index) for index in _as_id_list(ids, self.vocab_size)]

  def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The model inputs of `texts`: each encoded with its special tokens, right-padded to the
    longest.

    Returns:
      `(ids, mask)`: `ids` `[batch, length]` int32 padded with `pad_id`; `mask` `[batch, length]` bool,
      True on real tokens.
    """
    if isinstance(texts, str) or not texts:
      raise ValueError(f"texts must be a non-empty sequence of str, got {texts!r}")
    # The backend's batch call encodes in Rust threads (the ids of `encode` one text at a time).
    encoded = [encoding.ids for encoding in self._backend.encode_batch(
        [_check_text(text) for text in texts], add_special_tokens=True)]
    length = max(len(ids) for ids in encoded)
    batch = np.full((len(encoded), length), self.pad_id, np.int32)
    mask = np.zeros((len(encoded), length), bool)
    for row, ids in enumerate(encoded):
      batch[row, :len(ids)] = ids
      mask[row, :len(ids)] = True
    return batch, mask


class WordPieceTokenizer(HFTokenizer):
  """BERT WordPiece from a `vocab.txt` (one token a line, id = line number), with the ids of the
  checkpoint that ships it: `bos_id` is `[CLS]`, `eos_id` `[SEP]`, `pad_id` `[PAD]`, `unk_id`
  `[UNK]`.

  BERT's text cleaning and CJK splitting; `lowercase` (uncased checkpoints) also strips accents, as
  BERT's `BasicTokenizer` does. `decode` joins `##` continuations.
  """

  def __init__(self, vocab_file, *, lowercase: bool = True, max_length: int | None = None):
    tokenizers = _hf_tokenizers()
    self.vocab_file = pathlib.Path(vocab_file)
    self.lowercase = bool(lowercase)
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordPiece.from_file(str(self.vocab_file), unk_token="[UNK]"))
    special = {token: backend.token_to_id(token)
               for token in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    absent = [token for token, index in special.items() if index is None]
    if absent:
      raise ValueError(f"vocab.txt at {self.vocab_file} lacks the special tokens {absent}")
    backend.add_special_tokens(list(special))
    backend.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=self.lowercase)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
    backend.post_processor = tokenizers.processors.BertProcessing(
        ("[SEP]", special["[SEP]"]), ("[CLS]", special["[CLS]"]))
    backend.decoder = tokenizers.decoders.WordPiece()
    super().__init__(backend, pad_id=special["[PAD]"], bos_id=special["[CLS]"],
                     eos_id=special["[SEP]"], unk_id=special["[UNK]"], max_length=max_length)

  def save(self, directory) -> pathlib.Path:
    """Copies the vocabulary to `vocab.txt` and writes `tokenizer.json`; returns the former."""
    path = _write_atomic(pathlib.Path(directory) / WORDPIECE_FILE, self.vocab_file.read_bytes())
    _write_descriptor(directory, kind="wordpiece", lowercase=self.lowercase)
    return path




def build_tokenizer(kind: str, *, directory, texts: Callable[[], Iterable[str]] | None = None,
                    vocab_size: int | None = None, model_path=None, model_type: str = "unigram",
                    character_coverage: float = 1.0, min_count: int = 1,
                    word_specials: Mapping[str, str | None] = DEFAULT_WORD_SPECIALS,
                    lowercase: bool = True, seed: int = 0) -> Tokenizer:
  """The tokenizer a run uses, saved in `directory` so that later runs and `load_tokenizer` reuse it.

  Args:
    kind: 'byte', 'word', 'sentencepiece' or 'wordpiece'.
    directory: where the tokenizer is cached (e.g. the workdir); None: nothing is cached, loaded or
      saved (a 'word' or 'sentencepiece' tokenizer is trained every time).
    texts: a zero-argument callable returning the training texts; called only when a 'word' or
      'sentencepiece' tokenizer must be trained (nothing is read when one is cached).
    vocab_size: SentencePiece pieces in all; for 'word', the most ids (None: every word).
    model_path: an existing model to use instead of training ('sentencepiece': a `.model` file;
      'word': a `tokenizer.words` file; 'wordpiece': BERT's `vocab.txt`, required).
    model_type: SentencePiece 'unigram' or 'bpe'.
    character_coverage: a SentencePiece training option.
    min_count: a `WordTokenizer.build` option (the fewest occurrences of a kept word).
    word_specials: a `WordTokenizer.build` option (role -> special token).
    seed: the SentencePiece training seed.
    lowercase: WordPiece lower-casing (uncased BERT checkpoints).

  Returns:
    The tokenizer, saved in `directory` (`tokenizer.json` plus its model file).
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  directory = None if directory is None else pathlib.Path(directory)
  if kind == "byte":
    tokenizer = ByteTokenizer()
  elif kind == "wordpiece":
    if model_path is None:
      raise ValueError("kind='wordpiece' needs model_path, the BERT vocab.txt")
    tokenizer = WordPieceTokenizer(model_path, lowercase=lowercase)
  else:
    file_name = WORDS_FILE if kind == "word" else SENTENCEPIECE_FILE
    cached = None if directory is None else directory / file_name
    source = pathlib.Path(model_path) if model_path is not None else cached
    if source is not None and source.exists():
      tokenizer = WordTokenizer.load(source) if kind == "word" else SentencePieceTokenizer(source)
    elif model_path is not None:
      raise ValueError(f"model_path {str(model_path)!r} does not exist")
    elif texts is None:
      raise ValueError(f"no {file_name} in directory={None if directory is None else str(directory)!r} "
                       f"and no texts to train a {kind!r} tokenizer on")
    elif kind == "word":
      tokenizer = WordTokenizer.build(texts(), max_size=vocab_size, min_count=min_count,
                                      specials=word_specials)
    else:
      if vocab_size is None:
        raise ValueError("kind='sentencepiece' needs vocab_size to train a model")
      tokenizer = SentencePieceTokenizer.train(
          texts(), vocab_size=vocab_size, model_type=model_type,
          character_coverage=character_coverage, seed=seed)
  # Re-saving a cached model rewrites the same bytes; it also adds `tokenizer.json` next to a model
  # file that was put there by hand.
  if directory is not None:
    tokenizer.save(directory)
  return tokenizer


def load_tokenizer(directory) -> Tokenizer:
  """Reloads the tokenizer that `build_tokenizer` (or a tokenizer's `save`) left in `directory`."""
  directory = pathlib.Path(directory)
  descriptor = directory / DESCRIPTOR_FILE
  if not descriptor.exists():
    raise FileNotFoundError(f"no {DESCRIPTOR_FILE} in {str(directory)!r}: build_tokenizer saves one there")
  description = json.loads(descriptor.read_text())
  kind = description.get("kind")
  if kind == "byte":
    return ByteTokenizer()
  if kind == "word":
    return WordTokenizer.load(directory / WORDS_FILE)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(directory / SENTENCEPIECE_FILE)
  if kind == "wordpiece":
    return WordPieceTokenizer(directory / WORDPIECE_FILE, lowercase=description.get("lowercase", True))
  raise ValueError(f"{str(descriptor)!r} has kind {kind!r}, expected one of {KINDS}")
