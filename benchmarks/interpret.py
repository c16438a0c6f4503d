"""Speed of `flaxattn.interpret` on all-MiniLM-L6-v2: caching activations, and head-ablation sweeps.

  python benchmarks/interpret.py [--sentences 64] [--repeats 5] [--sweep-repeats 3]
      [--recompiled-heads 6] [--out benchmarks/results/interpret]

1. Cache overhead: a jitted `run_with_cache` of every hook name (attention patterns included), and of
   every name but the patterns, against the jitted plain forward, on `--sentences` sentences (one
   padded batch), unrolled and scanned layers. Medians of `--repeats` interleaved calls after a
   warm-up call (compilation excluded); the outputs are waited for (`block_until_ready`).
2. Ablation sweep: the zero ablation of each of the 72 heads (6 layers x 12), its effect measured as
   the mean cosine similarity of the ablated and clean sentence embeddings (mean pooling over real
   tokens). As one compiled program, three ways: `flaxattn.interpret.sweep` vmapping all 72 at
   once; `sweep(batch_size=1)`, one head at a time in a loop inside the program (`jax.lax.map`);
   `sweep_by_layer(batch_size=1)`, which also shares the clean run below each layer. Against a
   Python loop of 72 calls of one jitted function taking (layer, head) as arguments (compiled
   once), and a loop that jits each (layer, head) as constants, as closures over them do (a
   compilation per head: timed on `--recompiled-heads` heads and scaled to 72). Medians of
   `--sweep-repeats` after a warm-up; every method's numbers are compared with the loop's.

Writes `results.json` and `results.md` to `--out`. The machine may be shared: compare the rows of
one run (the ratios), not numbers from different runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.interpret import (ablate_head, head_grid, hook_names, run_with_cache,
                                run_with_interventions, sweep, sweep_by_layer)
from flaxattn.models import load_pretrained

LOOP = "loop of 72 calls of one jitted function"
CLOSURES = "loop of 72 jitted closures (a compile per head)"
SUBJECTS = ["The old fisherman", "A curious child", "My neighbour's cat", "The committee",
            "An engineer from Lyon", "The orchestra", "Our new manager", "A tired student"]
VERBS = ["quietly repaired", "argued about", "painted", "carefully studied", "forgot",
         "celebrated", "photographed", "wrote a long letter about"]
OBJECTS = ["the broken bicycle.", "the results of the election in the northern provinces.",
           "a boat.", "the strange noise coming from the basement every night.",
           "the recipe.", "the bridge over the river near the station.", "it.",
           "the history of the small village where she grew up."]


def sentences(count: int) -> list[str]:
  """`count` different sentences of varied lengths."""
  return [f"{SUBJECTS[i % 8]} {VERBS[(i // 8) % 8]} {OBJECTS[(3 * i + i // 8) % 8]}"
          for i in range(count)]


def timed(fn, *args) -> float:
  """Seconds of one call of `fn(*args)`, its outputs waited for."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def interleaved_medians(calls: dict, repeats: int) -> dict:
  """{name: median seconds} of `repeats` rounds, each calling every `calls[name]()` once."""
  for call in calls.values():
    jax.block_until_ready(call())  # warm-up: compiles
  seconds = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      seconds[name].append(timed(call))
  return {name: statistics.median(values) for name, values in seconds.items()}


def cache_overhead(ids, mask, repeats: int) -> list[dict]:
  rows = []
  for scan in (False, True):
    model, _ = load_pretrained("all-MiniLM-L6-v2", scan_layers=scan)
    graphdef, state = nnx.split(model)
    names = hook_names(model)
    no_patterns = [name for name in names if not name.endswith(".pattern")]
    plain = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, attention_mask=mask))
    cached = {key: jax.jit(lambda state, ids, mask, chosen=chosen: run_with_cache(
        nnx.merge(graphdef, state), ids, attention_mask=mask, names=chosen))
              for key, chosen in (("every name", names), ("every name but patterns", no_patterns))}
    calls = {"plain forward": lambda: plain(state, ids, mask)}
    calls.update({key: (lambda fn=fn: fn(state, ids, mask)) for key, fn in cached.items()})
    medians = interleaved_medians(calls, repeats)
    sizes = {key: sum(v.size for v in fn(state, ids, mask)[1].values()) * 4 / 2**20
             for key, fn in cached.items()}
    for key, seconds in medians.items():
      rows.append(dict(layers="scanned" if scan else "unrolled", call=key,
                       names=len(names) if key == "every name" else (
                           len(no_patterns) if key in sizes else 0),
                       cached_mib=round(sizes.get(key, 0.0), 1), ms=round(1e3 * seconds, 2),
                       vs_plain=round(seconds / medians["plain forward"], 3)))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def ablation_sweep(ids, mask, repeats: int, recompiled_heads: int) -> dict:
  model, _ = load_pretrained("all-MiniLM-L6-v2")
  config = model.config
  graphdef, state = nnx.split(model)
  valid = jnp.asarray(mask, jnp.float32)[..., None]

  def embeddings(hidden):
    pooled = (hidden * valid).sum(1) / valid.sum(1)
    return pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)

  clean = embeddings(jax.jit(lambda state: nnx.merge(graphdef, state)(ids, attention_mask=mask))(
      state))
  similarity = lambda hidden: jnp.mean(jnp.sum(embeddings(hidden) * clean, axis=-1))
  layers, heads = head_grid(config.num_layers, config.num_heads)

  programs = {
      "one program: vmap of all 72": jax.jit(lambda state: sweep(
          nnx.merge(graphdef, state), ids, attention_mask=mask, make=ablate_head,
          grid=(layers, heads), metric=similarity)),
      "one program: 1 head at a time (lax.map)": jax.jit(lambda state: sweep(
          nnx.merge(graphdef, state), ids, attention_mask=mask, make=ablate_head,
          grid=(layers, heads), metric=similarity, batch_size=1)),
      "one program: per layer, clean prefix shared, 1 head at a time": jax.jit(
          lambda state: sweep_by_layer(
              nnx.merge(graphdef, state), ids, attention_mask=mask, make=ablate_head,
              grid=(jnp.arange(config.num_heads),), metric=similarity, batch_size=1).reshape(-1)),
  }
  one_head = jax.jit(lambda state, layer, head: similarity(run_with_interventions(
      nnx.merge(graphdef, state), ids, attention_mask=mask,
      interventions=[ablate_head(layer, head)])))

  def loop():
    return jnp.stack([one_head(state, layer, head) for layer, head in zip(layers, heads)])

  def recompiled(count):
    values = []
    for layer, head in list(zip(np.asarray(layers), np.asarray(heads)))[:count]:
      fn = jax.jit(lambda state, layer=int(layer), head=int(head): similarity(run_with_interventions(
          nnx.merge(graphdef, state), ids, attention_mask=mask,
          interventions=[ablate_head(layer, head)])))
      values.append(fn(state))
    return jnp.stack(values)

  first_calls, values = {}, {}
  for name, program in programs.items():
    start = time.perf_counter()
    values[name] = np.asarray(jax.block_until_ready(program(state)))
    first_calls[name] = round(time.perf_counter() - start, 2)
  looped = np.asarray(jax.block_until_ready(loop()))
  calls = {name: (lambda program=program: program(state)) for name, program in programs.items()}
  calls[LOOP] = loop
  medians = interleaved_medians(calls, repeats)
  medians[CLOSURES] = timed(recompiled, recompiled_heads) * len(layers) / recompiled_heads
  rows = [dict(method=name, seconds=round(seconds, 3),
               loop_over_this=round(medians[LOOP] / seconds, 2),
               closures_over_this=round(medians[CLOSURES] / seconds, 2),
               first_call_seconds=first_calls.get(name),
               max_abs_difference_from_loop=(float(np.max(np.abs(values[name] - looped)))
                                             if name in values else None))
          for name, seconds in medians.items()]
  for row in rows:
    print(json.dumps(row), flush=True)
  effects = 1.0 - looped.reshape(config.num_layers, config.num_heads)
  return dict(rows=rows, heads=int(len(layers)), sentences=int(ids.shape[0]),
              tokens=int(ids.shape[1]), recompiled_heads_timed=recompiled_heads,
              most_important_heads=[
                  dict(layer=int(l), head=int(h), one_minus_cosine=round(float(effects[l, h]), 5))
                  for l, h in zip(*np.unravel_index(np.argsort(-effects, axis=None)[:5],
                                                    effects.shape))])


def markdown(result: dict) -> str:
  sweep_result = result["sweep"]
  lines = [
      "# flaxattn.interpret speed: all-MiniLM-L6-v2, float32, CPU",
      "",
      f"{sweep_result['sentences']} sentences in one batch padded to {sweep_result['tokens']} tokens; "
      f"{result['threads']} cores; load average before/after {result['load_before']} / "
      f"{result['load_after']} (a shared machine: the ratios of one run are what to read).",
      "",
      f"## run_with_cache vs the plain forward (median of {result['repeats']}, goal <= 1.3x)",
      "",
      "| layers | call | names | cached MiB | ms | vs plain |",
      "|---|---|---|---|---|---|",
  ]
  for row in result["cache"]:
    lines.append(f"| {row['layers']} | {row['call']} | {row['names']} | {row['cached_mib']} | "
                 f"{row['ms']} | {row['vs_plain']:.2f}x |")
  lines += [
      "",
      f"## Zero-ablation sweep of all {sweep_result['heads']} heads (median of "
      f"{result['sweep_repeats']}; goal: one program >= 5x faster than a loop)",
      "",
      "| method | seconds | speed-up: loop of one jitted fn / this | closures' loop / this | "
      "first call (s) | max diff from the loop |",
      "|---|---|---|---|---|---|",
  ]
  for row in sweep_result["rows"]:
    first = "" if row["first_call_seconds"] is None else row["first_call_seconds"]
    diff = row["max_abs_difference_from_loop"]
    lines.append(f"| {row['method']} | {row['seconds']} | {row['loop_over_this']:.2f}x | "
                 f"{row['closures_over_this']:.2f}x | {first} | "
                 f"{'' if diff is None else f'{diff:.1e}'} |")
  lines += [
      "",
      f"First call = compilation included. The closures' loop was timed on "
      f"{sweep_result['recompiled_heads_timed']} heads (each compiled and run) and scaled to "
      f"{sweep_result['heads']}.",
      "",
      "Heads whose ablation moves the sentence embeddings most (1 - mean cosine to the clean "
      "embedding): " + ", ".join(f"L{h['layer']}H{h['head']} {h['one_minus_cosine']}"
                                 for h in sweep_result["most_important_heads"]) + ".",
  ]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sentences", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--sweep-repeats", type=int, default=3)
  parser.add_argument("--recompiled-heads", type=int, default=6)
  parser.add_argument("--out", default="benchmarks/results/interpret")
  args = parser.parse_args()
  _, tokenizer = load_pretrained("all-MiniLM-L6-v2")
  ids, mask = tokenizer.encode_batch(sentences(args.sentences))
  ids, mask = jnp.asarray(ids), jnp.asarray(mask, bool)
  load_before = os.getloadavg()[0]
  result = dict(threads=len(os.sched_getaffinity(0)), repeats=args.repeats,
                sweep_repeats=args.sweep_repeats,
                versions=dict(python=platform.python_version(), jax=jax.__version__),
                cache=cache_overhead(ids, mask, args.repeats),
                sweep=ablation_sweep(ids, mask, args.sweep_repeats, args.recompiled_heads))
  result.update(load_before=round(load_before, 1), load_after=round(os.getloadavg()[0], 1))
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "results.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
