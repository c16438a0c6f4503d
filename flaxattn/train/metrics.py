"""Evaluation metrics on host values: classification, translation/summarisation scores, perplexity.

Classification metrics are computed here with NumPy; BLEU and chrF come from sacrebleu and ROUGE
from rouge-score (the `data` extra), so numbers match what papers using those libraries report.
Every function raises `ValueError` naming the lengths when its inputs are empty or mismatched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Counts that evaluations log beside their metrics (how much was evaluated, not how well): kept in
# metrics.jsonl, left out of TensorBoard, the learning curves and the report's metric table.
COUNTERS = ("tokens", "examples", "decoded_examples", "truncated_sources")


def is_metric(name: str) -> bool:
  """Whether a logged `name` (`eval_accuracy`, `test_examples`, ...) is a metric rather than a
  counter (`COUNTERS`, after the `eval_` / `test_` prefix)."""
  return not any(name == f"{prefix}_{counter}" for prefix in ("eval", "test")
                 for counter in COUNTERS)


def _check_same_nonzero_length(first, second, first_name: str, second_name: str) -> None:
  if len(first) != len(second):
    raise ValueError(f"{first_name} and {second_name} must have the same length, got "
                     f"{len(first)} and {len(second)}")
  if len(first) == 0:
    raise ValueError(f"{first_name} and {second_name} must not be empty, got length 0")


def _class_ids(pred, labels, num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  # Booleans are binary class ids: False 0, True 1.
  pred, labels = (np.asarray(ids).reshape(-1) for ids in (pred, labels))
  pred, labels = (ids.astype(np.int64) if ids.dtype == np.bool_ else ids for ids in (pred, labels))
  _check_same_nonzero_length(pred, labels, "pred", "labels")
  for name, ids in (("pred", pred), ("labels", labels)):
    if not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"{name} must hold integer (or boolean) class ids, got dtype {ids.dtype}")
    if num_classes is not None and (ids.min() < 0 or ids.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, num_classes={num_classes}), got values in "
                       f"[{ids.min()}, {ids.max()}]")
  return pred, labels


def accuracy(pred, labels) -> float:
  """Fraction of positions where `pred == labels`.

  Args:
    pred, labels: integer class ids, any shapes with the same number of elements (flattened).
  """
  pred, labels = _class_ids(pred, labels)
  return float(np.mean(pred == labels))


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
  """Counts `[num_classes, num_classes]` int64: row = true class, column = predicted class.

  The same layout as `sklearn.metrics.confusion_matrix(labels, pred)`.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be positive, got {num_classes!r}")
  pred, labels = _class_ids(pred, labels, num_classes)
  counts = np.bincount(labels.astype(np.int64) * num_classes + pred, minlength=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def macro_f1(pred, labels, num_classes: int) -> float:
  """Unweighted mean over all `num_classes` classes of F1 = 2 TP / (2 TP + FP + FN).

  A class that is neither true nor predicted anywhere has F1 0 (it still counts in the mean, as
  `sklearn.metrics.f1_score(labels, pred, labels=range(num_classes), average='macro',
  zero_division=0)` does); a class never predicted has F1 0.
  """
  matrix = confusion_matrix(pred, labels, num_classes)
  true_positives = np.diag(matrix).astype(np.float64)
  # Row sums count true members (TP + FN), column sums predictions (TP + FP).
  denominator = matrix.sum(axis=0) + matrix.sum(axis=1)
  per_class = np.divide(2 * true_positives, denominator, out=np.zeros(num_classes),
                        where=denominator > 0)
  return float(per_class.mean())


def _check_texts(hyps: Sequence[str], refs: Sequence[str]) -> tuple[list[str], list[str]]:
  if isinstance(hyps, str) or isinstance(refs, str):
    raise ValueError("hyps and refs must be sequences of strings, one per example, got a str")
  _check_same_nonzero_length(hyps, refs, "hyps", "refs")
  return list(hyps), list(refs)


def bleu(hyps: Sequence[str], refs: Sequence[str], *, tokenize: str = "13a") -> float:
  """Corpus BLEU (0-100) of `hyps` against one reference each, by `sacrebleu.corpus_bleu`.

  Args:
    hyps, refs: detokenized strings, `refs[i]` the reference for `hyps[i]`.
    tokenize: sacrebleu's tokenizer ('13a' is its default, the WMT standard).
  """
  import sacrebleu  # pylint: disable=import-outside-toplevel
  hyps, refs = _check_texts(hyps, refs)
  return float(sacrebleu.corpus_bleu(hyps, [refs], tokenize=tokenize).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus chrF (0-100, sacrebleu's defaults: character 6-grams, beta 2) by `sacrebleu.corpus_chrf`."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  hyps, refs = _check_texts(hyps, refs)
  return float(sacrebleu.corpus_chrf(hyps, [refs]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge(hyps: Sequence[str], refs: Sequence[str], *, use_stemmer: bool = True) -> dict[str, float]:
  """ROUGE-1/2/L F-measures (0-1) by rouge-score, averaged over examples.

  rouge-score's default tokenizer lower-cases and keeps only `[a-z0-9]` words: meant for English
  (non-ASCII letters are dropped).

  Returns:
    `{'rouge1': float, 'rouge2': float, 'rougeL': float}`.
  """
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  hyps, refs = _check_texts(hyps, refs)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for hyp, ref in zip(hyps, refs):
    scores = scorer.score(ref, hyp)  # rouge-score's order: (target, prediction)
    for rouge_type in ROUGE_TYPES:
      totals[rouge_type] += scores[rouge_type].fmeasure
  return {rouge_type: total / len(hyps) for rouge_type, total in totals.items()}


def perplexity(nll_sum: float, tokens: float) -> float:
  """`exp(nll_sum / tokens)`: perplexity from a summed negative log-likelihood in nats.

  Args:
    nll_sum: total negative log-likelihood (nats) over `tokens` predicted tokens.
    tokens: how many tokens the sum covers; must be positive.
  """
  nll_sum, tokens = float(nll_sum), float(tokens)
  if not tokens > 0:
    raise ValueError(f"tokens must be positive, got {tokens!r}")
  if not math.isfinite(nll_sum):
    raise ValueError(f"nll_sum must be finite, got {nll_sum!r}")
  try:
    return math.exp(nll_sum / tokens)
  except OverflowError:  # a mean NLL above ~709 nats: the model is no better than infinitely bad
    return math.inf
