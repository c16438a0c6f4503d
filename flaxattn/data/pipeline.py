"""Grain input pipelines: tokenised examples in, fixed-shape NumPy batches out.

Examples (after tokenisation; int sequences, converted to int32):
  lm: `{'tokens': [n]}`, one document with bos/eos already added; it gives n-1 next-token targets.
  classification: `{'tokens': [n], 'label': int}`.
  seq2seq: `{'source': [n], 'target': [m]}`, the target ending with eos.

Batches (dicts of NumPy arrays, the keys `flaxattn.train.losses` reads; B = `batch_size`):
  lm: `inputs`, `targets` int32 `[B, L]` (targets = the next token), `weights` float32 `[B, L]` (0 on
    padding), `mask` int32 `[B, L]` (1 = real input token); packed rows add `segment_ids` int32 (1, 2, ...
    per document in the row, 0 on padding) and `positions` int32 (from 0 in each document, 0 on padding).
  classification: `inputs`, `mask` int32 `[B, L]`; `labels` int32 `[B]`; `weights` float32 `[B]`
    (0 = padding row).
  seq2seq: `source`, `source_mask` int32 `[B, S]`; `target_inputs` (= [bos] + target[:-1]),
    `target_mask`, `targets` int32 and `weights` float32 `[B, T]`.

Training pipelines shuffle with a seed (a new order each epoch), repeat forever and give each process
its block of rows of global batches that do not depend on the number of processes. Evaluation pipelines read each process's share once, in
order, and pad the last batch with weight-0 rows, so every example is counted exactly once and every
batch has the same shape. Iterators save and restore their position (`get_state` / `set_state`, plain
JSON-serialisable values); no worker processes are used, which keeps that exact (VERIFIED-FACTS).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

FORMATS = ("lm", "classification", "seq2seq")
OVERLONG = ("truncate", "drop")
# The length keys `make_dataset` expects per format, and the example fields each one limits.
LENGTH_KEYS = {"lm": ("tokens",), "classification": ("tokens",), "seq2seq": ("source", "target")}

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LengthStats:
  """Counts of what the length limit did to the examples a pipeline prepared.

  Each example is counted once, on its first pass (a training pipeline's first epoch on this process;
  read-ahead for the batch being assembled is included).

  Attributes:
    examples: examples seen.
    truncated: examples cut to the length.
    dropped: examples left out (`overlong='drop'`).
    tokens_lost: tokens cut off or dropped with them.
  """
  examples: int = 0
  truncated: int = 0
  dropped: int = 0
  tokens_lost: int = 0

  def summary(self, split_size: int | None = None) -> str:
    """One line: the counts, and, given the split's size, how much of the split was seen."""
    share = lambda count: f"{100.0 * count / self.examples:.2f}%" if self.examples else "0%"
    seen = (f"{self.examples:,} of {split_size:,} examples seen" if split_size is not None else
            f"{self.examples:,} examples")
    return (f"{seen}: {self.truncated} truncated ({share(self.truncated)}), "
            f"{self.dropped} dropped ({share(self.dropped)}), {self.tokens_lost} tokens lost")


def stream_examples(token_lists: Sequence[Sequence[int]], seq_len: int) -> list[dict[str, np.ndarray]]:
  """Language-model examples from one stream: the documents concatenated, cut into overlapping windows.

  Window k holds stream tokens `[k * seq_len, (k + 1) * seq_len + 1)`: `seq_len` inputs and their next
  tokens, overlapping the next window by one token, so every token after the first is a target exactly
  once (the standard Penn Treebank setup). The last window may be shorter (padded by the pipeline);
  it is kept while it has a target.

  Args:
    token_lists: documents (token id sequences), concatenated in order.
    seq_len: inputs per window, the pipeline's `lengths['tokens']`.

  Returns:
    lm examples `{'tokens': int32 [<= seq_len + 1]}`.
  """
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  parts = [np.asarray(tokens, np.int32).reshape(-1) for tokens in token_lists]
  stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  return [{"tokens": stream[start:start + seq_len + 1]}
          for start in range(0, max(len(stream) - 1, 0), seq_len)]


def _as_tokens(example: Mapping[str, Any], field: str) -> np.ndarray:
  try:
    tokens = np.asarray(example[field])
  except KeyError:
    raise ValueError(f"example must have a {field!r} field, got keys {sorted(example)}") from None
  if tokens.ndim != 1 or (tokens.size and not np.issubdtype(tokens.dtype, np.integer)):
    raise ValueError(f"example[{field!r}] must be a 1-D int sequence, got shape {tokens.shape} "
                     f"dtype {tokens.dtype}")
  return tokens.astype(np.int32)


def _limits(format: str, lengths: Mapping[str, int]) -> dict[str, int]:  # pylint: disable=redefined-builtin
  """Most tokens each example field may hold: an lm document may have L + 1 (L inputs, L targets)."""
  return {"tokens": lengths["tokens"] + 1} if format == "lm" else dict(lengths)


class _Fitter:
  """Applies the length limit to one example (truncate or drop) and counts it, once per example.

  `count_key` identifies an example among `counted_size` (an example index, or a position in the first
  epoch); a key is counted the first time only, however often the pipeline is iterated or restored.
  Grain may call this from its reading threads, hence the lock.
  """

  def __init__(self, format: str, lengths: Mapping[str, int], overlong: str,  # pylint: disable=redefined-builtin
               stats: LengthStats, counted_size: int):
    self.format, self.limits, self.overlong, self.stats = format, _limits(format, lengths), overlong, stats
    self._counted = np.zeros((counted_size,), bool)
    self._lock = threading.Lock()

  def __call__(self, example, count_key: int | None) -> dict[str, Any] | None:
    """The example with int32 fields cut to the limits, or None when it is dropped."""
    fitted = {field: _as_tokens(example, field) for field in self.limits}
    if self.format == "classification":
      if "label" not in example:
        raise ValueError(f"a classification example must have a 'label' field, got keys {sorted(example)}")
      fitted["label"] = int(example["label"])
    excess = sum(max(len(fitted[field]) - limit, 0) for field, limit in self.limits.items())
    drop = bool(excess) and self.overlong == "drop"
    if count_key is not None and count_key < len(self._counted):
      with self._lock:
        if not self._counted[count_key]:
          self._counted[count_key] = True
          self.stats.examples += 1
          if drop:
            self.stats.dropped += 1
            self.stats.tokens_lost += sum(len(fitted[field]) for field in self.limits)
          elif excess:
            self.stats.truncated += 1
            self.stats.tokens_lost += excess
    if drop:
      return None
    for field, limit in self.limits.items():
      fitted[field] = fitted[field][:limit]
    return fitted


def _padded(values: np.ndarray, length: int, fill: int) -> np.ndarray:
  out = np.full((length,), fill, values.dtype)
  out[:len(values)] = values
  return out


def _row(example: dict[str, Any] | None, format: str, lengths: Mapping[str, int],  # pylint: disable=redefined-builtin
         bos_id: int, pad_id: int) -> dict[str, np.ndarray]:
  """One batch row from a fitted example padded to `lengths`; None gives a weight-0 padding row."""
  if format == "lm":
    length = lengths["tokens"]
    tokens = np.zeros((0,), np.int32) if example is None else example["tokens"]
    count = max(len(tokens) - 1, 0)
    real = _padded(np.ones((count,), np.int32), length, 0)
    return {"inputs": _padded(tokens[:count], length, pad_id),
            "targets": _padded(tokens[1:], length, pad_id),
            "weights": real.astype(np.float32), "mask": real}
  if format == "classification":
    length = lengths["tokens"]
    tokens = np.zeros((0,), np.int32) if example is None else example["tokens"]
    return {"inputs": _padded(tokens, length, pad_id),
            "mask": _padded(np.ones((len(tokens),), np.int32), length, 0),
            "labels": np.int32(0 if example is None else example["label"]),
            "weights": np.float32(example is not None)}
  source_length, target_length = lengths["source"], lengths["target"]
  source = np.zeros((0,), np.int32) if example is None else example["source"]
  target = np.zeros((0,), np.int32) if example is None else example["target"]
  target_real = _padded(np.ones((len(target),), np.int32), target_length, 0)
  target_inputs = np.concatenate([np.array([bos_id], np.int32), target[:-1]]) if len(target) else target
  return {"source": _padded(source, source_length, pad_id),
          "source_mask": _padded(np.ones((len(source),), np.int32), source_length, 0),
          "target_inputs": _padded(target_inputs, target_length, pad_id),
          "target_mask": target_real, "targets": _padded(target, target_length, pad_id),
          "weights": target_real.astype(np.float32)}


def _stack(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
           padding_row: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
  """Stacks rows into a batch, first filling it to `batch_size` with `padding_row` (evaluation)."""
  rows = list(rows)
  if len(rows) < batch_size:
    if padding_row is None:
      raise AssertionError(f"a training batch has {len(rows)} rows, expected {batch_size}")
    rows += [padding_row] * (batch_size - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


# --- Packing -------------------------------------------------------------------------------------

def _pack_row(documents: Sequence[np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """One packed lm row: each document of n tokens puts its n-1 (input, target) pairs side by side."""
  row = {"inputs": np.full((length,), pad_id, np.int32), "targets": np.full((length,), pad_id, np.int32),
         "segment_ids": np.zeros((length,), np.int32), "positions": np.zeros((length,), np.int32)}
  start = 0
  for segment, tokens in enumerate(documents, start=1):
    count = len(tokens) - 1
    row["inputs"][start:start + count] = tokens[:-1]
    row["targets"][start:start + count] = tokens[1:]
    row["segment_ids"][start:start + count] = segment
    row["positions"][start:start + count] = np.arange(count)
    start += count
  row["mask"] = (row["segment_ids"] > 0).astype(np.int32)
  row["weights"] = row["mask"].astype(np.float32)
  return row


class _PackIterator(grain.DatasetIterator):
  """Greedy in-order packing: documents join the current row while their targets fit, else start one.

  Its state is the parent's plus the document read but not yet placed (as a list of ints), so a
  restored iterator continues with exactly the rows an uninterrupted one would give.
  """

  def __init__(self, parent, length: int, pad_id: int):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id
    self._pending: np.ndarray | None = None

  def __next__(self) -> dict[str, np.ndarray]:
    documents, used = [], 0
    while True:
      if self._pending is None:
        try:
          self._pending = next(self._parent)["tokens"]
        except StopIteration:
          break
      count = len(self._pending) - 1
      if count <= 0:  # A one-token document has no target: it takes no room.
        self._pending = None
        continue
      if used + count > self._length:
        break
      documents.append(self._pending)
      used += count
      self._pending = None
    if not documents:
      raise StopIteration
    return _pack_row(documents, self._length, self._pad_id)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(),
            "pending": None if self._pending is None else self._pending.tolist()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = None if state["pending"] is None else np.asarray(state["pending"], np.int32)


class _PackIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, length: int, pad_id: int):
    super().__init__(parent)
    self._length, self._pad_id = length, pad_id

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._length, self._pad_id)


# --- Bucketing -----------------------------------------------------------------------------------

class _BucketIterator(grain.DatasetIterator):
  """Groups examples by length into buckets; a bucket that holds `batch_size` of them is a batch.

  Each bucket pads its batch to its own lengths, so training sees a few shapes instead of one long
  one. The state holds the examples waiting in the buckets (lists of ints), as packing does.
  """

  def __init__(self, parent, bucket_lengths: Sequence[dict[str, int]], measure: Callable, make_row,
               batch_size: int):
    super().__init__(parent)
    self._bucket_lengths, self._measure, self._make_row = bucket_lengths, measure, make_row
    self._batch_size = batch_size
    self._buckets: list[list[dict[str, Any]]] = [[] for _ in bucket_lengths]

  def _bucket_of(self, example) -> int:
    size = self._measure(example)
    for index, lengths in enumerate(self._bucket_lengths):
      if size <= max(lengths.values()):
        return index
    return len(self._bucket_lengths) - 1  # Fitted examples always fit the last (full-length) bucket.

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      example = next(self._parent)
      index = self._bucket_of(example)
      bucket = self._buckets[index]
      bucket.append(example)
      if len(bucket) == self._batch_size:
        self._buckets[index] = []
        return _stack([self._make_row(item, self._bucket_lengths[index]) for item in bucket],
                      self._batch_size)

  def get_state(self) -> dict[str, Any]:
    encode = lambda example: {key: value.tolist() if isinstance(value, np.ndarray) else value
                              for key, value in example.items()}
    return {"parent": self._parent.get_state(),
            "buckets": [[encode(example) for example in bucket] for bucket in self._buckets]}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    decode = lambda example: {key: np.asarray(value, np.int32) if isinstance(value, list) else value
                              for key, value in example.items()}
    self._buckets = [[decode(example) for example in bucket] for bucket in state["buckets"]]


class _BucketIterDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, *args):
    super().__init__(parent)
    self._args = args

  def __iter__(self) -> _BucketIterator:
    return _BucketIterator(self._parent.__iter__(), *self._args)


def _bucket_lengths(format: str, lengths: Mapping[str, int],  # pylint: disable=redefined-builtin
                    boundaries: Sequence[int]) -> list[dict[str, int]]:
  """Per bucket, the padded length of each field: `min(boundary, full length)`, then the full lengths."""
  if not boundaries or any(not isinstance(b, int) or b < 1 for b in boundaries) or (
      list(boundaries) != sorted(set(boundaries))):
    raise ValueError(f"bucket_boundaries must be increasing positive ints, got {boundaries!r}")
  buckets = [{key: min(boundary, length) for key, length in lengths.items()}
             for boundary in boundaries if boundary < max(lengths.values())]
  return buckets + [dict(lengths)]


def _measure(format: str) -> Callable[[dict[str, Any]], int]:  # pylint: disable=redefined-builtin
  """The length a fitted example is bucketed by (lm: its inputs; seq2seq: its longer side)."""
  if format == "lm":
    return lambda example: len(example["tokens"]) - 1
  if format == "classification":
    return lambda example: len(example["tokens"])
  return lambda example: max(len(example["source"]), len(example["target"]))


# --- The pipeline --------------------------------------------------------------------------------

def _check_arguments(format, lengths, batch_size, process_index, process_count, packing,
                     bucket_boundaries, overlong, train):  # pylint: disable=redefined-builtin
  if format not in FORMATS:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
  expected = set(LENGTH_KEYS[format])
  if not isinstance(lengths, Mapping) or set(lengths) != expected:
    raise ValueError(f"lengths for format {format!r} must have exactly the keys {sorted(expected)}, "
                     f"got {lengths!r}")
  bad = {key: value for key, value in lengths.items() if not isinstance(value, int) or value < 1}
  if bad:
    raise ValueError(f"lengths must be positive ints, got {bad!r}")
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size (per process) must be a positive int, got {batch_size!r}")
  if not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be a positive int, got {process_count!r}")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
  if overlong not in OVERLONG:
    raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
  if packing and format != "lm":
    raise ValueError(f"packing applies to format 'lm' only, got format={format!r}")
  if packing and bucket_boundaries:
    raise ValueError("packing and bucket_boundaries exclude each other (packed rows are full-length), "
                     f"got bucket_boundaries={bucket_boundaries!r}")


def make_dataset(examples, *, format: str, lengths: Mapping[str, int], batch_size: int, train: bool,  # pylint: disable=redefined-builtin
                 bos_id: int, pad_id: int = 0, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, packing: bool = False,
                 bucket_boundaries: Sequence[int] | None = None, overlong: str = "truncate",
                 stats: LengthStats | None = None,
                 read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """A grain dataset of batches (see the module docstring for the example and batch formats).

  Args:
    examples: a random-access sequence of examples (`len()` and `[index]`: a list, a lazily generated
      sequence, a Hugging Face dataset) or a `grain.MapDataset`.
    format: 'lm', 'classification' or 'seq2seq'.
    lengths: padded lengths: lm `{'tokens': L}` (L inputs per row), classification `{'tokens': L}`,
      seq2seq `{'source': S, 'target': T}`.
    batch_size: rows per batch on this process.
    train: True: the examples shuffled with `seed` in a new order each epoch, repeated forever, cut
      into global batches of `batch_size * process_count` rows (the same whatever `process_count`
      is, unless `overlong='drop'` drops some), of which this process yields rows
      `[process_index * batch_size, (process_index + 1) * batch_size)`. False: this process's
      shard once in order; every process yields `ceil(ceil(len / process_count) / batch_size)` batches,
      filled out with weight-0 rows.
    bos_id: first token of seq2seq `target_inputs`.
    pad_id: the id padding positions hold.
    seed: shuffling seed (training).
    process_index: which share of the data this process reads: its block of the global batch rows
      (`flaxattn.parallel.row_block`), `jax.process_index()` when the batch is split over all
      processes.
    process_count: how many shares there are (`jax.process_count()` in that case).
    packing: lm only: several documents per row, in order, greedily, with `segment_ids` and `positions`.
    bucket_boundaries: training only (evaluation keeps the full lengths so every batch has one shape):
      increasing lengths; an example goes to the first bucket whose boundary holds it (lm: its inputs;
      seq2seq: its longer side) and batches are padded to that bucket's lengths (each field capped at its
      full length); longer examples go to a last, full-length bucket.
    overlong: examples longer than `lengths` (lm: more than L + 1 tokens) are cut to the length
      ('truncate'; lm keeps the first L + 1 tokens; a cut seq2seq target loses its eos) or left out
      ('drop'; in evaluation they become weight-0 rows). Either way `stats` counts them.
    stats: a `LengthStats` to count into (its summary is worth logging); None: counted internally.
    read_options: grain's reading threads and prefetch buffer for the examples (None: grain's
      default, 16 threads reading up to 500 examples ahead); `grain.ReadOptions(num_threads=0)` reads
      in the calling thread.

  Returns:
    A `grain.IterDataset` of batches; `iter()` of it has `get_state()` / `set_state()`.
  """
  _check_arguments(format, lengths, batch_size, process_index, process_count, packing,
                   bucket_boundaries, overlong, train)
  stats = LengthStats() if stats is None else stats
  source = examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)
  shard = source[process_index::process_count]
  shard_size = len(shard)
  fit = _Fitter(format, lengths, overlong, stats, counted_size=len(source) if train else shard_size)
  make_row = lambda example, row_lengths=lengths: _row(example, format, row_lengths, bos_id, pad_id)

  if train:
    if len(source) == 0:
      raise ValueError("there are no training examples")
    # The global batches are the same whatever `process_count` is (one process's, in order): a
    # process takes rows [process_index * batch_size, ...) of each batch of the shuffled stream.
    global_size = batch_size * process_count
    shuffled = source.shuffle(seed).repeat(None)
    if packing or bucket_boundaries:
      # Rows depend on the examples before them: every process reads the whole global stream.
      stream = shuffled.map_with_index(
          lambda index, example: fit(example, index if index % process_count == process_index
                                     else None)).to_iter_dataset(read_options)
      own = lambda batch: {key: value[process_index * batch_size:(process_index + 1) * batch_size]
                           for key, value in batch.items()}
      if packing:
        batches = _PackIterDataset(stream, lengths["tokens"], pad_id).batch(
            global_size, drop_remainder=True, batch_fn=lambda rows: _stack(rows, global_size))
      else:
        batches = _BucketIterDataset(stream, _bucket_lengths(format, lengths, bucket_boundaries),
                                     _measure(format), make_row, global_size)
      return batches.map(own)

    def example(position):  # The position-th example this process reads.
      step, row = divmod(position, batch_size)
      index = step * global_size + process_index * batch_size + row
      return fit(shuffled[index], index)
    # Positions of the first epoch are distinct examples: those count, later epochs do not.
    examples_stream = grain.MapDataset.range(len(shuffled) // process_count).map(
        example).to_iter_dataset(read_options)  # Dropped examples (None) are skipped.
    return examples_stream.map(make_row).batch(
        batch_size, drop_remainder=True, batch_fn=lambda rows: _stack(rows, batch_size))

  if packing:
    return _packed_evaluation(source, fit, lengths["tokens"], batch_size, pad_id, process_index,
                              process_count, read_options)
  padding_row = make_row(None)
  # Every process reads the same number of rows (the largest share); the rows past its share, and
  # dropped examples, are weight-0 padding.
  per_process = math.ceil(len(source) / process_count)
  rows = grain.MapDataset.range(per_process).map(
      lambda index: make_row(fit(shard[index], index) if index < shard_size else None))
  return rows.to_iter_dataset(read_options).batch(
      batch_size, batch_fn=lambda rows: _stack(rows, batch_size, padding_row))


def _packed_evaluation(source, fit: _Fitter, length: int, batch_size: int, pad_id: int,
                       process_index: int, process_count: int,
                       read_options: grain.ReadOptions | None) -> grain.IterDataset:
  """Evaluation batches of packed rows, the same number on every process.

  How many rows packing makes depends on the data, so every process packs the whole split (read once,
  here: evaluation splits are small) with the same greedy plan and takes every `process_count`-th row;
  `stats` counts the examples of this process's share (`examples[process_index::process_count]`).
  """
  documents, plan, used = [], [], length
  for index in range(len(source)):
    shard_index, owner = divmod(index, process_count)
    fitted = fit(source[index], shard_index if owner == process_index else None)
    if fitted is None or len(fitted["tokens"]) < 2:  # Dropped, or no target: takes no room.
      continue
    count = len(fitted["tokens"]) - 1
    if used + count > length:
      plan.append([])
      used = 0
    plan[-1].append(len(documents))
    documents.append(fitted["tokens"])
    used += count
  own_rows = plan[process_index::process_count]
  per_process = math.ceil(len(plan) / process_count)
  padding_row = _pack_row([], length, pad_id)
  rows = grain.MapDataset.range(per_process).map(
      lambda row: _pack_row([documents[i] for i in own_rows[row]], length, pad_id)
      if row < len(own_rows) else padding_row)
  return rows.to_iter_dataset(read_options).batch(
      batch_size, batch_fn=lambda rows: _stack(rows, batch_size, padding_row))
