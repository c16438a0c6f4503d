"""Data sets by name (`flaxattn.data.registry`): registration, defaults, the Markov corpus as a
Task, and the loaders of your own data (files, Hugging Face `datasets` on disk, TFDS) against the
rows written; SentencePiece BPE chosen from the config."""

import json

import numpy as np
import pytest

from flaxattn.config import base_config, validate
from flaxattn.data import registry, tasks
from flaxattn.data.synthetic import MarkovCorpus

ROWS = {
    "train": [{"sentence": "the cat sat", "y": "pos", "en": "a b", "fr": "b a"},
              {"sentence": "a dog ran off", "y": "neg", "en": "c d e", "fr": "e d c"},
              {"sentence": "the dog sat", "y": "pos", "en": "a c", "fr": "c a"}],
    "validation": [{"sentence": "a cat ran", "y": "neg", "en": "b c", "fr": "c b"}],
}
FIELDS = dict(text="sentence", label="y", source="en", target="fr")


def own_data(name: str, task: str):
  """A config reading ROWS' fields, with a word tokenizer (quick to learn)."""
  config = base_config()
  config.task = task
  config.data.update(name=name, tokenizer="word", seq_len=8, source_len=8, target_len=8)
  config.data.fields.update(FIELDS)
  config.data.splits.test = ""
  config.model.update(max_length=16, d_model=32, num_heads=2, mlp_dim=32, num_layers=1)
  return config


def expected(task: str, split: str) -> list[dict]:
  """ROWS as the examples of `task`: the configured fields under the Task's names."""
  keys = {"classification": ("text", "label"), "lm": ("text",), "seq2seq": ("source", "target")}
  return [{key: row[FIELDS[key]] for key in keys[task]} for row in ROWS[split]]


def check_task(task_object: tasks.Task, task: str, *, any_order: bool = False):
  order = (lambda rows: sorted(rows, key=json.dumps)) if any_order else list
  assert task_object.kind == task and task_object.splits == ("train", "validation")
  for split in ROWS:
    assert order(task_object.raw[split]) == order(expected(task, split))
  if task == "classification":
    assert task_object.class_names == ("neg", "pos")
    labels = [task_object.examples["train"][i]["label"] for i in range(3)]
    assert labels == [task_object.class_names.index(row["label"])
                      for row in task_object.raw["train"]]
  first = task_object.raw["train"][0]
  text = first["source"] if task == "seq2seq" else first["text"]
  ids = task_object.examples["train"][0]["source" if task == "seq2seq" else "tokens"]
  assert task_object.tokenizer.decode([int(i) for i in ids]).split() == text.split()


def test_validate_takes_the_names_from_the_registry(monkeypatch):
  assert {"markov", "tweets", "ptb", "bible", "listops", "copy", "reverse", "recall", "files",
          "hf_disk", "tfds"} <= set(registry.names())
  config = base_config()
  config.data.name = "imagenet"
  with pytest.raises(ValueError, match=r"^config.data.name must be one of \('markov', .*'tfds'\), "
                                       r"got 'imagenet'$"):
    validate(config)
  # A new data set is one registered builder: validate and build_task find it.
  monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))
  built = []

  @registry.register("tiny_lm", kind="lm", train_examples=7)
  def tiny_lm(config, workdir):
    built.append(config.data.train_examples)
    raw = {"train": [{"text": "x y"}] * config.data.train_examples}
    return tasks.text_task(config, workdir, raw, kind="lm")

  config.data.update(name="tiny_lm", tokenizer="word")
  validate(config)
  task = registry.build_task(config, None)
  assert built == [7] and len(task.raw["train"]) == 7 and task.splits == ("train",)
  assert config.data.train_examples is None  # The config itself is left as it was.
  with pytest.raises(ValueError, match="'tiny_lm' is already registered"):
    registry.register("tiny_lm")(tiny_lm)


@pytest.mark.parametrize("change, message", [
    (lambda c: c.data.update(name="copy", source_len=8, target_len=8),
     r"^config.data.vocab_size must be set for config.data.name='copy'$"),
    (lambda c: c.data.update(name="files"),
     r"^config.data.files.train must be set for config.data.name='files'$"),
    (lambda c: c.data.update(name="hf_disk"),
     r"^config.data.hf_disk.path must be set for config.data.name='hf_disk'$"),
    (lambda c: (c.data.update(name="hf_disk"), c.data.hf_disk.update(path="/d"),
                c.data.splits.update(train="")),
     r"^config.data.splits.train must be set for config.data.name='hf_disk'$"),
    (lambda c: (c.data.update(name="tfds"), c.data.tfds.update(name="mnist")),
     r"^config.data.tfds.data_dir must be set for config.data.name='tfds'$"),
    (lambda c: (c.data.update(name="files", tokenizer="bpe"), c.data.files.update(train="a.txt")),
     r"^config.data.vocab_size must be set to train the 'bpe' tokenizer of "
     r"config.data.name='files' \(or give config.data.tokenizer_path\)$"),
    (lambda c: c.data.update(name="listops", tokenizer="unigram"),
     r"config.data.tokenizer must be one of \(None, 'byte', .*got 'unigram'"),
    (lambda c: c.update(eval_batches=0),
     r"config.eval_batches must be positive for the endless data set 'markov'"),
])
def test_data_set_requirements_are_one_line_errors(change, message):
  config = base_config()
  config.task = {"copy": "seq2seq", "listops": "classification"}.get(config.data.name, "lm")
  change(config)
  config.task = registry.get(config.data.name).kind or config.task
  with pytest.raises(ValueError, match=message):
    validate(config)


def test_defaults_come_from_the_data_set_where_the_config_leaves_none():
  config = base_config()
  config.data.update(name="listops", eval_examples=30)
  data = registry.resolve_data(config.data)
  assert (data.train_examples, data.eval_examples, data.tokenizer) == (96_000, 30, "word")
  assert config.data.train_examples is None
  assert registry.resolve_data(base_config().data).tokenizer is None  # markov: no tokenizer.


def test_markov_task_rows_are_the_corpus_rows():
  config = base_config()
  config.update(eval_batches=2)
  config.model.vocab_size, config.data.seq_len = 32, 8
  task = registry.build_task(config, None)
  reference = MarkovCorpus(32, 8, branching=4, seed=0)
  assert (task.kind, task.vocab_size, task.tokenizer, task.splits, task.validation_split) == (
      "lm", 32, None, ("train", "eval"), "eval")
  # Process 1 of 2 reads rows 3:6 of every global batch of 6.
  train = iter(task.dataset("train", batch_size=3, train=True, process_index=1, process_count=2))
  for index in range(2):
    batch, full = next(train), reference.batch(index, 6, split="train")
    np.testing.assert_array_equal(batch["inputs"], full["inputs"][3:6])
  evaluation = list(task.dataset("eval", batch_size=4, train=False))
  assert len(evaluation) == 2  # config.eval_batches
  np.testing.assert_array_equal(evaluation[1]["targets"],
                                reference.batch(1, 4, split="eval")["targets"])
  with pytest.raises(ValueError, match=r"split must be one of \('train', 'eval'\), got 'test'"):
    task.dataset("test", batch_size=4, train=False)


@pytest.mark.parametrize("task", ["classification", "lm", "seq2seq"])
def test_hf_disk_task_holds_the_rows_saved(tmp_path, task):
  datasets = pytest.importorskip("datasets")
  datasets.DatasetDict({split: datasets.Dataset.from_list(rows) for split, rows in ROWS.items()}
                       ).save_to_disk(str(tmp_path / "saved"))
  config = own_data("hf_disk", task)
  config.data.hf_disk.path = str(tmp_path / "saved")
  validate(config)
  check_task(registry.build_task(config, str(tmp_path / "work")), task)


def test_files_task_holds_the_rows_written(tmp_path):
  config = own_data("files", "classification")
  for split, rows in ROWS.items():
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config.data.files[split] = str(path)
  validate(config)
  check_task(registry.build_task(config, None), "classification")


def test_tfds_task_holds_the_rows_prepared(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyRows(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {key: tfds.features.Text() for key in ROWS["train"][0]}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in ROWS.items()}

    def _generate_examples(self, rows):
      yield from enumerate(rows)

  TinyRows(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = own_data("tfds", "seq2seq")
  config.data.tfds.update(name="tiny_rows", data_dir=str(tmp_path))
  validate(config)
  # TFDS stores the examples in its own (hashed) order: compare as sets.
  check_task(registry.build_task(config, None), "seq2seq", any_order=True)


def test_bpe_tokenizer_is_sentencepiece_bpe(tmp_path):
  from sentencepiece import sentencepiece_model_pb2

  config = own_data("files", "lm")
  path = tmp_path / "train.txt"
  words = ["lower", "lowest", "newer", "newest", "wider", "widest", "slower", "slowest"]
  path.write_text("".join(f"{a} {b} {c}\n" for a in words for b in words[:4] for c in words[4:]))
  config.data.files.update(train=str(path), validation="")
  config.data.fields.text = "text"  # A .txt file's records are {'text': line}.
  config.data.update(tokenizer="bpe", vocab_size=60)
  validate(config)
  task = registry.build_task(config, str(tmp_path / "work"))
  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString((tmp_path / "work" / "tokenizer" / "tokenizer.model").read_bytes())
  assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
  assert task.vocab_size == 60
  text = "newest slower wider"
  assert task.tokenizer.decode(task.tokenizer.encode(text)) == text
  # A resumed run loads the cached model, whatever it would train now.
  again = registry.build_task(config, str(tmp_path / "work"))
  assert again.tokenizer.encode(text) == task.tokenizer.encode(text)


def test_a_record_without_a_configured_field_is_named(tmp_path):
  config = own_data("files", "classification")
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps({"sentence": "a b"}) + "\n")
  config.data.files.update(train=str(path))
  with pytest.raises(ValueError, match=r"^a record has no field 'y' \(config.data.fields.label\); "
                                       r"its fields are \['sentence'\]$"):
    registry.build_task(config, None)
