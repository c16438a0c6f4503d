"""Generated tasks: ListOps against an independent evaluator, copy/reverse/recall structure."""

import collections
import pickle
import statistics

import numpy as np
import pytest

from flaxattn.data.synthetic import (LISTOPS_TOKENS, SEQUENCE_TASKS, listops,
                                     listops_max_possible_length, sequence_task)

SMALL = dict(min_length=20, max_length=60)


def evaluate_listops(text):
  """Parses a ListOps text independently of the generator: returns (value, node depth, max args)."""
  tokens = text.split(" ")
  position = 0

  def parse(depth):
    nonlocal position
    token = tokens[position]
    position += 1
    if token.isdigit():
      assert len(token) == 1, token
      return int(token), depth, 0
    assert token.startswith("["), token
    arguments, deepest, widest = [], depth, 0
    while tokens[position] != "]":
      value, sub_depth, sub_width = parse(depth + 1)
      arguments.append(value)
      deepest, widest = max(deepest, sub_depth), max(widest, sub_width)
    position += 1  # the closing "]"
    operations = {"[MIN": min, "[MAX": max, "[SM": lambda xs: sum(xs) % 10,
                  "[MED": lambda xs: int(statistics.median(xs))}
    return operations[token](arguments), deepest, max(widest, len(arguments))

  result = parse(1)
  assert position == len(tokens), "trailing tokens after the root expression"
  return result


def test_evaluator_on_hand_made_cases():
  assert evaluate_listops("[MAX 2 9 [MIN 4 7 ] 0 ]") == (9, 3, 4)
  assert evaluate_listops("[MED 1 2 3 8 ]") == (2, 2, 4)  # (2 + 3) / 2 truncated
  assert evaluate_listops("[SM 7 [MED 5 6 ] 9 ]") == (1, 3, 3)  # 7 + 5 + 9 = 21


def test_listops_labels_bounds_and_tokens():
  max_depth, max_args = 6, 5
  data = listops("train", 300, seed=3, max_depth=max_depth, max_args=max_args, **SMALL)
  assert len(data) == 300
  labels, depths = [], []
  for example in data:
    tokens = example["text"].split(" ")
    assert set(tokens) <= set(LISTOPS_TOKENS)
    assert SMALL["min_length"] <= len(tokens) <= SMALL["max_length"]
    value, depth, width = evaluate_listops(example["text"])
    assert example["label"] == value and isinstance(example["label"], int)
    assert depth <= max_depth and 2 <= width <= max_args
    labels.append(value)
    depths.append(depth)
  counts = collections.Counter(labels)
  # Not degenerate: every digit occurs and none dominates (LRA's own data is skewed towards 0 and 9
  # by MIN and MAX, so a loose bound).
  assert set(counts) == set(range(10)), counts
  assert max(counts.values()) < 0.3 * len(labels), counts
  assert max(depths) == max_depth  # the depth limit is reached, not just respected


def test_listops_lra_defaults_lengths():
  data = listops("test", 20, seed=1)
  for example in data:
    assert 500 <= len(example["text"].split(" ")) <= 2000
    assert evaluate_listops(example["text"])[0] == example["label"]


def test_listops_deterministic_random_access_and_splits():
  data = listops("train", 50, seed=0, **SMALL)
  forward = [data[i] for i in range(50)]
  assert [data[i] for i in reversed(range(50))] == forward[::-1]
  assert listops("train", 50, seed=0, **SMALL)[:] == forward
  assert data[-1] == forward[-1] and data[10:13] == forward[10:13]
  other_split = listops("validation", 50, seed=0, **SMALL)[:]
  other_seed = listops("train", 50, seed=1, **SMALL)[:]
  assert sum(a == b for a, b in zip(forward, other_split)) < 5
  assert sum(a == b for a, b in zip(forward, other_seed)) < 5
  with pytest.raises(IndexError, match="50"):
    data[50]
  # Picklable (grain's worker processes receive the data source pickled), same examples after.
  assert pickle.loads(pickle.dumps(data))[7] == forward[7]


def test_listops_rejects_bad_arguments():
  with pytest.raises(ValueError, match="'dev'"):
    listops("dev", 1)
  with pytest.raises(ValueError, match="max_args"):
    listops("train", 1, max_args=1)
  with pytest.raises(ValueError, match="min_length=30"):
    listops("train", 1, min_length=30, max_length=20)
  assert listops_max_possible_length(max_depth=3, max_args=2) == 2 + 2 * (2 + 2 * 1)
  with pytest.raises(ValueError, match="longest tree"):
    listops("train", 1, min_length=11, max_length=20, max_depth=3, max_args=2)


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_sequence_tasks(name):
  length, vocab_size = 9, 12
  data = sequence_task(name, "train", 40, length=length, vocab_size=vocab_size, seed=2)
  for example in data:
    source, target = example["source"], example["target"]
    assert source.dtype == np.int32 and target.dtype == np.int32 and source.shape == (length,)
    assert source.min() >= 4 and source.max() < vocab_size
    if name == "copy":
      np.testing.assert_array_equal(target, source)
    elif name == "reverse":
      np.testing.assert_array_equal(target, source[::-1])
    else:
      keys, values, query = source[0:-1:2], source[1:-1:2], source[-1]
      assert len(set(keys.tolist())) == len(keys)
      np.testing.assert_array_equal(target, values[keys == query])
  again = sequence_task(name, "train", 40, length=length, vocab_size=vocab_size, seed=2)
  np.testing.assert_array_equal(again[7]["source"], data[7]["source"])
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(data))[7]["target"], data[7]["target"])
  other = sequence_task(name, "test", 40, length=length, vocab_size=vocab_size, seed=2)
  assert not np.array_equal(other[7]["source"], data[7]["source"])


def test_sequence_task_errors():
  with pytest.raises(ValueError, match="'sort'"):
    sequence_task("sort", "train", 1, length=4, vocab_size=10)
  with pytest.raises(ValueError, match="odd length"):
    sequence_task("recall", "train", 1, length=4, vocab_size=10)
  with pytest.raises(ValueError, match="distinct keys"):
    sequence_task("recall", "train", 1, length=21, vocab_size=10)
  with pytest.raises(ValueError, match="vocab_size"):
    sequence_task("copy", "train", 1, length=4, vocab_size=5)
