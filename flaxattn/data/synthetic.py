"""A generated corpus for end-to-end training runs that need no download: a random Markov language.

Every batch is a pure function of `(seed, split, index)`, so the iterator position is one integer
and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np

SPLITS = ("train", "eval")


class MarkovCorpus:
  """Token sequences from a fixed random first-order Markov chain.

  Each of the `vocab_size` tokens has `branching` possible successors with Dirichlet-drawn
  probabilities (all drawn from `seed`), so a model that learns the table reaches a loss near the
  chain's entropy rate (`entropy_rate`), far below the `log(vocab_size)` of guessing.
  """

  def __init__(self, vocab_size: int, seq_len: int, *, branching: int = 4, seed: int = 0):
    if not 1 <= branching <= vocab_size:
      raise ValueError(f"branching must be in [1, vocab_size={vocab_size}], got {branching}")
    if seq_len < 1:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
    rng = np.random.default_rng(seed)
    self.successors = np.stack([rng.choice(vocab_size, branching, replace=False)
                                for _ in range(vocab_size)])
    self.cumulative = np.cumsum(rng.dirichlet(np.ones(branching), vocab_size), axis=1)

  @property
  def entropy_rate(self) -> float:
    """Nats per token of the chain under its stationary distribution (the best achievable loss)."""
    probs = np.diff(self.cumulative, prepend=0.0, axis=1)
    transition = np.zeros((self.vocab_size, self.vocab_size))
    np.add.at(transition, (np.arange(self.vocab_size)[:, None], self.successors), probs)
    stationary = np.full(self.vocab_size, 1.0 / self.vocab_size)
    for _ in range(1000):
      stationary = stationary @ transition
    row_entropy = -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0.0), axis=1)
    return float(stationary @ row_entropy)

  def batch(self, index: int, batch_size: int, *, split: str = "train",
            rows: slice = slice(None)) -> dict[str, np.ndarray]:
    """Batch number `index` of `split`, the given `rows` of it (a process's share).

    Returns an lm batch (`flaxattn.train.losses`): `inputs`, `targets` int32 and `weights` float32,
    each `[rows, seq_len]`.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng((self.seed, SPLITS.index(split), index))
    tokens = np.empty((batch_size, self.seq_len + 1), np.int32)
    tokens[:, 0] = rng.integers(0, self.vocab_size, batch_size)
    draws = rng.random((batch_size, self.seq_len))
    for t in range(self.seq_len):
      choice = (draws[:, t, None] > self.cumulative[tokens[:, t]]).sum(axis=1)
      tokens[:, t + 1] = self.successors[tokens[:, t], np.minimum(choice, self.successors.shape[1] - 1)]
    tokens = tokens[rows]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones(tokens[:, 1:].shape, np.float32)}
