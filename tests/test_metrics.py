"""Metric functions against scikit-learn, sacrebleu and rouge-score on known cases."""

import math

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer
from sklearn import metrics as sklearn_metrics

from flaxattn.train import metrics

HYPS = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog",
        "he went to the market yesterday", "completely unrelated words here"]
REFS = ["the cat sat on a mat", "the quick brown fox jumped over the lazy dog",
        "yesterday he went to the market", "the rain in spain stays mainly in the plain"]


def test_accuracy_and_confusion_matrix_against_sklearn():
  rng = np.random.default_rng(0)
  labels, pred = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
  assert metrics.accuracy(pred, labels) == pytest.approx(
      sklearn_metrics.accuracy_score(labels, pred), abs=1e-12)
  assert metrics.accuracy(pred.reshape(10, 20), labels.reshape(10, 20)) == pytest.approx(
      np.mean(pred == labels), abs=1e-12)
  assert metrics.macro_f1(pred > 1, labels > 1, 2) == pytest.approx(
      sklearn_metrics.f1_score(labels > 1, pred > 1, average="macro"), abs=1e-12)
  np.testing.assert_array_equal(metrics.confusion_matrix(pred, labels, 5),
                                sklearn_metrics.confusion_matrix(labels, pred, labels=range(5)))


@pytest.mark.parametrize("case", ["random", "class_never_predicted", "class_absent"])
def test_macro_f1_against_sklearn(case):
  rng = np.random.default_rng(1)
  num_classes = 4
  labels = rng.integers(0, num_classes, 300)
  pred = rng.integers(0, num_classes, 300)
  if case == "class_never_predicted":
    pred = np.where(pred == 2, 1, pred)  # class 2 is true sometimes, never predicted
  if case == "class_absent":
    labels, pred = np.where(labels == 3, 0, labels), np.where(pred == 3, 0, pred)
  ours = metrics.macro_f1(pred, labels, num_classes)
  expected = sklearn_metrics.f1_score(labels, pred, labels=list(range(num_classes)),
                                      average="macro", zero_division=0)
  assert ours == pytest.approx(expected, abs=1e-12)
  if case == "class_never_predicted":
    # sklearn's plain call (averaging over the classes seen in labels or pred) agrees whenever
    # every class is present somewhere, here as a true class that is never predicted.
    assert ours == pytest.approx(sklearn_metrics.f1_score(labels, pred, average="macro"), abs=1e-12)
    assert ours < metrics.macro_f1(labels, labels, num_classes)


def test_macro_f1_hand_case():
  # class 0: TP 1, FP 1, FN 0 -> 2/3; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: never -> 0.
  assert metrics.macro_f1([0, 0, 1], [0, 1, 1], 3) == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)


def test_bleu_and_chrf_against_sacrebleu():
  assert metrics.bleu(HYPS, REFS) == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score,
                                                   abs=1e-9)
  assert metrics.chrf(HYPS, REFS) == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score,
                                                   abs=1e-9)
  # Known values: an exact match scores 100, a single sentence equals sacrebleu's sentence score.
  assert metrics.bleu(REFS, REFS) == pytest.approx(100.0)
  assert metrics.chrf(REFS, REFS) == pytest.approx(100.0)
  assert metrics.bleu(HYPS[1:2], REFS[1:2]) == pytest.approx(
      sacrebleu.sentence_bleu(HYPS[1], [REFS[1]]).score, abs=1e-9)
  assert metrics.chrf(HYPS[:1], REFS[:1]) == pytest.approx(
      sacrebleu.sentence_chrf(HYPS[0], [REFS[0]]).score, abs=1e-9)
  assert 0 < metrics.bleu(HYPS, REFS) < 100


def test_rouge_against_rouge_score():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  per_example = [scorer.score(ref, hyp) for hyp, ref in zip(HYPS, REFS)]
  ours = metrics.rouge(HYPS, REFS)
  assert set(ours) == {"rouge1", "rouge2", "rougeL"}
  for rouge_type, value in ours.items():
    expected = np.mean([scores[rouge_type].fmeasure for scores in per_example])
    assert value == pytest.approx(expected, abs=1e-12)
  # "the cat sat on the mat" vs "the cat sat on a mat": 5 of 6 unigrams match each way.
  assert metrics.rouge(HYPS[:1], REFS[:1])["rouge1"] == pytest.approx(5 / 6)


def test_perplexity():
  assert metrics.perplexity(math.log(10.0) * 50, 50) == pytest.approx(10.0)
  assert metrics.perplexity(0.0, 7) == 1.0
  assert metrics.perplexity(1e6, 1) == math.inf
  with pytest.raises(ValueError, match="tokens must be positive, got 0.0"):
    metrics.perplexity(3.0, 0)


def test_errors_name_the_lengths():
  with pytest.raises(ValueError, match="3 and 2"):
    metrics.accuracy([0, 1, 2], [0, 1])
  with pytest.raises(ValueError, match="length 0"):
    metrics.macro_f1([], [], 3)
  with pytest.raises(ValueError, match=r"\[0, 3\]"):
    metrics.confusion_matrix([0, 3], [0, 1], 3)
  with pytest.raises(ValueError, match="4 and 1"):
    metrics.bleu(HYPS, REFS[:1])
  with pytest.raises(ValueError, match="length 0"):
    metrics.chrf([], [])
  with pytest.raises(ValueError, match="4 and 3"):
    metrics.rouge(HYPS, REFS[:3])
  with pytest.raises(ValueError, match="got a str"):
    metrics.bleu("a hypothesis", "a reference")
  with pytest.raises(ValueError, match="dtype float"):
    metrics.accuracy([0.0, 1.0], [0, 1])


def test_tfidf_logistic_regression_against_direct_sklearn():
  from sklearn.feature_extraction.text import TfidfVectorizer
  from sklearn.linear_model import LogisticRegression

  from flaxattn.train.baselines import tfidf_logistic_regression
  rng = np.random.default_rng(0)
  cue_words = [["awful", "terrible", "bad"], ["okay", "fine", "plain"], ["great", "lovely", "good"]]
  filler = ["the", "a", "day", "movie", "was", "it", "and", "very", "this"]

  def make(count):
    labels = rng.integers(0, 3, count)
    # One cue word among fillers; 10% of texts carry another class's cue, so the task is not trivial.
    cues = np.where(rng.random(count) < 0.1, rng.integers(0, 3, count), labels)
    texts = [" ".join(list(rng.choice(filler, 5)) + [str(rng.choice(cue_words[cue]))])
             for cue in cues]
    return texts, labels

  train_texts, train_labels = make(240)
  test_texts, test_labels = make(90)
  result = tfidf_logistic_regression(train_texts, train_labels, test_texts, test_labels,
                                     c_grid=(0.3, 10.0))
  assert set(result) == {"accuracy", "macro_f1", "C"} and result["C"] in (0.3, 10.0)
  assert result["accuracy"] > 0.7
  # The same model built directly with scikit-learn gives the same predictions and scores.
  vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
  classifier = LogisticRegression(C=result["C"], solver="saga", max_iter=2000, random_state=0)
  classifier.fit(vectorizer.fit_transform(train_texts), train_labels)
  predictions = classifier.predict(vectorizer.transform(test_texts))
  assert result["accuracy"] == pytest.approx(
      sklearn_metrics.accuracy_score(test_labels, predictions), abs=1e-12)
  assert result["macro_f1"] == pytest.approx(
      sklearn_metrics.f1_score(test_labels, predictions, average="macro"), abs=1e-12)
  with pytest.raises(ValueError, match="240 and 239"):
    tfidf_logistic_regression(train_texts, train_labels[:-1], test_texts, test_labels)
