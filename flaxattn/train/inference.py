"""Using a trained run: a checkpoint (`config.checkpoint`: the newest, the best, a step) evaluated,
decoded from, or looked inside.

The run is rebuilt from its config (`build_run`: the same tokenizer, cached in the workdir, and the
same model), and only the parameters are read from the checkpoint (`load_params`), placed with the
run's shardings. These back `flaxattn.main --mode=eval|decode|attend|summary`.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import logging
from flax import nnx

from flaxattn import parallel
from flaxattn.models.decoding import generate
from flaxattn.train.checkpoint import checkpoint_step, load_params
from flaxattn.train.run import Run, attention_images, build_run


def restore(config, workdir: str) -> tuple[Run, object, object, object]:
  """`(run, graphdef, params, eval_step)` of checkpoint `config.checkpoint` in `workdir`."""
  step = checkpoint_step(config, workdir)  # A missing one fails first, before anything is built.
  logging.info("checkpoint %s: step %d", config.checkpoint, step)
  run = build_run(config, workdir)
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
  run, graphdef, params, eval_step = restore(config, workdir)
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


def decode_lines(config, workdir: str, lines: list[str], *, max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: int = 0) -> list[str]:
  """One output line per input line: a translation, a continuation, or `label<TAB>probabilities`."""
  run, graphdef, params, eval_step = restore(config, workdir)
  if run.task.tokenizer is None:
    raise ValueError("decode needs a data set with a tokenizer; the Markov corpus has none")
  task, model = run.task, nnx.merge(graphdef, params)
  if run.kind == "seq2seq":
    return run.evaluator(graphdef, eval_step).translate(params, lines)[0]
  outputs = []
  # Every process runs every line (replicated inputs: any number of processes) and reads the
  # gathered outputs.
  replicated = lambda value: parallel.replicated(value, run.mesh)
  for line in lines:
    ids = np.asarray([task.encode(line)], np.int32)
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


def attend(config, workdir: str, texts: list[str]) -> list[str]:
  """Attention maps of `texts` in `WORKDIR/attention/cli/`; returns the PNG paths."""
  run, graphdef, params, _ = restore(config, workdir)
  if run.task.tokenizer is None:
    raise ValueError("attend needs a data set with a tokenizer; the Markov corpus has none")
  directory = os.path.join(workdir, "attention", "cli")
  return list(attention_images(run, graphdef, params, directory, examples=len(texts),
                               texts=texts).values())


__all__ = ["attend", "decode_lines", "evaluate_checkpoint", "restore"]


def model_summary(config, workdir: str | None = None):
  """The `flaxattn.nn.ModelSummary` of `config`'s model (`Run.summary`: built abstractly, nothing
  initialised). The task is built to learn the vocabulary: in `workdir` (a learned tokenizer is
  cached there) or, without one, in a temporary directory that is removed afterwards."""
  if workdir is not None:
    return build_run(config, workdir).summary()
  import tempfile  # Only here.
  with tempfile.TemporaryDirectory(prefix="flaxattn-summary-") as scratch:
    return build_run(config, scratch).summary()
