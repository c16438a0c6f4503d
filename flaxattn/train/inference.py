"""Using a trained run: a checkpoint (`config.checkpoint`: the newest, the best, a step) evaluated,
decoded from, or looked inside.

The run is rebuilt from its config (`build_run`: the same tokenizer, cached in the workdir, and the
same model), and only the parameters are read from the checkpoint (`load_params`), placed with the
run's shardings. These back `flaxattn.main --mode=eval|decode|attend|summary`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import unicodedata
from typing import Callable

import jax
import numpy as np
from absl import logging
from flax import nnx

from flaxattn import parallel
from flaxattn.train import console
from flaxattn.models.decoding import generate
from flaxattn.train.checkpoint import checkpoint_step, load_params
from flaxattn.train.run import Run, attention_images, build_run


class BadRequest(ValueError):
  """What was asked of the run cannot be done (no such checkpoint or split, a mode the data set
  has no use for); raised before the checkpoint is read. The command line prints it as one line."""


class UnknownSplit(BadRequest):
  """A split the run's data set does not have."""


def restore(config, workdir: str, check: Callable[[Run], None] | None = None
            ) -> tuple[Run, object, object, object]:
  """`(run, graphdef, params, eval_step)` of checkpoint `config.checkpoint` in `workdir`;
  `check(run)` runs after the run is built, before the checkpoint is read."""
  try:  # A missing checkpoint fails first, before anything is built.
    step = checkpoint_step(config, workdir)
  except ValueError as error:
    raise BadRequest(str(error)) from None
  logging.info("checkpoint %s: step %d", config.checkpoint, step)
  run = build_run(config, workdir)
  if check is not None:
    check(run)
  console.say(f"reading checkpoint {config.checkpoint} (step {step})")
  abstract = nnx.eval_shape(lambda: run.make_model(nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract, nnx.Param)
  shardings = parallel.param_shardings(abstract_params, run.mesh, run.rules)
  # Orbax gives list indices back as strings ('0'); compare and place by path.
  saved = _by_path(load_params(workdir, step))
  expected = _by_path(nnx.to_pure_dict(abstract_params))
  if {path: np.shape(v) for path, v in saved.items()} != {
      path: np.shape(v) for path, v in expected.items()}:
    missing, unused = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    raise ValueError(f"the checkpoint in {workdir} does not fit the model of its config.json: "
                     f"missing {missing[:5]}, unused {unused[:5]}, or shapes differ")
  target_shardings = _by_path(nnx.to_pure_dict(shardings))
  place = lambda name: jax.device_put(saved[name], target_shardings[name])
  placed = jax.tree_util.tree_map_with_path(lambda path, _: place(parallel.path_name(path)),
                                            nnx.to_pure_dict(abstract_params))
  nnx.replace_by_pure_dict(abstract_params, placed)
  params = nnx.as_pure(abstract_params)
  jitted = jax.jit(run.eval_step(graphdef))

  def eval_step(params, batch):
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
      return jitted(params, batch)
  return run, graphdef, params, eval_step


def _by_path(tree) -> dict:
  """`{'a/0/b': leaf}` of a nested dict, whatever the type of its keys."""
  return {parallel.path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def evaluate_checkpoint(config, workdir: str, splits: list[str] | None = None) -> dict[str, dict]:
  """Metrics of the newest checkpoint per split (default: validation and test), each also written
  to `WORKDIR/eval_<split>.json`."""
  def check_splits(run: Run) -> None:
    unknown = [split for split in splits or () if split not in run.task.splits]
    if unknown:
      raise UnknownSplit(f"--split={unknown[0]}: {run.config.data.name} has no such split; its "
                         f"splits are {', '.join(run.task.splits)}")

  run, graphdef, params, eval_step = restore(config, workdir, check_splits)
  evaluator = run.evaluator(graphdef, eval_step)
  if splits is None:
    splits = [s for s in (run.task.validation_split, "test") if s in run.task.splits]
  results = {}
  for split in splits:
    results[split] = evaluator.evaluate(params, split, decode=True,
                                        max_decode_examples=config.eval.decode_examples).metrics
    if jax.process_index() == 0:
      with open(os.path.join(workdir, f"eval_{split}.json"), "w") as f:
        json.dump(results[split], f, indent=2, sort_keys=True)
  return results


def _needs_tokenizer(mode: str) -> Callable[[Run], None]:
  """A `restore` check: `mode` reads text, which a data set without a tokenizer has none of."""
  def check(run: Run) -> None:
    if run.task.tokenizer is None:
      raise BadRequest(f"{mode} needs a data set with a tokenizer; {run.config.data.name} has none")
  return check


def decode_lines(config, workdir: str, lines: list[str], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
  """One output line per input line: a translation, a continuation, or `label<TAB>probabilities`."""
  run, graphdef, params, eval_step = restore(config, workdir, _needs_tokenizer("decode"))
  return _predict(run, graphdef, params, eval_step, lines, max_new_tokens=max_new_tokens,
                  temperature=temperature, seed=seed)


def _predict(run: Run, graphdef, params, eval_step, lines: list[str], *, max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, method: str = "beam") -> list[str]:
  """`decode_lines` of a restored run (seq2seq by `method`: 'beam' or 'greedy')."""
  task, model = run.task, nnx.merge(graphdef, params)
  if run.kind == "seq2seq":
    return run.evaluator(graphdef, eval_step).translate(params, lines, method=method)[0]
  outputs = []
  # Every process runs every line (replicated inputs: any number of processes) and reads the
  # gathered outputs.
  replicated = lambda value: parallel.replicated(value, run.mesh)
  rows = _fewest_rows(run)  # Copies of the line: the model splits its batch over the mesh.
  for line in console.progress(lines, desc=f"decoding {len(lines)} inputs", unit="input"):
    ids = np.repeat(np.asarray([task.encode(line)], np.int32), rows, axis=0)
    with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
      if run.kind == "classification":
        probabilities = parallel.to_host(
            jax.nn.softmax(model(replicated(ids), replicated(np.ones_like(ids)))[0]), run.mesh)
        best = int(np.argmax(probabilities))
        outputs.append(task.class_names[best] + "\t" + " ".join(
            f"{name}={p:.3f}" for name, p in zip(task.class_names, probabilities)))
        continue
      prompt = ids[:, :-1] if task.tokenizer.eos_id is not None else ids  # No eos: continue it.
      tokens = generate(model, replicated(prompt), max_new_tokens=max_new_tokens,
                        method="sample" if temperature > 0 else "greedy",
                        temperature=temperature or 1.0, eos_id=task.tokenizer.eos_id,
                        pad_id=task.tokenizer.pad_id, rng=jax.random.key(seed))
    new = [int(t) for t in parallel.to_host(tokens, run.mesh)[0, prompt.shape[1]:]]
    if task.tokenizer.eos_id in new:
      new = new[:new.index(task.tokenizer.eos_id)]
    outputs.append(line + " " + task.tokenizer.decode(new))
  return outputs


def _fewest_rows(run: Run) -> int:
  """The fewest rows a batch may have: the product of the mesh axes that split its rows."""
  spec = next(iter(run.batch_shardings.values())).spec
  axes = spec[0] if len(spec) else None
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return math.prod(run.mesh.shape[axis] for axis in axes)


def file_stem(text: str, max_chars: int = 40) -> str:
  """A file name for `text`: its lower-case words joined by '-' (ASCII letters and digits, at most
  `max_chars`), with a short hash of the whole text when words were cut or none is left."""
  ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
  words = re.findall(r"[a-z0-9]+", ascii_text.lower())
  stem = ""
  for word in words:
    if len(stem) + len(word) + (1 if stem else 0) > max_chars:
      break
    stem = f"{stem}-{word}" if stem else word
  if stem != "-".join(words) or not stem:
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]
    stem = f"{stem}-{digest}" if stem else f"text-{digest}"
  return stem


@dataclasses.dataclass
class Attended:
  """What `attend` found for one text: the model's prediction and the maps' paths."""

  text: str
  prediction: str
  paths: list[str]

  def describe(self) -> str:
    """Lines for the console: the text, the prediction, then the paths."""
    return "\n".join([f"text:       {self.text}", f"prediction: {self.prediction}",
                      *self.paths])


def _describe_prediction(kind: str, output: str, text: str) -> str:
  """A `_predict` output as one line: `label (p=0.81; a=0.81 b=0.19)`, the generated target, or
  the continuation after the text."""
  if kind == "classification":
    label, probabilities = output.split("\t")
    chosen = dict(part.split("=") for part in probabilities.split())[label]
    return f"{label} (p={chosen}; {probabilities})"
  if kind == "seq2seq":
    return f"{output} (greedy translation)"
  return f"... {output[len(text):].strip()} (greedy next tokens)"


def attend(config, workdir: str, texts: list[str], *, out: str | None = None,
           max_new_tokens: int = 32) -> list[Attended]:
  """The prediction and attention maps of each of `texts` (none empty). The maps of a text are
  `WORKDIR/attention/cli/<file_stem(text)>_*.png`, or `<out>_*.png` (several texts:
  `<out>-1_*.png`, `<out>-2_*.png`, ...). Processes other than 0 get no paths."""
  empty = [text for text in texts if not text.strip()]
  if not texts or empty:
    raise ValueError(f"attend needs non-empty texts, got {texts!r}")
  run, graphdef, params, eval_step = restore(config, workdir, _needs_tokenizer("attend"))
  if out is None:
    directory, names = os.path.join(workdir, "attention", "cli"), [file_stem(t) for t in texts]
  else:
    directory, stem = os.path.dirname(out) or ".", os.path.basename(out)
    names = [stem] if len(texts) == 1 else [f"{stem}-{i}" for i in range(1, len(texts) + 1)]
  predictions = _predict(run, graphdef, params, eval_step, texts, max_new_tokens=max_new_tokens,
                         method="greedy")
  console.say(f"drawing the attention maps of {len(texts)} text(s) in {directory}")
  images = attention_images(run, graphdef, params, directory, examples=len(texts), texts=texts,
                            names=names)
  return [Attended(text, _describe_prediction(run.kind, output, text),
                   [path for tag, path in images.items() if tag.startswith(f"attention/{name}/")])
          for text, output, name in zip(texts, predictions, names)]


def model_summary(config, workdir: str | None = None):
  """The `flaxattn.nn.ModelSummary` of `config`'s model (`Run.summary`: built abstractly, nothing
  initialised). The task is built to learn the vocabulary: in `workdir` (a learned tokenizer is
  cached there) or, without one, in a temporary directory that is removed afterwards."""
  if workdir is not None:
    return build_run(config, workdir).summary()
  import tempfile  # Only here.
  with tempfile.TemporaryDirectory(prefix="flaxattn-summary-") as scratch:
    return build_run(config, scratch).summary()


__all__ = ["Attended", "BadRequest", "UnknownSplit", "attend", "decode_lines", "evaluate_checkpoint",
           "file_stem", "model_summary", "restore"]
