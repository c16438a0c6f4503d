"""Block-size sweep for the blockwise attention kernel, with its peers timed in the same run.

  python benchmarks/tune_blockwise.py --lengths 4096 8192 --blocks 512x1024 1024x1024 [--causal]

For each length: forward+backward (gradient of `sum(out * cotangent)` with respect to query, key and
value) of `flaxattn.attention.blockwise` at each `block_qxblock_kv`, of `jax.nn.dot_product_attention`
(XLA, dense scores) and of `torch.nn.functional.scaled_dot_product_attention` (CPU, `--threads` threads).
Batch 1, `--heads` heads, head_dim `--head-dim`, float32. Prints medians of `--repeats` timed runs
(interleaved across implementations, after one warm-up) of wall and process CPU time, their ratios to
torch, and GFLOP/s from wall time counting the matmuls only: forward `4 T S H D`, backward 2.5 times
that (FlashAttention convention), halved for causal.

Timings on a shared machine are noisy: compare rows of one run, never numbers from different runs.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import blockwise
from flaxattn.attention.mask import Mask


def _median_seconds(runs: dict, repeats: int) -> dict:
  """Median (wall, process CPU) seconds per run, runs interleaved so that load hits all alike.

  CPU time (all threads of this process) is the steadier measure on a shared machine: it barely moves
  when other processes take cores away, while wall time does.
  """
  for run in runs.values():
    run()  # Warm-up (and compilation).
  times = {name: ([], []) for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      times[name][0].append(time.perf_counter() - wall)
      times[name][1].append(time.process_time() - cpu)
  return {name: tuple(statistics.median(x) for x in pair) for name, pair in times.items()}


def _jax_runner(attend, inputs):
  """A no-argument callable running the jitted forward+backward of `attend` and waiting for it."""
  query, key, value, cotangent = inputs
  grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent), argnums=(0, 1, 2)))
  return lambda: jax.block_until_ready(grad(query, key, value))


def _torch_runner(inputs, causal: bool, threads: int):
  import torch  # Optional: only this peer needs it.

  torch.set_num_threads(threads)
  # torch SDPA takes [batch, heads, length, head_dim].
  query, key, value, cotangent = (
      torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy()) for x in inputs)
  for x in (query, key, value):
    x.requires_grad_(True)

  def run():
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=causal)
    torch.autograd.grad((out * cotangent).sum(), (query, key, value))

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
  parser.add_argument("--blocks", nargs="+", default=["256x512", "512x512", "512x1024", "1024x1024"],
                      help="block_q x block_kv pairs, e.g. 512x1024")
  parser.add_argument("--causal", action="store_true")
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--jax-nn-max-length", type=int, default=8192,
                      help="skip jax.nn above this length (it needs O(T^2) memory: 11.5 GiB at 8k)")
  parser.add_argument("--no-torch", action="store_true")
  args = parser.parse_args()
  blocks = [tuple(int(x) for x in pair.split("x")) for pair in args.blocks]

  print(f"{'length':>7} {'implementation':>22} {'wall ms':>9} {'x torch':>8} {'cpu ms':>9} "
        f"{'x torch':>8} {'GFLOP/s':>8}")
  for length in args.lengths:
    rng = np.random.default_rng(0)
    shape = (1, length, args.heads, args.head_dim)
    inputs = tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4))
    flops = 3.5 * 4 * length * length * args.heads * args.head_dim * (0.5 if args.causal else 1.0)
    runs = {}
    if not args.no_torch:
      runs["torch sdpa"] = _torch_runner(inputs, args.causal, args.threads)
    if length <= args.jax_nn_max_length:
      runs["jax.nn (xla)"] = _jax_runner(functools.partial(
          jax.nn.dot_product_attention, is_causal=args.causal, implementation="xla"), inputs)
    mask = Mask(causal=True) if args.causal else None
    for block_q, block_kv in blocks:
      attend = functools.partial(
          blockwise.attention, mask=mask, bias=None, scale=args.head_dim ** -0.5, softcap=None,
          dropout_rate=0.0, dropout_rng=None, return_weights=False, block_q=block_q,
          block_kv=block_kv)
      runs[f"blockwise {block_q}x{block_kv}"] = _jax_runner(attend, inputs)
    seconds = _median_seconds(runs, args.repeats)
    for name, (wall, cpu) in seconds.items():
      ratios = [f"{'-':>8}", f"{'-':>8}"]
      if "torch sdpa" in seconds:
        ratios = [f"{x / peer:8.2f}" for x, peer in zip((wall, cpu), seconds["torch sdpa"])]
      print(f"{length:7d} {name:>22} {wall * 1e3:9.1f} {ratios[0]} {cpu * 1e3:9.1f} {ratios[1]} "
            f"{flops / wall / 1e9:8.1f}", flush=True)

if __name__ == "__main__":
  main()
