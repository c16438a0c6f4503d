"""Evaluation of a `Task` on a whole split: the loss and the task's own metrics.

- lm: per-token loss, accuracy and perplexity (`exp` of the mean negative log-likelihood over every
  target token of the split, each counted once).
- classification: loss, accuracy and macro-F1 over every example of the split.
- seq2seq: teacher-forced loss and perplexity; with `decode=True` also beam-search outputs scored
  with BLEU and chrF (sacrebleu) and ROUGE-1/2/L (rouge-score) against the references.

Eval batches have fixed shapes (the last one padded with weight-0 rows), so each split compiles the
eval step once and no example is dropped or counted twice. Classification's predictions come out of
the eval step beside the loss sums: one forward pass a batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from flaxattn import parallel
from flaxattn.models.decoding import generate
from flaxattn.train import console
from flaxattn.train import metrics as task_metrics
from flaxattn.train.step import metrics_from_sums


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """What evaluating one split gives back.

  Attributes:
    metrics: name (without prefix: 'loss', 'accuracy', ...) -> value.
    outputs: seq2seq with `decode`: `(source, reference, output)` texts of the decoded examples,
      in split order; otherwise empty.
  """

  metrics: dict[str, float]
  outputs: tuple[tuple[str, str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Evaluates parameters of `graphdef` on the splits of `task`; holds no results (every method
  returns what it computes).

  Attributes:
    kind: 'lm', 'seq2seq' or 'classification'.
    dataset: `split -> iterable of this process's eval batches` (fixed shapes, padded with weight-0
      rows, each example once).
    task: the run's `flaxattn.data.tasks.Task` (class names, tokenizer and raw examples).
    graphdef: the model's graph (`nnx.split(model, nnx.Param)[0]`).
    eval_step: the jitted `eval_step(params, batch) -> (sums, outputs)` of
      `flaxattn.train.step.jit_steps`, made with `predictions=True` for classification.
    batch_shardings: name -> `NamedSharding` of the global batch.
    mesh, rules: the run's mesh and logical rules (for decoding).
    batch_size: global eval batch (rows), split over processes.
    beam_size, length_penalty, max_decode_len: beam search for seq2seq `decode` (None: the task's
      target length).
  """

  kind: str
  dataset: Callable
  task: Any
  graphdef: Any
  eval_step: Callable
  batch_shardings: dict
  mesh: jax.sharding.Mesh
  rules: Any
  batch_size: int
  beam_size: int = 4
  length_penalty: float = 0.6
  max_decode_len: int | None = None

  def batches(self, split: str, max_batches: int = 0):
    """This process's share of the eval batches of `split`, as global arrays (all of them when
    `max_batches` is 0)."""
    for index, batch in enumerate(self.dataset(split)):
      if max_batches and index >= max_batches:
        return
      yield parallel.global_batch(batch, self.batch_shardings)

  def _batch_count(self, split: str, max_batches: int = 0) -> int | None:
    """Batches in an evaluation of `split` (None where the split's size is unknown)."""
    size = self.task.size(split) if hasattr(self.task, "size") else None  # (Duck-typed tasks.)
    count = math.ceil(size / self.batch_size) if size is not None else None
    return min(count or max_batches, max_batches) if max_batches else count

  def evaluate(self, params, split: str, *, max_batches: int = 0, decode: bool = False,
               max_decode_examples: int = 0) -> Evaluation:
    """Metrics of `params` on `split`, from one forward pass per batch.

    `max_batches` > 0 evaluates the first batches only (metrics then cover `examples` of them);
    `decode` adds generation metrics and outputs (seq2seq) over the first `max_decode_examples`
    examples (0: all).
    """
    start = time.perf_counter()
    sums, outputs = [], []
    bar = console.progress(self.batches(split, max_batches), desc=f"evaluating {split}",
                           total=self._batch_count(split, max_batches))
    for batch in bar:
      # One eval program in flight at a time: with many queued on simulated CPU devices under
      # load, XLA's all-reduce rendezvous was seen to time out (7 of 8 device threads arrived) and
      # abort the process. Waiting costs little here: a batch's compute dwarfs its dispatch.
      batch_sums, batch_outputs = jax.block_until_ready(self.eval_step(params, batch))
      sums.append(batch_sums)
      if batch_outputs:  # Replicated: every process reads the whole global batch.
        outputs.append(parallel.to_host(batch_outputs, self.mesh))
    totals = jax.device_get(jax.tree.map(lambda *xs: sum(xs), *sums))
    result = {name: float(value) for name, value in metrics_from_sums(totals).items()}
    if self.kind in ("lm", "seq2seq"):
      result["perplexity"] = task_metrics.perplexity(float(totals["nll"]), float(totals["weight"]))
    if self.kind == "classification":
      column = lambda name: np.concatenate([batch[name] for batch in outputs])
      keep = column("weights") > 0
      predicted, actual = column("predictions")[keep], column("labels")[keep]
      result.update(examples=float(keep.sum()),
                    accuracy=task_metrics.accuracy(predicted, actual),
                    macro_f1=task_metrics.macro_f1(predicted, actual,
                                                   len(self.task.class_names)))
    bar.close()
    decoded = ()
    if decode and self.kind == "seq2seq":
      generation = self.generation(params, split, max_decode_examples)
      result.update(generation.metrics)
      decoded = generation.outputs
    examples = f"{int(result['examples']):,} examples" if "examples" in result else (
        f"{len(sums)} batches")
    console.say(f"evaluated {split}: {examples} in {time.perf_counter() - start:.1f} s")
    return Evaluation(result, decoded)

  def translate(self, params, sources: list[str], *, method: str = "beam"
                ) -> tuple[list[str], int]:
    """`(outputs, truncated)`: beam-search (or greedy) outputs for source texts, decoded to text,
    and how many sources were longer than `data.source_len` and cut to it (the model was trained
    on no longer ones; logged)."""
    tokenizer, model = self.task.tokenizer, nnx.merge(self.graphdef, params)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    limit = self.task.lengths["source"] - len(eos)
    max_new_tokens = self.max_decode_len or self.task.lengths.get("target", 0)
    outputs, truncated = [], 0
    what = f"beam search ({self.beam_size} beams)" if method == "beam" else "greedy decoding"
    for begin in console.progress(range(0, len(sources), self.batch_size),
                                  desc=f"{what}, {len(sources)} inputs"):
      chunk = sources[begin:begin + self.batch_size]
      encoded = [tokenizer.encode(text) for text in chunk]
      truncated += sum(len(ids) > limit for ids in encoded)
      ids = [sequence[:limit] + eos for sequence in encoded]
      # A fixed-shape batch (padded rows and columns) so every chunk reuses one compilation.
      batch = np.full((self.batch_size, self.task.lengths["source"]), tokenizer.pad_id, np.int32)
      mask = np.zeros_like(batch)
      for row, sequence in enumerate(ids):
        batch[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
      mask[len(ids):, 0] = 1  # Filler rows need one real token; their outputs are discarded.
      # Every process decodes every chunk (the same programs in the same order, as multi-process
      # jax needs), from the same replicated inputs; the model's constraints shard the work.
      batch, mask = (parallel.replicated(x, self.mesh) for x in (batch, mask))
      with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
        tokens = generate(model, batch, attention_mask=mask, max_new_tokens=max_new_tokens,
                          method=method, num_beams=self.beam_size if method == "beam" else None,
                          length_penalty=self.length_penalty, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, decoder_start_id=self.task.options["bos_id"])
      tokens = parallel.to_host(tokens, self.mesh)
      if method == "beam":
        tokens = tokens[:, 0]
      outputs.extend(tokenizer.decode(_until_eos(row[1:], tokenizer.eos_id))
                     for row in tokens[:len(chunk)])
    if truncated:
      logging.warning("%d of %d sources were longer than %d tokens and cut to it",
                      truncated, len(sources), limit)
    return outputs, truncated

  def generation(self, params, split: str, max_examples: int = 0) -> Evaluation:
    """BLEU, chrF and ROUGE of beam-search outputs on `split` (first `max_examples`, 0: all), and
    those outputs."""
    raw = self.task.raw[split]
    count = len(raw) if not max_examples else min(max_examples, len(raw))
    sources = [raw[i]["source"] for i in range(count)]
    references = [raw[i]["target"] for i in range(count)]
    hypotheses, truncated = self.translate(params, sources)
    result = {"bleu": task_metrics.bleu(hypotheses, references),
              "chrf": task_metrics.chrf(hypotheses, references),
              "decoded_examples": float(count),
              "truncated_sources": float(truncated)}
    result.update(task_metrics.rouge(hypotheses, references))
    return Evaluation(result, tuple(zip(sources, references, hypotheses)))


def _until_eos(ids, eos_id):
  ids = [int(i) for i in ids]
  return ids[:ids.index(eos_id)] if eos_id is not None and eos_id in ids else ids


def prefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
  """`{'loss': x}` -> `{'<prefix>_loss': x}`."""
  return {f"{prefix}_{name}": value for name, value in metrics.items()}
