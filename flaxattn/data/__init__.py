"""Data sources for training."""

from flaxattn.data.synthetic import (LISTOPS_TOKENS, SEQUENCE_TASKS, TASK_SPLITS, MarkovCorpus,
                                     listops, sequence_task)

__all__ = ["LISTOPS_TOKENS", "SEQUENCE_TASKS", "TASK_SPLITS", "MarkovCorpus", "listops",
           "sequence_task"]
