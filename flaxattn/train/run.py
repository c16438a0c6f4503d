"""What a run is made of, built once from a validated config and shared by every mode.

`build_run(config, workdir)` resolves the mesh, the logical rules, the task and its tokenizer, the
model (its class follows the task; `config.model.pretrained` takes the architecture and, at the
start of training, the weights of a pretrained encoder) and the loss. Training (`loop.py`) and the
eval / decode / attend modes (`flaxattn.main`) then only add what they do.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from flaxattn import nn, parallel
from flaxattn.config import transformer_config
from flaxattn.data import registry, tasks
from flaxattn.models import DecoderLM, EncoderClassifier, EncoderDecoder
from flaxattn.train import console, flops
from flaxattn.train.evaluate import Evaluator, prefixed
from flaxattn.train.losses import LOSSES
from flaxattn.train.step import make_eval_step


@dataclasses.dataclass
class Run:
  """A resolved run (see `build_run`)."""

  config: Any
  workdir: str
  mesh: jax.sharding.Mesh
  rules: Any
  kind: str
  model_config: Any
  task: tasks.Task
  make_model: Callable
  loss_fn: Callable
  seq_len: int
  batch_shardings: dict

  @property
  def data_shard(self) -> tuple[int, int]:
    """`(index, count)`: this process feeds block `index` of `count` of every batch's rows (by
    data-parallel rank: processes whose devices hold the same rows read the same data)."""
    return parallel.row_block(next(iter(self.batch_shardings.values())))

  def _rows(self, batch_size: int) -> slice:
    return parallel.local_rows(next(iter(self.batch_shardings.values())), batch_size)

  def train_iterator(self):
    """This process's training batches: an iterator with `get_state()` / `set_state()`."""
    config = self.config
    index, count = self.data_shard
    return iter(self.task.dataset(
        "train", batch_size=config.batch_size // count, train=True, seed=config.data.seed,
        process_index=index, process_count=count))

  def eval_batches(self, split: str):
    """This process's eval batches of `split`: every example once (Markov: `config.eval_batches`)."""
    index, count = self.data_shard
    return self.task.dataset(split, batch_size=self.eval_batch_size // count, train=False,
                             process_index=index, process_count=count)

  @property
  def head(self) -> dict:
    """The output head as `flaxattn.train.flops` takes it (`num_classes`, `pooling`)."""
    if self.kind != "classification":
      return {}
    return {"num_classes": len(self.task.class_names), "pooling": self.config.model.pooling}

  def summary(self) -> nn.ModelSummary:
    """The model's parameters (built abstractly: nothing is initialised) under this run's rules and
    mesh, with its forward FLOPs per token of a full-length sequence (`flaxattn.nn.summary`)."""
    model = nnx.eval_shape(lambda: self.make_model(nnx.Rngs(0)))
    lengths = self.task.lengths
    if self.kind == "seq2seq":
      per_token = flops.forward_flops_per_token(self.model_config, self.kind, lengths["source"],
                                                target_len=lengths["target"])
    else:
      per_token = flops.forward_flops_per_token(self.model_config, self.kind, self.seq_len,
                                                **self.head)
    return nn.summary(model, rules=self.rules, mesh=self.mesh, flops_per_token=per_token)

  def batch_counts(self, batch: dict) -> dict:
    """What a training step on `batch` processes (float32 scalars, jittable): `model_flops` (matmuls
    on real tokens, forward and backward: `flops.train_flops`), `real_tokens` (non-padding input
    tokens, source and target for seq2seq) and `padded_tokens` (every input position)."""
    inputs = ("source", "target_inputs") if self.kind == "seq2seq" else ("inputs",)
    return {"model_flops": flops.train_flops(self.model_config, self.kind, batch, **self.head),
            "real_tokens": flops.real_tokens(self.kind, batch),
            "padded_tokens": jnp.asarray(sum(batch[name].size for name in inputs), jnp.float32)}

  @property
  def eval_batch_size(self) -> int:
    return self.config.eval.batch_size or self.config.batch_size

  def eval_step(self, graphdef):
    """The pure eval step of this run's loss (with predictions for classification), to jit."""
    return make_eval_step(graphdef, self.loss_fn, predictions=self.kind == "classification")

  def evaluator(self, graphdef, eval_step) -> Evaluator:
    """The evaluator of `eval_step` (`eval_step(graphdef)`, jitted) on this run's eval splits."""
    evaluation = self.config.eval
    return Evaluator(
        self.kind, self.eval_batches, self.task, graphdef, eval_step, self.batch_shardings,
        self.mesh, self.rules, batch_size=self.eval_batch_size, beam_size=evaluation.beam_size,
        length_penalty=evaluation.length_penalty, max_decode_len=evaluation.max_decode_len)

  def with_pretrained(self, state, shardings):
    """`state` with the pretrained encoder's weights (`config.model.pretrained`), else unchanged."""
    if not self.config.model.pretrained:
      return state
    from flaxattn.models import load_pretrained  # Deferred: needs the `pretrained` extra.
    encoder, _ = load_pretrained(tasks.pretrained_dir(self.config.model.pretrained))
    weights = nnx.to_pure_dict(nnx.state(encoder, nnx.Param))
    params = nnx.to_pure_dict(state.params)
    expected = jax.tree.map(np.shape, params["encoder"])
    if jax.tree.map(np.shape, weights) != expected:
      raise ValueError(f"pretrained encoder {self.config.model.pretrained!r} does not match the "
                       "classifier's encoder (shapes differ)")
    params["encoder"] = jax.tree.map(
        lambda w, s: jax.device_put(np.asarray(w, np.float32), s), weights,
        nnx.to_pure_dict(shardings.params)["encoder"])
    new_params = state.params
    nnx.replace_by_pure_dict(new_params, params)
    logging.info("encoder weights from %s", self.config.model.pretrained)
    return state.replace(params=new_params)


def evaluate_during_training(run: Run, evaluator: Evaluator, params, *, step: int,
                             board=None, final: bool = False) -> dict[str, float]:
  """The loop's evaluation at `step`: validation metrics on `config.eval_batches` batches (`final`:
  the whole split, unless the data set is endless), and attention maps of one example (data sets
  with text) under `WORKDIR/attention/step_<step>` (to TensorBoard when `board`) at most
  `_TRAINING_DRAWS` times a run (`_draws_at`). The `final` evaluation draws none: the final report
  draws the same parameters' maps once, in `WORKDIR/attention/final`."""
  config = run.config
  split = run.task.validation_split
  endless = registry.get(config.data.name).endless
  result = evaluator.evaluate(params, split,
                              max_batches=config.eval_batches if endless or not final else 0,
                              decode=config.eval.decode_every_eval,
                              max_decode_examples=config.eval.decode_examples).metrics
  # Process 0 draws (it has the board); the others join in gathering the parameters.
  drawing = board is not None or jax.process_index() > 0
  if (not final and _draws_at(config, step) and drawing and run.task.tokenizer is not None and
      config.report.attention_examples):
    images = attention_images(run, evaluator.graphdef, params,
                              os.path.join(run.workdir, "attention", f"step_{step}"), examples=1)
    if board is not None:
      from flaxattn.train import report  # Deferred: matplotlib.
      report.log_images(board, images, step)
  return result


# Attention maps drawn during training (the final report draws its own): a few show how attention
# forms; each drawing of the main job's 6-layer, 12-head MiniLM took 14 s on 2 CPU cores.
_TRAINING_DRAWS = 2


def _draws_at(config, step: int) -> bool:
  """Whether the evaluation at `step` draws attention maps: every k-th evaluation, k chosen so
  that at most `_TRAINING_DRAWS` of those before the last one draw."""
  if not config.eval_every or step % config.eval_every:
    return False
  evaluations = (config.steps - 1) // config.eval_every  # Those before the final one.
  every = max(1, math.ceil(evaluations / _TRAINING_DRAWS))
  return (step // config.eval_every) % every == 0


# Longer inputs make unreadable heatmaps; the report draws the first validation examples below it.
_READABLE_TOKENS = 48


def _example_input(task: tasks.Task, example: dict):
  """What `attention_report` takes for one raw example: the text, or a (source, target) pair."""
  return (example["source"], example["target"]) if task.kind == "seq2seq" else example["text"]


def attention_images(run: Run, graphdef, params, directory: str, *, examples: int,
                     split: str = "validation", texts: list | None = None,
                     names: list[str] | None = None) -> dict[str, str]:
  """Attention heatmaps (per layer, rollout, cross-attention alignments) written under
  `directory` for `texts`, or else for the first `examples` examples of `split` short enough to
  read as a heatmap (at most `_READABLE_TOKENS` tokens, within the model's lengths); the files of
  text `i` start with `names[i]` (default `example<i>`). Returns
  tag -> PNG path. Every process must call it (the parameters, sharded over all of them, are
  gathered to each host); process 0 draws, the others return {}."""
  from flaxattn.models.attention_maps import attention_report  # Deferred: matplotlib.
  task = run.task
  host_params = parallel.to_host(params, run.mesh)
  if jax.process_index() != 0:
    return {}
  model = nnx.merge(graphdef, host_params)
  if texts is None:
    limit = min(_READABLE_TOKENS, *task.lengths.values())
    fits = lambda text: len(task.tokenizer.encode(text)) + 2 <= limit
    texts = []
    for example in task.raw[split]:
      if len(texts) == examples:
        break
      text = _example_input(task, example)
      if all(fits(part) for part in ((text,) if isinstance(text, str) else text)):
        texts.append(text)
  images = {}
  names = names or [f"example{index}" for index in range(len(texts))]
  for name, text in zip(names, texts):
    paths = attention_report(model, task.tokenizer, text, directory, prefix=name,
                             encode=None if task.kind == "seq2seq" else task.encode)
    images.update({f"attention/{name}/{os.path.splitext(os.path.basename(path))[0]}": path
                   for path in paths})
  return images


def _split_sizes(task) -> dict[str, int]:
  """split -> examples in it, for the splits whose size is known (the Markov corpus is endless)."""
  return {split: task.size(split) for split in task.splits if task.size(split) is not None}


def build_run(config, workdir: str) -> Run:
  """Resolves `config` (validated) into a `Run`; learned tokenizers are trained here (or loaded from
  `WORKDIR/tokenizer`)."""
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = parallel.make_rules(config.sharding.preset, config.sharding.overrides)
  kind = registry.task_kind(config)
  model_config = transformer_config(config.model)
  console.say(f"preparing data: {config.data.name} ({kind})")
  task = registry.build_task(config, workdir)
  sizes = _split_sizes(task)
  if sizes:
    console.say("data: " + ", ".join(f"{split} {size:,}" for split, size in sizes.items()) +
                " examples")
  if config.model.pretrained:
    # The architecture is the checkpoint's; the config keeps only what does not change the
    # weights' meaning (dropout, the attention kernel, dtypes).
    from flaxattn.models.pretrained import bert  # Deferred: needs the `pretrained` extra.
    from flaxattn.models.pretrained.weights import override
    directory = pathlib.Path(tasks.pretrained_dir(config.model.pretrained))
    overrides = {name: getattr(model_config, name) for name in (
        "dropout_rate", "attention_dropout_rate", "attention_impl", "dtype", "param_dtype")}
    model_config = override(bert.transformer_config(bert.read_config(directory), str(directory)),
                            overrides, str(directory))
  else:
    model_config = dataclasses.replace(model_config, vocab_size=task.vocab_size)
  model = config.model
  if kind == "lm":
    make_model = functools.partial(DecoderLM, model_config)
  elif kind == "classification":
    num_classes = len(task.class_names)
    make_model = functools.partial(EncoderClassifier, model_config, num_classes,
                                   pooling=model.pooling)
  else:
    make_model = functools.partial(EncoderDecoder, model_config,
                                   share_embeddings=model.share_embeddings)
  loss_fn = functools.partial(LOSSES[kind], label_smoothing=config.loss.label_smoothing,
                              z_loss=config.loss.z_loss)
  first = next(iter(task.dataset("train", batch_size=1, train=True, seed=config.data.seed)))
  shapes = {name: (config.batch_size,) + value.shape[1:] for name, value in first.items()}
  run = Run(config=config, workdir=workdir, mesh=mesh, rules=rules, kind=kind,
            model_config=model_config, task=task, make_model=lambda rngs: make_model(rngs=rngs),
            loss_fn=loss_fn, seq_len=max(task.lengths.values()),
            batch_shardings=parallel.batch_shardings(shapes, mesh, rules))
  for name, size in (("config.batch_size", config.batch_size),
                     ("config.eval.batch_size", run.eval_batch_size)):
    try:
      run._rows(size)  # Before anything compiles: a batch the processes cannot split.
    except ValueError as error:
      raise ValueError(f"{name}={size}: {error}") from None
  return run


def write_final_report(run: Run, evaluator: Evaluator, params, workdir: str, record: dict,
                       board, checkpoint: str = "") -> dict[str, float]:
  """Final metrics on the test split (`config.eval.test`), learning curves, attention maps, the
  baseline (`config.report.baseline`) and `WORKDIR/report.md`, of `params` (from `checkpoint`,
  named in the report). Returns the `test_*` metrics."""
  config = run.config
  final, outputs = {}, ()
  if config.eval.test and "test" in run.task.splits:
    test = evaluator.evaluate(params, "test", decode=True,
                              max_decode_examples=config.eval.decode_examples)
    final, outputs = prefixed(test.metrics, "test"), test.outputs
  attention = {}
  if run.task.tokenizer is not None and config.report.attention_examples:  # On every process (a gather).
    console.say(f"drawing the attention maps of {config.report.attention_examples} examples")
    attention = attention_images(run, evaluator.graphdef, params,
                                 os.path.join(workdir, "attention", "final"),
                                 examples=config.report.attention_examples)
  if jax.process_index() != 0:
    return final
  from flaxattn.train import report  # Deferred: matplotlib.
  images = [report.plot_learning_curves(os.path.join(workdir, "metrics.jsonl"),
                                        os.path.join(workdir, "learning_curves.png"))]
  tables = {}
  notes = [f"test metrics and attention maps of checkpoint {checkpoint}"] if checkpoint else []
  if run.task.tokenizer is not None:
    if attention:
      images.extend(attention.values())
      if board is not None:
        report.log_images(board, attention, int(record.get("step", 0)))
    if outputs:
      tables["Test outputs (first 10)"] = [
          {"source": s, "reference": r, "output": h} for s, r, h in outputs[:10]]
    sizes = _split_sizes(run.task)
    for split, stats in run.task.stats.items():
      # Each process counts the rows it prepared: with several, the note says whose count it is.
      whose = (f" (process {jax.process_index()} of {jax.process_count()}: its rows)"
               if jax.process_count() > 1 else "")
      notes.append(f"{split}: {stats.summary(sizes.get(split))}{whose}")
    if config.report.baseline == "tfidf":
      from flaxattn.train.baselines import TFIDF_C_GRID, tfidf_logistic_regression
      raw, c_grid = run.task.raw, TFIDF_C_GRID
      console.say(f"TF-IDF baseline: {len(raw['train']):,} training texts, C of "
                  f"{len(c_grid)} by cross-validation")
      for split in ("validation", "test"):
        scores = tfidf_logistic_regression(
            [e["text"] for e in raw["train"]], [e["label"] for e in raw["train"]],
            [e["text"] for e in raw[split]], [e["label"] for e in raw[split]], seed=config.seed,
            num_classes=len(run.task.class_names), c_grid=c_grid)
        c_grid = (scores["C"],)  # Chosen on the training split alone: no second search.
        final.update({f"baseline_tfidf_{split}_{name}": float(v) for name, v in scores.items()})
  # Metrics, not counters (`metrics.COUNTERS`), nor a z-loss term that is 0 (no `loss.z_loss`) or
  # an nll equal to the loss (no label smoothing or z-loss).
  everything = {**record, **final}
  loss_of = lambda key: everything.get(key[:-len("nll")] + "loss", math.nan)
  redundant = lambda key, value: (key.endswith("z_loss") and value == 0 or key.endswith("_nll")
                                  and math.isclose(loss_of(key), value, rel_tol=1e-5))
  metrics = {key: value for key, value in everything.items()
             if (key == "step" or key.startswith(("eval_", "test_", "baseline_", "loss")))
             and report.is_metric(key) and not redundant(key, value)}
  console.say("writing the report")
  report.write_report(workdir, title=f"{config.data.name} ({run.kind})", metrics=metrics,
                      tables=tables, images=images,
                      notes=notes)
  return {key: value for key, value in final.items()}
