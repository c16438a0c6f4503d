"""Data sources for training."""

from flaxattn.data.synthetic import MarkovCorpus

__all__ = ["MarkovCorpus"]
