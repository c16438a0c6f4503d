"""Tasks: what a run's data is: tokenizer, tokenized examples, and batch pipelines per split.

A `Task` is what every data set's builder returns (`flaxattn.data.registry`: data sets by name);
the training loop and the eval / decode / attend modes share it. `text_task` turns untokenized
splits into one; `MarkovTask` is the generated Markov corpus behind the same interface.

Tokenizers that are learned (word, sentencepiece, bpe) are trained on the training split once and
cached in the workdir (`WORKDIR/tokenizer/`), so a resumed run, `--mode=eval` and `flaxattn attend`
use the same ids. Examples are tokenized lazily (per index), so a generated corpus of 100k long
examples costs nothing until read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flaxattn import pretrained_files
from flaxattn.data import pipeline, synthetic, tokenizers

KINDS = ("lm", "seq2seq", "classification")
SPLITS = ("train", "validation", "test")


def lazy_map(base: Sequence, fn: Callable) -> synthetic.GeneratedExamples:
  """`fn(base[i])` computed on access: a random-access view that tokenizes on demand."""
  return synthetic.GeneratedExamples(len(base), lambda index: fn(base[index]))


@dataclasses.dataclass
class Task:
  """Everything data-shaped about a run.

  Attributes:
    kind: 'lm', 'seq2seq' or 'classification' (the loss in `flaxattn.train.losses`).
    tokenizer: text <-> ids (`flaxattn.data.tokenizers`), None for the Markov corpus.
    vocab_size: the model's vocabulary (the tokenizer's size).
    class_names: label names (classification), else ().
    raw: split -> the untokenized examples (dicts with 'text'/'label' or 'source'/'target'), for
      generation metrics, reports and baselines.
    examples: split -> tokenized examples, the pipeline's input.
    lengths: the pipeline's feature lengths (`pipeline.make_dataset`).
    stats: split -> `LengthStats` (over-long examples truncated or dropped, counted).
    stream: the examples are windows of one token stream in which every text ends in eos (PTB);
      such a model never saw bos.
  """

  kind: str
  tokenizer: Any
  vocab_size: int
  class_names: tuple[str, ...]
  raw: dict[str, Sequence]
  examples: dict[str, Sequence]
  lengths: dict[str, int]
  options: dict[str, Any]
  stats: dict[str, pipeline.LengthStats] = dataclasses.field(default_factory=dict)
  stream: bool = False

  @property
  def splits(self) -> tuple[str, ...]:
    """The splits there are ('train', then 'validation' and 'test' where the data set has them)."""
    return tuple(self.examples)

  @property
  def validation_split(self) -> str:
    """The split evaluated during training."""
    return "validation"

  def size(self, split: str) -> int | None:
    """Examples in `split` (None: endless, generated as read)."""
    return len(self.examples[split])

  def dataset(self, split: str, *, batch_size: int, train: bool, seed: int = 0,
              process_index: int = 0, process_count: int = 1):
    """A grain dataset of batches of `split` (`batch_size` rows per process): shuffled and repeated
    forever with `train`, else one ordered pass whose last batch is padded with weight-0 rows."""
    if split not in self.examples:
      raise ValueError(f"split must be one of {sorted(self.examples)}, got {split!r}")
    # The latest pass's counts (an eval pass counts each example once; a training pass as read).
    stats = self.stats[split] = pipeline.LengthStats()
    return pipeline.make_dataset(
        self.examples[split], format=self.kind, lengths=self.lengths, batch_size=batch_size,
        train=train, seed=seed, process_index=process_index, process_count=process_count,
        stats=stats, **self.options)

  def encode(self, text: str) -> list[int]:
    """A model input for `text` as the model saw texts in training: `[bos] + ids + [eos]` (the
    tokenizer's specials, where it has them), or for a stream `[eos] + ids + [eos]` (a text right
    after the previous one's end)."""
    if self.stream:
      return [self.tokenizer.eos_id] + list(self.tokenizer.encode(text)) + [self.tokenizer.eos_id]
    return tokenizers.framed(self.tokenizer, self.tokenizer.encode(text))



def pretrained_dir(name_or_path: str) -> str:
  """The checkpoint directory of `config.model.pretrained`: a shipped checkpoint's name
  (`flaxattn.pretrained_files.SHIPPED`, e.g. 'all-MiniLM-L6-v2') or a directory."""
  if name_or_path in pretrained_files.SHIPPED:
    path = pretrained_files.pretrained_path(name_or_path)
    if not path.is_dir():
      raise ValueError(f"config.model.pretrained={name_or_path!r} is {path}, not a BERT directory")
    return str(path)
  if not os.path.isdir(name_or_path):
    raise ValueError(f"config.model.pretrained={name_or_path!r} is neither a shipped checkpoint "
                     f"{sorted(pretrained_files.SHIPPED)} nor a directory")
  return name_or_path


# The fields of an example of each kind of task.
EXAMPLE_FIELDS = {"lm": ("text",), "classification": ("text", "label"),
                  "seq2seq": ("source", "target")}


def record_fields(record: Mapping, fields, kind: str) -> dict:
  """A record of a file, an HF data set or TFDS as an example of a `kind` task: its
  `EXAMPLE_FIELDS`, read from the record's fields that `config.data.fields` names. Bytes (TFDS
  text) become str and NumPy scalars Python values; labels become strings (their sorted set names
  the classes)."""
  example = {}
  for key in EXAMPLE_FIELDS[kind]:
    if fields[key] not in record:
      raise ValueError(f"a record has no field {fields[key]!r} (config.data.fields.{key}); its "
                       f"fields are {sorted(record)}")
    value = record[fields[key]]
    value = value.item() if isinstance(value, np.generic) else value
    value = value.decode("utf-8") if isinstance(value, bytes) else value
    example[key] = str(value) if key == "label" else value
  return example


def _text_of(example: Mapping) -> list[str]:
  return [example["text"]] if "text" in example else [example["source"], example["target"]]


def tokenizer_directory(workdir: str | None) -> str | None:
  """Where a run caches its learned tokenizer (None without a workdir: nothing is cached)."""
  return None if workdir is None else os.path.join(workdir, "tokenizer")


def build_tokenizer(config, workdir: str | None, texts: Callable[[], list[str]]):
  """The run's tokenizer: the pretrained model's WordPiece, or `config.data.tokenizer` (the data
  set's default filled in), trained on `texts()` (called only when needed) and cached in
  `WORKDIR/tokenizer` (loaded from there when present)."""
  data = config.data
  if config.model.pretrained:
    return tokenizers.WordPieceTokenizer(
        os.path.join(pretrained_dir(config.model.pretrained), "vocab.txt"))
  # 'bpe' is SentencePiece's BPE model: the same tokenizer class and cached file as its unigram one.
  kind, model_type = ("sentencepiece", "bpe") if data.tokenizer == "bpe" else (data.tokenizer,
                                                                            "unigram")
  return tokenizers.build_tokenizer(
      kind, directory=tokenizer_directory(workdir),
      texts=texts, vocab_size=data.vocab_size, model_path=data.tokenizer_path or None,
      model_type=model_type)


def _tokenize(kind: str, tokenizer, label_index: dict | None):
  def classification(example):
    label = example["label"]
    if label_index is not None:
      if label not in label_index:
        raise ValueError(f"label {label!r} is not one of the classes {sorted(label_index)}")
      label = label_index[label]
    return {"tokens": np.asarray(tokenizers.framed(tokenizer, tokenizer.encode(example["text"])),
                                 np.int32), "label": int(label)}

  def seq2seq(example):
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return {"source": np.asarray(tokenizer.encode(example["source"]) + eos, np.int32),
            "target": np.asarray(tokenizer.encode(example["target"]) + eos, np.int32)}

  def lm(example):
    return {"tokens": np.asarray(tokenizers.framed(tokenizer, tokenizer.encode(example["text"])),
                                 np.int32)}
  return {"classification": classification, "seq2seq": seq2seq, "lm": lm}[kind]


def text_task(config, workdir: str | None, raw: dict[str, Sequence], *, kind: str,
              class_names: Sequence[str] | None = None, stream: bool = False, tokenizer=None,
              training_texts: Callable[[], list[str]] | None = None) -> Task:
  """The `Task` of untokenized splits `raw` (split -> examples with 'text' / 'label' or 'source' /
  'target'), what most data sets' builders return.

  Args:
    config: the run's config, its `data` section with the data set's defaults filled in.
    kind: 'lm', 'seq2seq' or 'classification'.
    class_names: classification: the names of labels 0, 1, ...; None: the labels are strings and
      the sorted distinct labels of the training split name the classes.
    stream: lm: every text ends in eos and each split is one token stream cut into `seq_len`
      windows, each token predicted once (PTB's standard setup).
    tokenizer: a ready tokenizer; None: `build_tokenizer` trains or loads the configured one.
    training_texts: what a learned tokenizer trains on (default: every text of the training split).
  """
  data = config.data
  if "train" not in raw:
    raise ValueError(f"config.data.name={data.name!r} has no training split")
  if tokenizer is None:
    tokenizer = build_tokenizer(config, workdir, training_texts or (
        lambda: [text for example in raw["train"] for text in _text_of(example)]))
  label_index = None
  if kind == "classification" and class_names is None:
    class_names = sorted({example["label"] for example in raw["train"]})
    label_index = {label: i for i, label in enumerate(class_names)}
  if stream:
    examples = {split: pipeline.stream_examples(
        [tokenizer.encode(example["text"]) + [tokenizer.eos_id] for example in raw[split]],
        data.seq_len) for split in raw}
  else:
    encode = _tokenize(kind, tokenizer, label_index)
    examples = {split: lazy_map(values, encode) for split, values in raw.items()}
  if kind == "seq2seq":
    lengths = {"source": data.source_len, "target": data.target_len}
  else:
    lengths = {"tokens": data.seq_len}
  buckets = tuple(int(b) for b in data.buckets.split(",")) if data.buckets else None
  options = dict(bos_id=tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id,
                 pad_id=tokenizer.pad_id, packing=data.packing, bucket_boundaries=buckets,
                 overlong=data.overlong)
  return Task(kind=kind, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size,
              class_names=tuple(class_names or ()), raw=raw, examples=examples, lengths=lengths,
              options=options, stream=stream)


class MarkovData:
  """The generated Markov corpus behind the same iterator protocol as a grain iterator: batches of
  this process's rows, `get_state()` / `set_state()` (the batch index)."""

  def __init__(self, corpus: synthetic.MarkovCorpus, batch_size: int, rows: slice,
               split: str = "train", limit: int | None = None):
    self.corpus, self.batch_size, self.rows, self.split = corpus, batch_size, rows, split
    self.position, self.limit = 0, limit

  def __iter__(self):
    return self

  def __next__(self):
    if self.limit is not None and self.position >= self.limit:
      raise StopIteration
    batch = self.corpus.batch(self.position, self.batch_size, split=self.split, rows=self.rows)
    self.position += 1
    return batch

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


@dataclasses.dataclass
class MarkovTask(Task):
  """The generated Markov corpus as a `Task`: endless 'train' and 'eval' splits of lm batches (no
  tokenizer, no raw texts); an 'eval' pass is `eval_batches` batches long."""

  corpus: synthetic.MarkovCorpus | None = None
  eval_batches: int = 1

  @property
  def splits(self) -> tuple[str, ...]:
    return synthetic.SPLITS

  @property
  def validation_split(self) -> str:
    return "eval"

  def size(self, split: str) -> int | None:
    return None

  def dataset(self, split: str, *, batch_size: int, train: bool, seed: int = 0,
              process_index: int = 0, process_count: int = 1) -> MarkovData:
    """This process's `batch_size` rows (block `process_index` of `process_count`) of every batch
    of `split`; the order is the corpus's own (`seed` is unused: `data.seed` seeded the corpus)."""
    synthetic.check_split(split, self.splits)
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    return MarkovData(self.corpus, batch_size * process_count, rows, split=split,
                      limit=None if train else self.eval_batches)


__all__ = ["KINDS", "lazy_map", "MarkovData", "MarkovTask", "Task", "build_tokenizer",
           "pretrained_dir", "record_fields", "text_task", "tokenizer_directory"]
