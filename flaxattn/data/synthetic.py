"""Generated data that needs no download: a random Markov language and synthetic tasks.

- `MarkovCorpus`: language-model batches for end-to-end training runs.
- `listops`: the Long Range Arena's ListOps classification task.
- `sequence_task`: copy, reverse and associative recall.

Every batch or example is a pure function of `(seed, split, index)`, so an iterator position is one
integer, a resumed run sees exactly the data an uninterrupted one would, and processes can generate
their own shares independently.
"""

from __future__ import annotations

import functools
import operator
import random
from collections.abc import Callable, Sequence

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
    check_split(split, SPLITS)
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


# --------------------------------------------------------------------------------------------------
# Generated task data: random-access sequences whose example `i` is a pure function of
# `(seed, split, i)`, so any example can be produced on its own, in any order, by any process.

TASK_SPLITS = ("train", "validation", "test")


class GeneratedExamples(Sequence):
  """A read-only sequence of `num_examples` examples, example `i` made by `make_example(i)` on demand.

  Supports `len`, integer indexing (negative too) and slices (a list of examples); nothing is cached.
  """

  def __init__(self, num_examples: int, make_example: Callable[[int], dict]):
    if num_examples < 0:
      raise ValueError(f"num_examples must be non-negative, got {num_examples!r}")
    self._num_examples = num_examples
    self._make_example = make_example

  def __len__(self) -> int:
    return self._num_examples

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self._make_example(i) for i in range(*index.indices(self._num_examples))]
    index = operator.index(index)
    if not -self._num_examples <= index < self._num_examples:
      raise IndexError(f"index {index} out of range for {self._num_examples} examples")
    return self._make_example(index % self._num_examples)


def check_split(split: str, splits: tuple[str, ...] = TASK_SPLITS) -> None:
  """Raises `ValueError` naming `split` unless it is one of `splits`."""
  if split not in splits:
    raise ValueError(f"split must be one of {splits}, got {split!r}")


def _example_rng(task: str, seed: int, split: str, index: int) -> random.Random:
  # A string seed is hashed with SHA-512 by `random.Random`, so the stream is the same on every
  # platform and Python run (unlike `hash()`); Python's scalar draws are ~10x cheaper than NumPy's,
  # which matters for ListOps's one-draw-per-node growth.
  return random.Random(f"{task}/{seed}/{split}/{index}")


# ListOps (Nangia & Bowman 2018, as set up in the Long Range Arena, Tay et al. 2021).

LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
LISTOPS_DIGITS = tuple(str(digit) for digit in range(10))
# Every token that can occur in a ListOps text, operators first.
LISTOPS_TOKENS = LISTOPS_OPERATORS + (LISTOPS_END,) + LISTOPS_DIGITS
# LRA's generator makes a node an operator with this probability (when shallower than max_depth).
_LISTOPS_OPERATOR_PROBABILITY = 0.25
# Rejection sampling gives up after this many trees per example rather than loop forever on bounds
# that are feasible but practically never met.
_LISTOPS_MAX_ATTEMPTS = 1_000_000


class _TreeTooLong(Exception):
  """Raised while growing a ListOps tree as soon as it exceeds `max_length` tokens."""


def _apply_listops_operator(operator_token: str, arguments: list[int]) -> int:
  if operator_token == "[MIN":
    return min(arguments)
  if operator_token == "[MAX":
    return max(arguments)
  if operator_token == "[MED":
    # LRA's `int(np.median(...))`: an even count averages the two middle values and truncates.
    ordered = sorted(arguments)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) // 2
  return sum(arguments) % 10  # "[SM"


def _grow_listops_tree(rng: random.Random, depth: int, max_depth: int, max_args: int,
                       max_length: int, tokens: list[str]) -> int:
  """Appends one random (sub)tree's tokens to `tokens`; returns its value. Raises `_TreeTooLong`."""
  if depth < max_depth and rng.random() < _LISTOPS_OPERATOR_PROBABILITY:
    operator_token = rng.choice(LISTOPS_OPERATORS)
    tokens.append(operator_token)
    arguments = [_grow_listops_tree(rng, depth + 1, max_depth, max_args, max_length, tokens)
                 for _ in range(rng.randint(2, max_args))]
    tokens.append(LISTOPS_END)
    value = _apply_listops_operator(operator_token, arguments)
  else:
    value = rng.randrange(10)
    tokens.append(LISTOPS_DIGITS[value])
  if len(tokens) > max_length:
    raise _TreeTooLong
  return value


def listops_max_possible_length(max_depth: int, max_args: int) -> int:
  """Tokens in the largest tree the generator can make: every node above the digit level an operator
  with `max_args` arguments."""
  length = 1
  for _ in range(max_depth - 1):
    length = 2 + max_args * length
  return length


def _listops_example(index: int, *, seed: int, split: str, min_length: int, max_length: int,
                     max_depth: int, max_args: int) -> dict:
  """ListOps example `index`: trees are drawn until one has `min_length`-`max_length` tokens."""
  rng = _example_rng("listops", seed, split, index)
  for _ in range(_LISTOPS_MAX_ATTEMPTS):
    tokens: list[str] = []
    try:
      label = _grow_listops_tree(rng, 1, max_depth, max_args, max_length, tokens)
    except _TreeTooLong:
      continue
    if len(tokens) >= min_length:
      return {"text": " ".join(tokens), "label": label}
  raise RuntimeError(f"no ListOps tree with {min_length}-{max_length} tokens in "
                     f"{_LISTOPS_MAX_ATTEMPTS} draws (max_depth={max_depth}, max_args={max_args})")


def listops(split: str, num_examples: int, *, seed: int = 0, min_length: int = 500,
            max_length: int = 2000, max_depth: int = 10, max_args: int = 10) -> GeneratedExamples:
  """ListOps as in the Long Range Arena: nested list operations over digits, label the value.

  Each example is `{'text': str, 'label': int}`, e.g. `'[MAX 2 9 [MIN 4 7 ] 0 ]'` with label 9: the
  operators `[MIN`, `[MAX`, `[MED` (median, truncated to an integer for an even count) and `[SM`
  (sum modulo 10) each take 2 to `max_args` arguments and close with `]`; tokens are separated by
  single spaces (`LISTOPS_TOKENS` lists them all); `label` in 0-9 is the expression's value.

  Generation follows LRA's generator (`lra_benchmarks/data/listops.py`; the paper describes lengths
  up to 2K and a maximum depth of 10): starting with the root at depth 1, a node shallower than
  `max_depth` is an operator with probability 0.25 (else a uniform digit), with a uniform argument
  count in [2, `max_args`] and a uniform operator; a node at depth `max_depth` is a digit.
  Hence `depth` counts node levels, digits included, and brackets nest at most `max_depth - 1` deep.
  Trees whose token count falls outside [`min_length`, `max_length`] are rejected and redrawn, as LRA
  does (LRA's bounds are exclusive, these inclusive; growth stops early once a tree passes
  `max_length`, which rejects the same trees sooner). Unlike LRA, which draws one deduplicated pool
  and cuts it into splits, every example here is drawn independently from `(seed, split, index)`;
  at LRA's lengths a repeated tree is vanishingly unlikely, at the short lengths of tests it is not.

  Args:
    split: one of `TASK_SPLITS`; each split is an independent stream.
    num_examples: the sequence's length.
    seed: selects the whole data set.
    min_length: the fewest tokens of an example (inclusive).
    max_length: the most tokens of an example (inclusive).
    max_depth: node levels of the tree, root 1 and digits included.
    max_args: the most arguments an operator takes (at least 2).

  Returns:
    A random-access sequence (`GeneratedExamples`) of `num_examples` dicts; example `i` is generated
    when indexed, identically every time.
  """
  check_split(split)
  if max_args < 2:
    raise ValueError(f"max_args must be at least 2, got {max_args!r}")
  if max_depth < 1:
    raise ValueError(f"max_depth must be at least 1, got {max_depth!r}")
  if not 1 <= min_length <= max_length:
    raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length!r}, "
                     f"max_length={max_length!r}")
  largest = listops_max_possible_length(max_depth, max_args)
  if min_length > largest:
    raise ValueError(f"min_length={min_length} exceeds the longest tree possible with max_depth="
                     f"{max_depth} and max_args={max_args}: {largest} tokens")

  # A partial of a module-level function, not a closure, so the sequence pickles (grain workers).
  return GeneratedExamples(num_examples, functools.partial(
      _listops_example, seed=seed, split=split, min_length=min_length, max_length=max_length,
      max_depth=max_depth, max_args=max_args))


# Copy, reverse and associative recall: quick checks that a model can move information by attention.

SEQUENCE_TASKS = ("copy", "reverse", "recall")
# Token ids below this are reserved: 0 pad, 1 unk, 2 bos, 3 eos.
FIRST_CONTENT_ID = 4


def _sequence_task_example(index: int, *, name: str, seed: int, split: str, length: int,
                           vocab_size: int) -> dict:
  """Example `index` of copy, reverse or recall (arguments checked by `sequence_task`)."""
  rng = np.random.default_rng(_example_rng(name, seed, split, index).getrandbits(128))
  if name == "recall":
    num_pairs = (length - 1) // 2
    keys = rng.choice(vocab_size - FIRST_CONTENT_ID, num_pairs, replace=False) + FIRST_CONTENT_ID
    values = rng.integers(FIRST_CONTENT_ID, vocab_size, num_pairs)
    query = rng.integers(num_pairs)
    source = np.empty(length, np.int32)
    source[0:-1:2], source[1:-1:2], source[-1] = keys, values, keys[query]
    return {"source": source, "target": values[query:query + 1].astype(np.int32)}
  source = rng.integers(FIRST_CONTENT_ID, vocab_size, length).astype(np.int32)
  target = source.copy() if name == "copy" else source[::-1].copy()
  return {"source": source, "target": target}


def sequence_task(name: str, split: str, num_examples: int, *, length: int, vocab_size: int,
                  seed: int = 0) -> GeneratedExamples:
  """Synthetic sequence-to-sequence tasks over uniform random content ids in [4, `vocab_size`).

  Each example is `{'source': int32 [length], 'target': int32 [m]}`, with no bos/eos added:
  - `copy`: the target is the source (m = length).
  - `reverse`: the target is the source reversed (m = length).
  - `recall` (associative recall): the source is `(length - 1) // 2` key/value pairs
    `k1 v1 k2 v2 ...` with distinct keys, then one of the keys as the query (`length` must be odd);
    the target is that key's value (m = 1). Keys and values share the id range.

  Args:
    name: one of `SEQUENCE_TASKS`.
    split: one of `TASK_SPLITS`; each split is an independent stream.
    num_examples: the sequence's length.
    length: source tokens per example.
    vocab_size: ids are drawn from [4, vocab_size); 0-3 stay free for pad/unk/bos/eos.
    seed: selects the whole data set.

  Returns:
    A random-access sequence (`GeneratedExamples`); example `i` depends only on (name, seed, split, i).
  """
  if name not in SEQUENCE_TASKS:
    raise ValueError(f"name must be one of {SEQUENCE_TASKS}, got {name!r}")
  check_split(split)
  content_ids = vocab_size - FIRST_CONTENT_ID
  if content_ids < 2:
    raise ValueError(f"vocab_size must be at least {FIRST_CONTENT_ID + 2}, got {vocab_size!r}")
  if name == "recall":
    if length < 3 or length % 2 == 0:
      raise ValueError(f"recall needs an odd length >= 3 (pairs then a query), got {length!r}")
    num_pairs = (length - 1) // 2
    if num_pairs > content_ids:
      raise ValueError(f"recall with length={length} needs {num_pairs} distinct keys but vocab_size="
                       f"{vocab_size} leaves {content_ids} content ids")
  elif length < 1:
    raise ValueError(f"length must be positive, got {length!r}")

  return GeneratedExamples(num_examples, functools.partial(
      _sequence_task_example, name=name, seed=seed, split=split, length=length,
      vocab_size=vocab_size))
