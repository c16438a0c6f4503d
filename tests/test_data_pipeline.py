"""Grain pipelines: batch contents against a plain-Python reference, sharding, shuffling, eval coverage,
packing, bucketing, over-long handling, checkpointable iterators, and packed == unpacked model loss."""

import itertools
import json

import numpy as np
import pytest

from flaxattn.data import pipeline

BOS, EOS, PAD = 1, 2, 0


def lm_documents(lengths, start=3):
  """Documents `[bos, t, t+1, ..., eos]` of `n` tokens each, with ids distinct across documents."""
  documents, next_id = [], start
  for n in lengths:
    body = list(range(next_id, next_id + n - 2))
    next_id += n - 2
    documents.append({"tokens": np.array([BOS] + body + [EOS], np.int32)})
  return documents


DOCUMENT_LENGTHS = [4, 7, 3, 9, 2, 5, 6, 4, 3, 10, 5, 2]
DOCUMENTS = lm_documents(DOCUMENT_LENGTHS)
CLASSIFICATION = [{"tokens": np.arange(3, 3 + 1 + index % 6), "label": index} for index in range(14)]
SEQ2SEQ = [{"source": np.arange(5, 5 + 1 + index % 5), "target": np.array([7] * (index % 4) + [EOS])}
           for index in range(11)]


def take(dataset_or_iterator, count):
  return list(itertools.islice(dataset_or_iterator, count))


def assert_batches_equal(actual, expected):
  assert len(actual) == len(expected)
  for got, want in zip(actual, expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def reference_lm_row(tokens, length):
  """An lm row written out by hand: inputs/targets shifted by one, weights on the n-1 targets."""
  tokens = list(tokens)[:length + 1]
  count = max(len(tokens) - 1, 0)
  pad = [PAD] * (length - count)
  return {"inputs": tokens[:count] + pad, "targets": tokens[1:] + pad,
          "weights": [1.0] * count + [0.0] * (length - count), "mask": [1] * count + [0] * (length - count)}


def test_stream_examples_predicts_every_token_once():
  documents = [list(range(10, 17)), list(range(20, 23)), list(range(30, 35))]
  stream = sum(documents, [])
  for seq_len in (1, 4, 5, 14, 100):
    windows = pipeline.stream_examples(documents, seq_len)
    assert all(window["tokens"].dtype == np.int32 for window in windows)
    assert all(len(window["tokens"]) <= seq_len + 1 for window in windows)
    assert all(len(window["tokens"]) >= 2 for window in windows), "every window has a target"
    targets = sum((list(window["tokens"][1:]) for window in windows), [])
    assert targets == stream[1:]
    inputs = sum((list(window["tokens"][:-1]) for window in windows), [])
    assert inputs == stream[:-1]
  assert pipeline.stream_examples([[5]], 4) == []
  with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
    pipeline.stream_examples(documents, 0)


def test_lm_eval_batches_match_reference_and_count_truncation():
  length, batch_size = 6, 5
  stats = pipeline.LengthStats()
  batches = list(pipeline.make_dataset(DOCUMENTS, format="lm", lengths={"tokens": length},
                                       batch_size=batch_size, train=False, bos_id=BOS, stats=stats))
  rows = [reference_lm_row(document["tokens"], length) for document in DOCUMENTS]
  rows += [reference_lm_row([], length)] * 3   # weight-0 rows fill the last batch
  expected = [{key: np.array([row[key] for row in rows[start:start + batch_size]],
                             np.float32 if key == "weights" else np.int32) for key in rows[0]}
              for start in range(0, len(rows), batch_size)]
  assert_batches_equal(batches, expected)
  overlong = [n for n in DOCUMENT_LENGTHS if n > length + 1]
  assert (stats.examples, stats.truncated, stats.dropped) == (len(DOCUMENTS), len(overlong), 0)
  assert stats.tokens_lost == sum(n - length - 1 for n in overlong)
  assert "2 truncated" in stats.summary()


def test_classification_and_seq2seq_rows():
  batch = next(iter(pipeline.make_dataset(CLASSIFICATION, format="classification",
                                          lengths={"tokens": 4}, batch_size=14, train=False,
                                          bos_id=BOS, pad_id=PAD)))
  for row, example in enumerate(CLASSIFICATION):
    tokens = list(example["tokens"][:4])
    np.testing.assert_array_equal(batch["inputs"][row], tokens + [PAD] * (4 - len(tokens)))
    np.testing.assert_array_equal(batch["mask"][row], [1] * len(tokens) + [0] * (4 - len(tokens)))
  np.testing.assert_array_equal(batch["labels"], np.arange(14, dtype=np.int32))
  np.testing.assert_array_equal(batch["weights"], np.ones(14, np.float32))
  assert batch["labels"].dtype == np.int32 and batch["weights"].dtype == np.float32

  batches = list(pipeline.make_dataset(SEQ2SEQ, format="seq2seq", lengths={"source": 4, "target": 3},
                                       batch_size=4, train=False, bos_id=BOS, pad_id=PAD))
  assert len(batches) == 3 and {key: value.shape for key, value in batches[0].items()} == {
      "source": (4, 4), "source_mask": (4, 4), "target_inputs": (4, 3), "target_mask": (4, 3),
      "targets": (4, 3), "weights": (4, 3)}
  for index, example in enumerate(SEQ2SEQ):
    row = {key: value[index % 4] for key, value in batches[index // 4].items()}
    source, target = list(example["source"][:4]), list(example["target"][:3])
    np.testing.assert_array_equal(row["source"], source + [PAD] * (4 - len(source)))
    np.testing.assert_array_equal(row["targets"], target + [PAD] * (3 - len(target)))
    np.testing.assert_array_equal(row["target_inputs"], ([BOS] + target[:-1] + [PAD] * 3)[:3])
    np.testing.assert_array_equal(row["weights"], [1.0] * len(target) + [0.0] * (3 - len(target)))
  assert not batches[-1]["weights"][3:].any(), "the padding row has weight 0"


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_counts_every_example_once_across_processes(process_count):
  seen, batch_counts = [], set()
  for process_index in range(process_count):
    batches = list(pipeline.make_dataset(
        CLASSIFICATION, format="classification", lengths={"tokens": 8}, batch_size=2, train=False,
        bos_id=BOS, process_index=process_index, process_count=process_count))
    batch_counts.add(len(batches))
    assert {batch["inputs"].shape for batch in batches} == {(2, 8)}
    for batch in batches:
      seen += batch["labels"][batch["weights"] > 0].tolist()
  assert len(batch_counts) == 1, "every process yields the same number of batches"
  assert sorted(seen) == list(range(len(CLASSIFICATION)))


def first_epoch_labels(dataset, epoch_batches):
  return [label for batch in take(dataset, epoch_batches) for label in batch["labels"].tolist()]


def test_train_shards_are_disjoint_and_cover_all():
  shards = []
  for process_index in range(2):
    dataset = pipeline.make_dataset(CLASSIFICATION, format="classification", lengths={"tokens": 8},
                                    batch_size=7, train=True, bos_id=BOS, seed=3,
                                    process_index=process_index, process_count=2)
    shards.append(first_epoch_labels(dataset, 1))
  assert set(shards[0]).isdisjoint(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(len(CLASSIFICATION)))
  assert shards[0] != sorted(shards[0]), "the shard is shuffled"


def test_train_shuffle_is_seeded_and_differs_each_epoch():
  make = lambda seed: pipeline.make_dataset(CLASSIFICATION, format="classification",
                                            lengths={"tokens": 8}, batch_size=2, train=True,
                                            bos_id=BOS, seed=seed)
  labels = first_epoch_labels(make(0), 21)   # three epochs of 14
  assert labels == first_epoch_labels(make(0), 21)
  assert labels[:14] != first_epoch_labels(make(1), 7)
  epochs = [labels[start:start + 14] for start in (0, 14, 28)]
  assert all(sorted(epoch) == list(range(14)) for epoch in epochs), "each epoch is a permutation"
  assert epochs[0] != epochs[1] != epochs[2]


def test_train_drops_the_incomplete_batch_and_repeats():
  batches = take(pipeline.make_dataset(CLASSIFICATION, format="classification", lengths={"tokens": 8},
                                       batch_size=5, train=True, bos_id=BOS), 10)
  assert len(batches) == 10 and {batch["inputs"].shape for batch in batches} == {(5, 8)}
  assert all(batch["weights"].all() for batch in batches)


def check_packed_rows(batches, length, documents):
  """Each segment is one document's (input, target) pairs from position 0; returns the segments seen."""
  segments = []
  for batch in batches:
    for row in range(batch["inputs"].shape[0]):
      segment_ids, positions = batch["segment_ids"][row], batch["positions"][row]
      real = segment_ids > 0
      assert (batch["mask"][row] == real).all() and (batch["weights"][row] == real).all()
      count = int(real.sum())
      assert real[:count].all() and not real[count:].any(), "documents are packed from the left"
      assert not positions[~real].any() and (batch["inputs"][row][~real] == PAD).all()
      for segment in np.unique(segment_ids[real]):
        where = np.flatnonzero(segment_ids == segment)
        assert (np.diff(where) == 1).all() and (positions[where] == np.arange(len(where))).all()
        inputs, targets = batch["inputs"][row][where], batch["targets"][row][where]
        assert (inputs[1:] == targets[:-1]).all(), "targets are the next tokens of the same document"
        segments.append(inputs.tolist() + [int(targets[-1])])
      assert list(np.unique(segment_ids[real])) == list(range(1, len(np.unique(segment_ids[real])) + 1))
  fitted = [list(document["tokens"][:length + 1]) for document in documents]
  return segments, fitted


@pytest.mark.parametrize("process_count", [1, 2])
def test_packing_eval_places_every_document_once(process_count):
  length = 8
  segments, batch_counts = [], set()
  for process_index in range(process_count):
    batches = list(pipeline.make_dataset(DOCUMENTS, format="lm", lengths={"tokens": length},
                                         batch_size=2, train=False, bos_id=BOS, packing=True,
                                         process_index=process_index, process_count=process_count))
    batch_counts.add(len(batches))
    found, fitted = check_packed_rows(batches, length, DOCUMENTS)
    segments += found
  assert len(batch_counts) == 1
  assert sorted(segments) == sorted(fitted)
  # Greedy packing fills rows: no two consecutive rows could have been merged.
  single = list(pipeline.make_dataset(DOCUMENTS, format="lm", lengths={"tokens": length}, batch_size=1,
                                      train=False, bos_id=BOS, packing=True))
  used = [int(batch["mask"].sum()) for batch in single]
  assert all(a + b > length for a, b in zip(used, used[1:]))


def test_packing_train_rows():
  batches = take(pipeline.make_dataset(DOCUMENTS, format="lm", lengths={"tokens": 8}, batch_size=3,
                                       train=True, bos_id=BOS, packing=True, seed=1), 6)
  segments, fitted = check_packed_rows(batches, 8, DOCUMENTS)
  assert all(segment in fitted for segment in segments)
  assert {batch["positions"].shape for batch in batches} == {(3, 8)}


def test_bucketing_pads_each_batch_to_its_bucket():
  stats = pipeline.LengthStats()
  batches = take(pipeline.make_dataset(CLASSIFICATION, format="classification", lengths={"tokens": 5},
                                       batch_size=2, train=True, bos_id=BOS,
                                       bucket_boundaries=[2, 4, 8], stats=stats), 30)
  shapes = {batch["inputs"].shape for batch in batches}
  assert shapes <= {(2, 2), (2, 4), (2, 5)} and len(shapes) > 1
  for batch in batches:
    real = batch["mask"].sum(axis=1)
    bucket = batch["inputs"].shape[1]
    lower = {2: 0, 4: 2, 5: 4}[bucket]
    assert ((real > lower) & (real <= bucket)).all()
    for row, label in enumerate(batch["labels"]):
      expected = CLASSIFICATION[label]["tokens"][:5]
      np.testing.assert_array_equal(batch["inputs"][row][:len(expected)], expected)
  assert stats.examples == len(CLASSIFICATION) and stats.truncated == 2   # the two of 6 tokens


def test_overlong_drop_counts_and_never_double_counts():
  stats = pipeline.LengthStats()
  dataset = pipeline.make_dataset(SEQ2SEQ, format="seq2seq", lengths={"source": 3, "target": 3},
                                  batch_size=4, train=False, bos_id=BOS, overlong="drop", stats=stats)
  first, second = list(dataset), list(dataset)
  assert_batches_equal(first, second)
  dropped = [example for example in SEQ2SEQ if len(example["source"]) > 3 or len(example["target"]) > 3]
  assert (stats.examples, stats.dropped, stats.truncated) == (len(SEQ2SEQ), len(dropped), 0)
  assert stats.tokens_lost == sum(len(e["source"]) + len(e["target"]) for e in dropped)
  kept = sum(float(batch["weights"][:, 0].sum()) for batch in first)
  assert kept == len(SEQ2SEQ) - len(dropped), "a dropped example is a weight-0 row in evaluation"

  stats = pipeline.LengthStats()
  take(pipeline.make_dataset(DOCUMENTS, format="lm", lengths={"tokens": 5}, batch_size=2, train=True,
                             bos_id=BOS, overlong="drop", stats=stats), 20)
  long_documents = [n for n in DOCUMENT_LENGTHS if n > 6]
  assert (stats.examples, stats.dropped) == (len(DOCUMENTS), len(long_documents))


STATE_CASES = {
    "lm": dict(examples=DOCUMENTS, format="lm", lengths={"tokens": 6}, train=True),
    "packed": dict(examples=DOCUMENTS, format="lm", lengths={"tokens": 6}, train=True, packing=True),
    "buckets": dict(examples=CLASSIFICATION, format="classification", lengths={"tokens": 6},
                    train=True, bucket_boundaries=[2, 4]),
    "eval": dict(examples=SEQ2SEQ, format="seq2seq", lengths={"source": 4, "target": 4}, train=False),
}


@pytest.mark.parametrize("case", sorted(STATE_CASES))
def test_iterator_state_round_trips_through_json(case):
  options = dict(STATE_CASES[case], batch_size=2, bos_id=BOS, seed=5)
  iterator = iter(pipeline.make_dataset(**options))
  take(iterator, 3)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = take(iterator, 4)
  restored = iter(pipeline.make_dataset(**options))
  restored.set_state(state)
  assert_batches_equal(take(restored, 4), expected)


def test_examples_may_be_a_grain_map_dataset_or_lazy_sequence_read_in_any_thread():
  import grain  # pylint: disable=import-outside-toplevel

  class Lazy:
    def __len__(self):
      return len(CLASSIFICATION)

    def __getitem__(self, index):
      return CLASSIFICATION[index]

  options = dict(format="classification", lengths={"tokens": 8}, batch_size=4, train=False, bos_id=BOS)
  reference = list(pipeline.make_dataset(CLASSIFICATION, **options))
  assert_batches_equal(list(pipeline.make_dataset(Lazy(), **options)), reference)
  assert_batches_equal(list(pipeline.make_dataset(grain.MapDataset.source(CLASSIFICATION), **options)),
                       reference)
  in_thread = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  assert_batches_equal(list(pipeline.make_dataset(CLASSIFICATION, read_options=in_thread, **options)),
                       reference)


@pytest.mark.parametrize("options, message", [
    (dict(format="text"), "format must be one of"),
    (dict(lengths={"source": 4}), r"lengths for format 'lm' must have exactly the keys \['tokens'\]"),
    (dict(lengths={"tokens": 0}), "lengths must be positive ints, got {'tokens': 0}"),
    (dict(batch_size=0), r"batch_size \(per process\) must be a positive int, got 0"),
    (dict(process_index=2, process_count=2), r"process_index must be in \[0, 2\), got 2"),
    (dict(overlong="wrap"), "overlong must be one of .* got 'wrap'"),
    (dict(format="classification", packing=True), "packing applies to format 'lm' only"),
    (dict(packing=True, bucket_boundaries=[2]), "exclude each other"),
    (dict(bucket_boundaries=[4, 2]), r"bucket_boundaries must be increasing positive ints, got \[4, 2\]"),
])
def test_argument_errors(options, message):
  arguments = dict(examples=DOCUMENTS, format="lm", lengths={"tokens": 6}, batch_size=2, train=True,
                   bos_id=BOS) | options
  with pytest.raises(ValueError, match=message):
    next(iter(pipeline.make_dataset(**arguments)))


def test_example_errors():
  with pytest.raises(ValueError, match="example must have a 'tokens' field"):
    next(iter(pipeline.make_dataset([{"text": "x"}], format="lm", lengths={"tokens": 4},
                                    batch_size=1, train=False, bos_id=BOS)))
  with pytest.raises(ValueError, match="must have a 'label' field"):
    next(iter(pipeline.make_dataset([{"tokens": [3]}], format="classification",
                                    lengths={"tokens": 4}, batch_size=1, train=False, bos_id=BOS)))
  with pytest.raises(ValueError, match="there are no training examples"):
    pipeline.make_dataset(DOCUMENTS[:0], format="lm", lengths={"tokens": 4}, batch_size=1,
                          train=True, bos_id=BOS, process_index=1, process_count=2)


@pytest.mark.slow  # About 3 s on a quiet 2-core machine, 15 s under load (two compilations).
def test_packed_and_unpacked_batches_give_the_same_loss_per_document():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from flaxattn.models import DecoderLM  # pylint: disable=import-outside-toplevel
  from flaxattn.nn import TransformerConfig  # pylint: disable=import-outside-toplevel

  length = 12
  documents = lm_documents([5, 8, 3, 6, 4, 7])
  vocab = max(int(document["tokens"].max()) for document in documents) + 1
  config = TransformerConfig(vocab_size=vocab, d_model=16, num_heads=2, mlp_dim=32, num_layers=2,
                             positions="rope", max_length=length)
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  # Compiled: one trace per call form is faster than running the model op by op.
  forward = nnx.jit(lambda model, inputs, mask, positions, segment_ids: model(
      inputs, mask, positions=positions, segment_ids=segment_ids)[0])

  def per_document_losses(batch):
    """Mean next-token loss of each document (float64 from the model's logits), keyed by its first
    token after bos (ids are distinct across documents)."""
    logits = np.asarray(forward(model, batch["inputs"], batch["mask"], batch.get("positions"),
                                batch.get("segment_ids")), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    segments = batch.get("segment_ids", batch["mask"])
    losses = {}
    for row in range(segments.shape[0]):
      for segment in np.unique(segments[row][segments[row] > 0]):
        where = segments[row] == segment
        losses[int(batch["inputs"][row][where][1])] = nll[row][where].mean()
    return losses

  options = dict(format="lm", lengths={"tokens": length}, batch_size=6, train=False, bos_id=BOS)
  unpacked = per_document_losses(next(iter(pipeline.make_dataset(documents, **options))))
  packed_batch = next(iter(pipeline.make_dataset(documents, packing=True, **options)))
  assert packed_batch["segment_ids"].max() > 1, "some row holds several documents"
  packed = per_document_losses(packed_batch)
  assert packed.keys() == unpacked.keys() and len(packed) == len(documents)
  for document, loss in unpacked.items():
    # float32 model, the same weights; packing changes only which keys are masked and the positions.
    np.testing.assert_allclose(packed[document], loss, rtol=1e-5, atol=1e-5, err_msg=str(document))
