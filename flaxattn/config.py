"""The base experiment config (every knob, documented on its own line) and its validation.

Experiment files (`experiments/*.py`) start from `base_config()` and change what they need; their
`get_config(arg)` reads `--config=experiments/NAME.py:variant,key=value` with `parse_variant`.
`validate(config)` checks a finished config (after command-line overrides) before anything is built
or compiled, and raises ValueError naming the key and the value.

A workdir that holds a run resumes it only with the same config except for the keys in
`RESUMABLE_KEYS` (loop lengths, evaluation, reporting, the mesh: nothing that changes what a
checkpoint holds or means); any other difference is refused (`config_changes`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import os
import types
from collections.abc import Sequence

import jax
import ml_collections
from ml_collections import config_dict

from flaxattn.nn.config import TransformerConfig

TASKS = ("lm", "seq2seq", "classification")
# 'bpe' is SentencePiece trained with model_type='bpe' ('sentencepiece' is its unigram model).
TOKENIZERS = ("byte", "word", "sentencepiece", "bpe", "wordpiece")
BEST_METRICS = ("", "eval_loss", "eval_nll", "eval_accuracy")
# TransformerConfig annotations (strings under `from __future__ import annotations`) -> field type.
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "Any": str}


def _model_config() -> ml_collections.ConfigDict:
  model = ml_collections.ConfigDict()
  for field in dataclasses.fields(TransformerConfig):
    kind = _FIELD_TYPES[field.type.replace(" | None", "")]
    if field.default is None:
      model[field.name] = config_dict.placeholder(kind)
    else:
      model[field.name] = jax.numpy.dtype(field.default).name if field.type == "Any" else field.default
  model.pooling = "first"  # classification: how the encoder's outputs become one vector.
  model.share_embeddings = True  # seq2seq: one embedding table for source, target and output.
  model.pretrained = ""  # classification: a BERT directory or 'all-MiniLM-L6-v2' ('' = scratch).
  return model


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default, documented on its line: a decoder LM on the Markov corpus.

  `None` (a typed placeholder) means "not set": the comment says what is used instead. Where it is
  the data set's default, the data set declares it where it is registered
  (`flaxattn.data.registry`, `register(..., defaults)`), and experiments state their own values.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # Parameters from `nnx.Rngs(seed)`, dropout keys from seed + 1 (data: data.seed).
  config.steps = 1000  # Total optimizer steps.
  config.batch_size = 32  # Global batch in sequences, split over mesh.data x mesh.fsdp.
  config.grad_accum_steps = 1  # Microbatches per step (gradients summed in a scan, one update).
  config.log_every = 50  # Steps between lines of WORKDIR/metrics.jsonl (the only host syncs).
  config.eval_every = 100  # Steps between evaluations (10 curve points in 1000); 0: the last only.
  config.eval_batches = 4  # Batches per evaluation; 0: the whole split (the last one's, if finite).
  config.checkpoint_every = 500  # Steps between checkpoints (also at the end and on SIGTERM).
  config.keep_checkpoints = 3  # Most recent checkpoints kept (plus the best, below).
  config.best_checkpoint_metric = "eval_loss"  # Also keep the best by this (BEST_METRICS; '': no).
  config.best_checkpoint_mode = "min"  # 'min' or 'max' of best_checkpoint_metric.
  config.checkpoint = "latest"  # For the report, eval, decode, attend: 'latest', 'best' or '200'.
  config.task = "lm"  # 'lm', 'seq2seq' or 'classification'; a data set that implies one must agree.

  # Device mesh: axis sizes; one may be -1 (the remaining devices).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data parallelism (whole replicas).
  config.mesh.fsdp = 1  # Data parallelism with parameters and optimizer state sharded.
  config.mesh.tensor = 1  # Heads and MLP columns split (Megatron).
  config.mesh.context = 1  # The sequence split (ring attention, or kernels sharded by length).

  # Logical-axis rules (`flaxattn.parallel.rules`).
  config.sharding = ml_collections.ConfigDict()
  config.sharding.preset = "fsdp_tp"  # 'dp', 'fsdp', 'tp', 'fsdp_tp' or 'context'.
  config.sharding.overrides = ""  # Single names changed, e.g. 'mlp=,length=context'.

  # The model: every `flaxattn.nn.TransformerConfig` field (documented there; dtypes by name), plus
  # the task heads' knobs. With a data set that has a tokenizer, vocab_size is the tokenizer's.
  config.model = _model_config()

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # 'adamw', 'adafactor', 'sgd' or 'lion'.
  config.optimizer.learning_rate = 3e-4  # Peak rate (the schedule scales it).
  config.optimizer.weight_decay = 0.1  # Decoupled; never on norm scales or biases.
  config.optimizer.b1 = 0.9  # adamw, lion.
  config.optimizer.b2 = 0.95  # adamw, lion.
  config.optimizer.eps = 1e-8  # adamw.
  config.optimizer.momentum = 0.9  # sgd.
  config.optimizer.clip_norm = 1.0  # Global gradient-norm clipping; 0: none.

  config.schedule = ml_collections.ConfigDict()
  config.schedule.name = "warmup_cosine"  # Or 'constant', 'warmup_linear', 'inverse_sqrt'.
  config.schedule.warmup_steps = 100  # Linear warmup from 0 to the peak.
  config.schedule.end_factor = 0.1  # Final rate as a fraction of the peak (the decays).

  config.loss = ml_collections.ConfigDict()
  config.loss.label_smoothing = 0.0  # Mass spread uniformly over the vocabulary / classes.
  config.loss.z_loss = 0.0  # Coefficient of logsumexp(logits)**2 (keeps logits from drifting).

  # The data set (found by name in `flaxattn.data.registry`) and how it becomes batches.
  config.data = ml_collections.ConfigDict()
  config.data.name = "markov"  # A registered data set; `registry.names()` lists them.
  config.data.seq_len = 128  # Tokens per lm row or classification input.
  config.data.source_len = config_dict.placeholder(int)  # seq2seq source tokens (required there).
  config.data.target_len = config_dict.placeholder(int)  # seq2seq target tokens (required there).
  config.data.seed = 0  # Data order, splits and generated data.
  config.data.branching = 4  # markov: successors per state (the corpus's entropy).
  config.data.tokenizer = config_dict.placeholder(str)  # One of TOKENIZERS; None: the data set's.
  config.data.vocab_size = config_dict.placeholder(int)  # Learned tokenizers' size (sentencepiece,
  #   bpe: required; word: None keeps every word); copy/reverse/recall: the id range (required).
  config.data.tokenizer_path = ""  # An existing SentencePiece .model, word list or BERT vocab.txt.
  config.data.source = "k"  # bible: source version ('k' KJV, '4' WEB, 'l' Louis Segond,
  config.data.target = "l"  # bible: target version  'e' Elberfelder, '3' Basic English).
  config.data.packing = False  # lm: several documents per row, with segment ids.
  config.data.buckets = ""  # Batch by length: increasing bucket lengths, e.g. '64,128'; '': none.
  config.data.overlong = "truncate"  # 'truncate' or 'drop' longer examples (counted in the report).
  config.data.train_examples = config_dict.placeholder(int)  # Generated sets; None: the set's.
  config.data.eval_examples = config_dict.placeholder(int)  # Generated sets, per eval split; ditto.
  config.data.min_length = 500  # listops: fewest tokens; copy/reverse/recall: ids per example.
  config.data.max_length = 2000  # listops: most tokens.
  # Your own data: data.name 'files' (the paths below), 'hf_disk' (a Hugging Face DatasetDict
  # written by `save_to_disk`) or 'tfds' (a prepared TFDS data set); the task is config.task.
  config.data.files = ml_collections.ConfigDict()
  config.data.files.train = ""  # A .tsv, .csv, .jsonl or .txt file (optionally .gz); required.
  config.data.files.validation = ""  # '' : no such split.
  config.data.files.test = ""  # '' : no such split.
  config.data.files.format = ""  # 'tsv', 'csv', 'jsonl', 'txt'; '': from the extension.
  config.data.files.on_bad_line = "error"  # 'error' (file and line) or 'skip' (counted, logged).
  config.data.hf_disk = ml_collections.ConfigDict()
  config.data.hf_disk.path = ""  # The directory `DatasetDict.save_to_disk` wrote; required.
  config.data.tfds = ml_collections.ConfigDict()
  config.data.tfds.name = ""  # 'name[/config][:version]', prepared as array_record; required.
  config.data.tfds.data_dir = ""  # The TFDS data directory holding it (nothing is downloaded).
  config.data.splits = ml_collections.ConfigDict()  # hf_disk, tfds: the source's split per ours.
  config.data.splits.train = "train"  # hf_disk: a DatasetDict key; tfds: a split ('train[:90%]').
  config.data.splits.validation = "validation"  # '': no validation split.
  config.data.splits.test = "test"  # '': no test split.
  config.data.fields = ml_collections.ConfigDict()  # files, hf_disk, tfds: the records' fields.
  config.data.fields.text = "text"  # lm and classification input.
  config.data.fields.label = "label"  # classification: class names are the sorted distinct labels.
  config.data.fields.source = "source"  # seq2seq input.
  config.data.fields.target = "target"  # seq2seq output.

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = config_dict.placeholder(int)  # Global eval batch; None: batch_size.
  config.eval.test = True  # Evaluate the test split at the end.
  config.eval.decode_every_eval = False  # seq2seq: beam-search metrics at every eval, not the last.
  config.eval.decode_examples = 0  # seq2seq: examples decoded; 0: the whole split.
  config.eval.beam_size = 4  # seq2seq beam search.
  config.eval.length_penalty = 0.6  # seq2seq: GNMT length penalty exponent.
  config.eval.max_decode_len = config_dict.placeholder(int)  # Most tokens; None: data.target_len.

  config.report = ml_collections.ConfigDict()
  config.report.attention_examples = 1  # Validation examples drawn as attention maps (also to TB).
  config.report.baseline = ""  # 'tfidf': TF-IDF + logistic regression on the same split; '': none.
  return config


# Keys (or whole sections, ending in '.') that may differ between a workdir's `config.json` and the
# config that resumes it: how long, how often and how much to evaluate, log, save and report, how the
# devices are laid out, and the compute dtype, kernel and remat policy (parameter shapes and dtypes,
# optimizer state and the data stay as they were saved).
RESUMABLE_KEYS = (
    "steps", "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    "best_checkpoint_metric", "best_checkpoint_mode", "checkpoint", "grad_accum_steps", "mesh.",
    "sharding.", "eval.", "report.", "model.attention_impl", "model.dtype", "model.remat")


def _flat(config: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[prefix + key] = value
  return flat


def config_changes(old: dict, new: dict) -> list[str]:
  """The differences between a run's saved config (`config.json`, a dict) and `new` (a ConfigDict or
  dict) outside `RESUMABLE_KEYS`, as 'key: old -> new' strings, sorted by key. A key the old config
  lacks (added to `base_config` since) counts as its default."""
  # Through JSON, as `config.json` was written: tuples become lists, dtypes names.
  to_dict = lambda c: json.loads(c.to_json()) if isinstance(c, ml_collections.ConfigDict) else c
  defaults, old, new = _flat(to_dict(base_config())), _flat(to_dict(old)), _flat(to_dict(new))
  missing = object()
  changes = []
  for key in sorted(set(old) | set(new)):
    if key in RESUMABLE_KEYS or key.startswith(tuple(k for k in RESUMABLE_KEYS if k.endswith("."))):
      continue
    before, after = old.get(key, defaults.get(key, missing)), new.get(key, missing)
    if before != after:
      show = lambda v: "(absent)" if v is missing else repr(v)
      changes.append(f"{key}: {show(before)} -> {show(after)}")
  return changes


def parse_checkpoint(value: str) -> str | int:
  """'latest', 'best', or the step number of `config.checkpoint` (ValueError naming the value)."""
  if value in ("latest", "best"):
    return value
  if value.isdigit():
    return int(value)
  raise ValueError(f"config.checkpoint (--checkpoint) must be 'latest', 'best' or a step number, "
                   f"got {value!r}")


def _strict_bool(text: str) -> bool:
  if text.lower() not in ("true", "false"):
    raise ValueError(f"{text!r} is not a bool (true or false)")
  return text.lower() == "true"


def parse_variant(arg: str | None, experiment: str, variants: Sequence[str],
                  **options) -> ml_collections.ConfigDict:
  """The `arg` of `get_config(arg)`, from `--config=experiments/NAME.py:variant,key=value,...`.

  The first item may be one of `variants` (`''`, the default, must be listed to be allowed
  alone); every `key=value` must name one of `options`, whose defaults give their types (bools
  read 'true' / 'false'; a bare `key` is `key=true`). Returns a ConfigDict with `variant` and every
  option. Raises one-line ValueErrors naming `experiment` (the file, `__file__`), the bad item and
  the valid ones.

  Example: `parse_variant('smoke,length=12', __file__, ('', 'smoke'), length=10)` ->
  `variant='smoke', length=12`.
  """
  where = "experiments/" + os.path.basename(experiment)
  items = [item for item in (arg or "").split(",") if item]
  variant = ""
  if items and "=" not in items[0] and items[0] not in options:
    variant = items.pop(0)
  if variant not in variants:
    raise ValueError(f"{where} variant must be one of {tuple(variants)}, got {variant!r}")
  parsed = ml_collections.ConfigDict({"variant": variant, **options})
  for item in items:
    key, _, text = item.partition("=")
    if key not in options:
      raise ValueError(f"{where}: {key!r} is not an option; the options are "
                       f"{sorted(options) or 'none'} (variants {tuple(variants)})")
    kind = type(options[key])
    try:
      parsed[key] = (_strict_bool(text or "true") if kind is bool else kind(text))
    except ValueError:
      raise ValueError(f"{where}: option {key}={text!r} must be {kind.__name__}") from None
  return parsed


def load_experiment(path: str) -> types.ModuleType:
  """The experiment file at `path` as a module (as `--config=path` loads it); experiment files
  share code through it: `load_experiment(os.path.join(os.path.dirname(__file__), 'base.py'))`."""
  name = "flaxattn_experiment_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _check_keys_and_types(config, base, prefix: str):
  for key in config:
    name = f"{prefix}.{key}"
    if key not in base:
      close = difflib.get_close_matches(key, list(base), n=1)
      hint = f"; did you mean {prefix}.{close[0]}?" if close else f"; the keys are {sorted(base)}"
      raise ValueError(f"{name} is not a known config key{hint}")
    value, default = config[key], base[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f"{name} must be a ConfigDict section, got {value!r}")
      _check_keys_and_types(value, default, name)
      continue
    kind = base.get_type(key)
    allowed = (int, float) if kind is float else (kind,)
    # Placeholders (default None) may stay None.
    if (value is None and default is not None) or (value is not None and (
        not isinstance(value, allowed) or (kind is not bool and isinstance(value, bool)))):
      raise ValueError(f"{name} must be {kind.__name__}, got {type(value).__name__} {value!r}")


def _positive(config, *names):
  for name in names:
    value = config[name]
    if value <= 0:
      raise ValueError(f"config.{name} must be positive, got {value}")


def transformer_config(model: ml_collections.ConfigDict) -> TransformerConfig:
  """The `TransformerConfig` of `config.model` (dtype names resolved)."""
  fields = {field.name for field in dataclasses.fields(TransformerConfig)}
  return TransformerConfig(**{key: model[key] for key in fields})


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and value of the first problem in `config`, before any model
  is built or compiled: unknown keys (with a did-you-mean), wrong types, model shapes (heads vs
  kv_heads), a mesh that does not match the devices, sharding rules that leave a mesh axis idle or
  do not divide the batch, an attention implementation this platform cannot run, sequence
  length vs the model's positions, and what ring attention needs (a context axis > 1 that splits
  the sequence into 2 x context chunks)."""
  from flaxattn.attention import describe_implementations  # Deferred: keeps `import flaxattn.config` light.
  from flaxattn.parallel import make_rules, mesh_shape, unused_mesh_axes
  from flaxattn.train.optim import OPTIMIZERS, SCHEDULES

  _check_keys_and_types(config, base_config(), "config")
  _positive(config, "steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
            "keep_checkpoints")
  from flaxattn.data import registry  # Deferred like the imports above.
  dataset = registry.get(config.data.name)
  if config.eval_batches < (1 if dataset.endless else 0):
    raise ValueError(f"config.eval_batches must be positive for the endless data set "
                     f"{dataset.name!r}, or >= 0 (0 = the whole split) for a data set, got "
                     f"{config.eval_batches}")
  if config.eval_every < 0:
    raise ValueError(f"config.eval_every must be >= 0, got {config.eval_every}")
  for key, allowed in (("task", TASKS),
                       ("best_checkpoint_metric", BEST_METRICS),
                       ("best_checkpoint_mode", ("min", "max")),
                       ("optimizer.name", OPTIMIZERS), ("schedule.name", SCHEDULES),
                       ("data.tokenizer", (None,) + TOKENIZERS),
                       ("data.overlong", ("truncate", "drop")),
                       ("data.files.on_bad_line", ("error", "skip")),
                       ("report.baseline", ("", "tfidf"))):
    value = functools.reduce(lambda section, name: section[name], key.split("."), config)
    if value not in allowed:
      raise ValueError(f"config.{key} must be one of {allowed}, got {value!r}")
  if dataset.kind is not None and config.task != dataset.kind:
    raise ValueError(f"config.data.name={config.data.name!r} is a {dataset.kind} data set but "
                     f"config.task={config.task!r}; set config.task={dataset.kind!r}")
  data = config.data
  registry.check_data(data, learned_tokenizer=not config.model.pretrained)
  if config.task == "seq2seq" and not all((length or 0) > 0
                                          for length in (data.source_len, data.target_len)):
    raise ValueError(f"config.data.source_len={data.source_len} and config.data.target_len="
                     f"{data.target_len} must be positive for seq2seq")
  if data.packing and config.task != "lm":
    raise ValueError(f"config.data.packing=True packs lm documents; config.task={config.task!r}")
  if data.buckets:
    try:
      buckets = [int(b) for b in data.buckets.split(",")]
    except ValueError:
      raise ValueError(f"config.data.buckets must be comma-separated ints, got {data.buckets!r}"
                       ) from None
    if buckets != sorted(set(buckets)) or buckets[0] <= 0:
      raise ValueError(f"config.data.buckets must be increasing positive ints, got {data.buckets!r}")
  if config.model.pretrained and config.task != "classification":
    raise ValueError(f"config.model.pretrained={config.model.pretrained!r} fine-tunes an encoder "
                     f"classifier; config.task={config.task!r}")
  if parse_checkpoint(config.checkpoint) == "best" and not config.best_checkpoint_metric:
    raise ValueError("config.checkpoint='best' needs config.best_checkpoint_metric (e.g. "
                     "'eval_loss'); it is ''")
  if config.eval.beam_size < 1:
    raise ValueError(f"config.eval.beam_size must be >= 1, got {config.eval.beam_size}")
  if config.eval.max_decode_len is not None and config.eval.max_decode_len < 1:
    raise ValueError(f"config.eval.max_decode_len must be >= 1 or None (data.target_len), got "
                     f"{config.eval.max_decode_len}")

  model = config.model
  kv_heads = model.kv_heads or model.num_heads
  if model.num_heads % kv_heads:
    raise ValueError(f"config.model.num_heads={model.num_heads} must be divisible by "
                     f"config.model.kv_heads={model.kv_heads}")
  try:
    transformer_config(model)
  except ValueError as error:
    raise ValueError(f"config.model: {error}") from None
  if model.attention_impl is not None:
    platform = jax.default_backend()
    impl = next(impl for impl in describe_implementations()
                if impl["name"] == model.attention_impl)
    if platform not in impl["platforms"]:
      raise ValueError(f"config.model.attention_impl={model.attention_impl!r} cannot run on "
                       f"platform {platform!r} (it runs on {impl['platforms']})")
  # The lengths of the model's inputs: seq2seq has a source and a target, the others one sequence.
  if config.task == "seq2seq":
    lengths = {"data.source_len": data.source_len, "data.target_len": data.target_len}
  else:
    lengths = {"data.seq_len": data.seq_len}
  if model.positions == "learned":
    for key, length in lengths.items():
      if length > model.max_length:
        raise ValueError(f"config.{key}={length} exceeds config.model.max_length="
                         f"{model.max_length} (the learned position table)")
    decode_len = config.eval.max_decode_len or data.target_len
    if config.task == "seq2seq" and decode_len + 1 > model.max_length:
      raise ValueError(
          f"config.eval.max_decode_len={config.eval.max_decode_len} (None = data.target_len="
          f"{data.target_len}) plus the start token needs a cache of {decode_len + 1} positions, "
          f"over config.model.max_length={model.max_length} (the learned position table); raise "
          "config.model.max_length or lower config.eval.max_decode_len")

  try:
    shape = dict(zip(("data", "fsdp", "tensor", "context"),
                     mesh_shape(dict(config.mesh), jax.device_count())))
  except ValueError as error:
    raise ValueError(f"{error} (override with --config.mesh.data=...)") from None
  rules = make_rules(config.sharding.preset, config.sharding.overrides)
  idle = unused_mesh_axes(rules, shape)
  if idle:
    raise ValueError(f"config.mesh.{idle[0]}={shape[idle[0]]} but config.sharding.preset="
                     f"{config.sharding.preset!r} (overrides {config.sharding.overrides!r}) maps "
                     "nothing to it")
  def shards(logical_name):
    axes = dict(rules)[logical_name]
    return math.prod(shape[axis] for axis in ((axes,) if isinstance(axes, str) else axes or ()))

  batch_ways = shards("batch")
  if config.batch_size % (batch_ways * config.grad_accum_steps):
    raise ValueError(
        f"config.batch_size={config.batch_size} must be divisible by the {batch_ways} batch shards "
        f"times config.grad_accum_steps={config.grad_accum_steps}")
  eval_batch_size = config.eval.batch_size
  if eval_batch_size is not None and (eval_batch_size <= 0 or eval_batch_size % batch_ways):
    raise ValueError(f"config.eval.batch_size={eval_batch_size} must be divisible by the "
                     f"{batch_ways} batch shards and positive (None: config.batch_size)")
  for key, length in lengths.items():
    if length % shards("length"):
      raise ValueError(f"config.{key}={length} must be divisible by the {shards('length')} "
                       "sequence (context) shards")
  if model.attention_impl == "ring" and config.task == "seq2seq":
    raise ValueError(
        "config.model.attention_impl='ring' cannot run seq2seq: ring attention needs equal query "
        "and key lengths without padding arrays, which cross-attention (target queries, padded "
        "source keys) lacks; leave config.model.attention_impl unset (None) for seq2seq")
  if model.attention_impl == "ring":
    _validate_ring(config, shape, dict(rules)["length"])


def _validate_ring(config, mesh: dict[str, int], length_axes) -> None:
  """What ring attention (`flaxattn.attention.ring`) needs: a context axis to ring over, the
  sequence sharded over it, and a length that splits into the 2 x context zig-zag chunks of the
  decoder's causal attention."""
  context = mesh["context"]
  if context < 2:
    raise ValueError(f"config.model.attention_impl='ring' needs config.mesh.context > 1 (the devices "
                     f"the sequence is split over), got {context}")
  length_axes = (length_axes,) if isinstance(length_axes, str) else length_axes or ()
  if "context" not in length_axes:
    raise ValueError(
        f"config.model.attention_impl='ring' needs the sequence sharded over the context axis, but "
        f"config.sharding.preset={config.sharding.preset!r} (overrides "
        f"{config.sharding.overrides!r}) maps 'length' to {tuple(length_axes)}; use preset 'context' "
        "or override 'length=context'")
  seq_len = config.data.seq_len
  if seq_len % (2 * context):
    raise ValueError(f"config.data.seq_len={seq_len} must be divisible by 2 x config.mesh.context="
                     f"{context} (ring attention's zig-zag chunks)")
