"""The base experiment config (every knob, documented once) and its validation.

Experiment files (`experiments/*.py`) start from `base_config()` and change what they need;
`validate(config)` checks a finished config (after command-line overrides) before anything is built
or compiled, and raises ValueError naming the key and the value.

Knobs (`config.<name>`):
  seed: parameters from `nnx.Rngs(seed)`, dropout keys from `seed + 1`, the data from `data.seed`.
  steps: total optimizer steps.
  batch_size: global batch, in sequences (split over `mesh.data * mesh.fsdp` and into
    `grad_accum_steps` microbatches).
  grad_accum_steps: microbatches per step (gradients summed in a `lax.scan`, one update).
  log_every: steps between metric lines in `WORKDIR/metrics.jsonl` (the only host syncs).
  eval_every: steps between evaluations (0: only at the end); `eval_batches` batches each (0: the
    whole validation split; the final evaluation always covers it, and the test split).
  checkpoint_every: steps between checkpoints (one is also written at the end and on SIGTERM);
    `keep_checkpoints` most recent are kept, and also the best by `best_checkpoint_metric` (an
    eval metric: 'eval_loss', 'eval_nll', 'eval_accuracy'; '' = none) among checkpoints saved at an
    eval step, lowest or highest per `best_checkpoint_mode` ('min', 'max').
  checkpoint: which checkpoint the final report and the eval / decode / attend modes use: 'latest',
    'best' (by `best_checkpoint_metric`) or a step number ('200'); `--checkpoint=` on the command
    line.
  A workdir that holds a run resumes it only with the same config except for the keys in
  `RESUMABLE_KEYS` (loop lengths, evaluation, reporting, the mesh: nothing that changes what a
  checkpoint holds or means); any other difference is refused (`config_changes`).
  task: 'lm' (DecoderLM), 'seq2seq' (EncoderDecoder) or 'classification' (EncoderClassifier).
  mesh: axis sizes `data`, `fsdp`, `tensor`, `context`; one may be -1 (the remaining devices).
  sharding.preset: logical-axis rules 'dp', 'fsdp', 'tp', 'fsdp_tp', 'context'
    (`flaxattn.parallel.rules`); `sharding.overrides`: e.g. 'mlp=,length=context'.
  model: every `flaxattn.nn.TransformerConfig` field (documented there; dtypes as names:
    `dtype='bfloat16'` computes in bfloat16 with `param_dtype='float32'` master weights), plus
    `num_classes` and `pooling` (classification), `share_embeddings` (seq2seq), and `pretrained`
    (classification: a BERT checkpoint directory or a known name, 'all-MiniLM-L6-v2', whose
    architecture, WordPiece vocabulary and weights the encoder takes; '' = train from scratch).
    With a data set other than 'markov', `vocab_size` is the tokenizer's.
  optimizer: `name` ('adamw', 'adafactor', 'sgd', 'lion'), peak `learning_rate`, `weight_decay`
    (not on norm scales or biases), `b1`, `b2`, `eps` (adamw; lion uses b1, b2), `momentum` (sgd),
    `clip_norm` (global gradient norm; 0: no clipping).
  schedule: `name` ('constant', 'warmup_cosine', 'warmup_linear', 'inverse_sqrt'), `warmup_steps`,
    `end_factor` (final rate as a fraction of the peak, for the decays).
  loss: `label_smoothing`, `z_loss` (coefficient of logsumexp(logits)**2).
  data: `name`: the data set and with it the task (table in `flaxattn.data.tasks`): 'markov'
      (generated, lm), 'tweets' (classification), 'ptb' (lm), 'bible' (seq2seq), 'listops'
      (classification), 'copy' / 'reverse' / 'recall' (seq2seq), 'files' (`config.task`).
    `seq_len`: tokens per lm row or classification input; `source_len`, `target_len` (seq2seq).
    `seed`: data order, splits and generated data. `branching`: successors per Markov state.
    `tokenizer`: 'byte', 'word', 'sentencepiece', 'wordpiece' ('' = the data set's default);
      `vocab_size` (learned tokenizers; 0 = the default; also the id range of copy/reverse/recall);
      `tokenizer_path`: an existing SentencePiece `.model`, word list or BERT `vocab.txt`.
    `source`, `target`: Bible version codes ('k' KJV, '4' WEB, 'l' Louis Segond, 'e' Elberfelder,
      '3' Basic English).
    `packing` (lm: several documents per row, with segment ids), `buckets` ('64,128': batch by
      length), `overlong` ('truncate' or 'drop' examples longer than the lengths; both counted in the
      report).
    `train_examples`, `eval_examples` (generated data sets; 0 = their defaults), `min_length`,
      `max_length` (ListOps tokens; copy/reverse/recall use `min_length`).
    `files`: `train`, `validation`, `test` paths, `format` ('' = from the extension), `text_field`,
      `label_field`, `source_field`, `target_field`, `on_bad_line` ('error' or 'skip', counted).
  eval: `batch_size` (0 = `batch_size`), `test` (evaluate the test split at the end),
    `decode_every_eval` (seq2seq: beam-search metrics at every eval, not only the final one),
    `decode_examples` (0 = the whole split), `beam_size`, `length_penalty`, `max_decode_len`
    (0 = `data.target_len`).
  report: `attention_examples` (validation examples drawn as attention maps in the report and, at
    each eval, in TensorBoard), `baseline` ('tfidf': TF-IDF + logistic regression on the same
    split, classification).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math

import jax
import ml_collections
from ml_collections import config_dict

from flaxattn.nn.config import TransformerConfig

TASKS = ("lm", "seq2seq", "classification")
DATASETS = ("markov", "tweets", "ptb", "bible", "listops", "copy", "reverse", "recall", "files")
TOKENIZERS = ("", "byte", "word", "sentencepiece", "wordpiece")
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
  model.num_classes = 2
  model.pooling = "first"
  model.share_embeddings = True
  model.pretrained = ""
  return model


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default (see the module docstring). A decoder LM on the Markov corpus."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.steps = 1000
  config.batch_size = 32
  config.grad_accum_steps = 1
  config.log_every = 50
  config.eval_every = 500
  config.eval_batches = 4
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.best_checkpoint_metric = "eval_loss"
  config.best_checkpoint_mode = "min"
  config.checkpoint = "latest"
  config.task = "lm"
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
  config.sharding = ml_collections.ConfigDict(dict(preset="fsdp_tp", overrides=""))
  config.model = _model_config()
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", learning_rate=3e-4, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, momentum=0.9,
      clip_norm=1.0))
  config.schedule = ml_collections.ConfigDict(dict(name="warmup_cosine", warmup_steps=100,
                                                   end_factor=0.1))
  config.loss = ml_collections.ConfigDict(dict(label_smoothing=0.0, z_loss=0.0))
  config.data = ml_collections.ConfigDict(dict(
      name="markov", seq_len=128, source_len=0, target_len=0, branching=4, seed=0, tokenizer="",
      vocab_size=0, tokenizer_path="", source="k", target="l", packing=False, buckets="",
      overlong="truncate", train_examples=0, eval_examples=0, min_length=500, max_length=2000))
  config.data.files = ml_collections.ConfigDict(dict(
      train="", validation="", test="", format="", text_field="text", label_field="label",
      source_field="source", target_field="target", on_bad_line="error"))
  config.eval = ml_collections.ConfigDict(dict(
      batch_size=0, test=True, decode_every_eval=False, decode_examples=0, beam_size=4,
      length_penalty=0.6, max_decode_len=0))
  config.report = ml_collections.ConfigDict(dict(attention_examples=1, baseline=""))
  return config



def bible_seq2seq_config(target: str, *, smoke: bool = False) -> ml_collections.ConfigDict:
  """The encoder-decoder on Bible verse pairs, King James Version -> version `target` (a
  `flaxattn.data.corpora` code: 'l' French, 'e' German, '3' Basic English) with a shared
  SentencePiece vocabulary and beam search, used by `experiments/translate_bible.py` and
  `experiments/simplify_bible.py`. Sized for a 2-core CPU (about 15 minutes of training); scale
  layers, width and steps up on an accelerator. `smoke`: tiny, 30 steps, 16 decoded verses."""
  config = base_config()
  config.task = "seq2seq"
  config.update(steps=400, batch_size=32, log_every=50, eval_every=300, eval_batches=0,
                checkpoint_every=300)
  config.data.update(name="bible", source="k", target=target, source_len=64, target_len=80,
                     tokenizer="sentencepiece", vocab_size=8000)
  config.model.update(d_model=256, num_heads=4, mlp_dim=1024, num_layers=2, max_length=128,
                      positions="sinusoidal", dropout_rate=0.1, share_embeddings=True)
  config.optimizer.update(learning_rate=1e-3, weight_decay=0.01)
  config.schedule.warmup_steps = 100
  config.loss.label_smoothing = 0.1
  config.eval.update(beam_size=4, length_penalty=0.6)
  config.report.attention_examples = 1
  if smoke:
    config.update(steps=30, batch_size=16, log_every=10, eval_every=30, checkpoint_every=30,
                  eval_batches=2)
    config.data.update(source_len=32, target_len=32, vocab_size=1000)
    config.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, max_length=32)
    config.eval.update(decode_examples=16, beam_size=2)
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
  from flaxattn.attention import implementations  # Deferred: keeps `import flaxattn.config` light.
  from flaxattn.parallel import make_rules, mesh_shape, unused_mesh_axes
  from flaxattn.train.optim import OPTIMIZERS, SCHEDULES

  _check_keys_and_types(config, base_config(), "config")
  _positive(config, "steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every",
            "keep_checkpoints")
  if config.eval_batches < (1 if config.data.name == "markov" else 0):
    raise ValueError(f"config.eval_batches must be positive for the endless Markov corpus, or >= 0 "
                     f"(0 = the whole split) for a data set, got {config.eval_batches}")
  if config.eval_every < 0:
    raise ValueError(f"config.eval_every must be >= 0, got {config.eval_every}")
  for key, allowed in (("task", TASKS), ("data.name", DATASETS),
                       ("best_checkpoint_metric", BEST_METRICS),
                       ("best_checkpoint_mode", ("min", "max")),
                       ("optimizer.name", OPTIMIZERS), ("schedule.name", SCHEDULES),
                       ("data.tokenizer", TOKENIZERS), ("data.overlong", ("truncate", "drop")),
                       ("data.files.on_bad_line", ("error", "skip")),
                       ("report.baseline", ("", "tfidf"))):
    value = functools.reduce(lambda section, name: section[name], key.split("."), config)
    if value not in allowed:
      raise ValueError(f"config.{key} must be one of {allowed}, got {value!r}")
  from flaxattn.data.tasks import DATASET_TASKS  # Deferred like the imports above.
  implied = DATASET_TASKS[config.data.name]
  if implied is not None and config.task != implied:
    raise ValueError(f"config.data.name={config.data.name!r} is a {implied} data set but "
                     f"config.task={config.task!r}; set config.task={implied!r}")
  data = config.data
  if config.task == "seq2seq" and (data.source_len <= 0 or data.target_len <= 0):
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
    impl = next(impl for impl in implementations() if impl["name"] == model.attention_impl)
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
          f"config.eval.max_decode_len={config.eval.max_decode_len} (0 = data.target_len="
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
  if config.eval.batch_size % batch_ways:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must be divisible by the "
                     f"{batch_ways} batch shards (0: config.batch_size)")
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
