"""Classical baselines that the neural experiments are compared against (scikit-learn)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from flaxattn.train import metrics

logger = logging.getLogger(__name__)

# Inverse regularisation strengths tried by cross-validation on the training set.
TFIDF_C_GRID = (0.3, 1.0, 3.0, 10.0)


def tfidf_logistic_regression(train_texts: Sequence[str], train_labels: Sequence[int],
                              test_texts: Sequence[str], test_labels: Sequence[int], *,
                              seed: int = 0, num_classes: int | None = None,
                              c_grid: Sequence[float] = TFIDF_C_GRID,
                              cv_folds: int = 3) -> dict:
  """TF-IDF word 1-2-grams + logistic regression, tuned on the training set only.

  The vectoriser uses sublinear term frequencies and ignores n-grams seen in fewer than 2 training
  texts. The regularisation strength C is chosen from `c_grid` by stratified `cv_folds`-fold
  cross-validation on the training texts (macro-F1), then the model is refitted on all of them and
  scored once on the test texts, which play no part in any choice. C depends on the training set
  alone: to score more splits without repeating the search, pass `c_grid=(result['C'],)`.

  Args:
    train_texts, train_labels: training texts and their integer class ids.
    test_texts, test_labels: the evaluation texts and ids (a validation or test split).
    seed: seeds the cross-validation folds and the solver's shuffling.
    num_classes: classes for macro-F1; default one more than the largest id in either label set.
    c_grid: candidate C values; one value skips the cross-validation.
    cv_folds: folds of the cross-validation.

  Returns:
    `{'accuracy': float, 'macro_f1': float, 'C': float}` on the test texts (C the chosen value).
  """
  # scikit-learn is an optional dependency (the `data` extra), imported where it is needed.
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=import-outside-toplevel
  from sklearn.linear_model import LogisticRegression  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import GridSearchCV, StratifiedKFold  # pylint: disable=import-outside-toplevel
  from sklearn.pipeline import make_pipeline  # pylint: disable=import-outside-toplevel

  if len(train_texts) != len(train_labels):
    raise ValueError(f"train_texts and train_labels must have the same length, got "
                     f"{len(train_texts)} and {len(train_labels)}")
  if len(test_texts) != len(test_labels):
    raise ValueError(f"test_texts and test_labels must have the same length, got "
                     f"{len(test_texts)} and {len(test_labels)}")
  if not len(train_texts) or not len(test_texts):
    raise ValueError(f"need training and test texts, got {len(train_texts)} and "
                     f"{len(test_texts)}")
  if not c_grid:
    raise ValueError(f"c_grid must hold at least one C, got {c_grid!r}")
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

  pipeline = make_pipeline(
      TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True),
      # saga reaches the same optimum as the default lbfgs here (validation macro-F1 0.7326 vs
      # 0.7327 on the tweets) 20x faster on these sparse, L2-normalised rows; seeded, it shuffles.
      LogisticRegression(solver="saga", max_iter=2000, random_state=seed))
  if len(c_grid) == 1:
    chosen_c = float(c_grid[0])
    pipeline.set_params(logisticregression__C=chosen_c).fit(list(train_texts), train_labels)
    model = pipeline
  else:
    search = GridSearchCV(
        pipeline, {"logisticregression__C": list(c_grid)}, scoring="f1_macro",
        cv=StratifiedKFold(cv_folds, shuffle=True, random_state=seed), refit=True)
    search.fit(list(train_texts), train_labels)
    chosen_c = float(search.best_params_["logisticregression__C"])
    logger.info("TF-IDF baseline: C=%g chosen, cross-validated macro-F1 %.4f", chosen_c,
                search.best_score_)
    model = search.best_estimator_
  predictions = model.predict(list(test_texts))
  return {"accuracy": metrics.accuracy(predictions, test_labels),
          "macro_f1": metrics.macro_f1(predictions, test_labels, num_classes),
          "C": chosen_c}
