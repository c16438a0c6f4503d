"""Exact attention kernels on a GPU: forward and forward+backward TFLOP/s against the matmul rate.

  python benchmarks/gpu_attention.py                      # 4k..32k tokens, blockwise/cudnn/tokamax
  python benchmarks/gpu_attention.py --lengths 64 --repeats 1 --matmul-size 256 --out /tmp/r.md

Batch 1, 16 heads (no GQA), head_dim 128, bfloat16, causal and not. Each (implementation, length,
causal) is jitted once, then timed as the median of `--repeats` calls after one warm-up call: the
forward pass, and forward+backward (gradients of `sum(out * cotangent)` with respect to query, key
and value). The device's bfloat16 matmul rate is measured in the same run (square
`--matmul-size` matmuls) and each kernel's rate is given as a fraction of it.

FLOP convention (as benchmarks/attention.py): forward 4 * batch * heads * q_len * kv_len * head_dim,
forward+backward 3.5x that, both halved when causal. A call an implementation declines (another
platform, a dtype or shape limit) or that fails (out of memory) is reported with its reason.

Writes (or replaces) the "GPU attention" section of `--out` (default benchmarks/RESULTS.md), naming
the device, and prints the same table. On a CPU it runs too, for a smoke test with tiny lengths.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Benchmark the checkout this script lives in, whatever flaxattn is installed.
sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402  (after the path set-up above)
import jax.numpy as jnp  # noqa: E402

from flaxattn.attention import Mask, dot_product_attention  # noqa: E402

SECTION_BEGIN = "<!-- gpu_attention: begin -->"
SECTION_END = "<!-- gpu_attention: end -->"
MODES = ("forward", "forward_backward")


def attention_flops(length: int, causal: bool, mode: str, *, batch: int, heads: int,
                    head_dim: int) -> float:
  """Model FLOPs of one call (see the module docstring)."""
  forward = 4.0 * batch * heads * length * length * head_dim
  total = forward * (3.5 if mode == "forward_backward" else 1.0)
  return total / 2 if causal else total


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `fn()` (blocking on its result) over `repeats` calls after a warm-up."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure_matmul_tflops(size: int, dtype, repeats: int) -> float:
  """The device's rate on `[size, size] @ [size, size]` matmuls in `dtype`, TFLOP/s."""
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.random.normal(key, (size, size), dtype) for key in keys)
  matmul = jax.jit(lambda a, b: a @ b)
  return 2.0 * size**3 / median_seconds(lambda: matmul(a, b), repeats) / 1e12


def measure(implementation: str, length: int, causal: bool, args) -> dict:
  """Times one configuration; returns {mode: seconds} or {"error": reason}."""
  dtype = jnp.dtype(args.dtype)
  keys = jax.random.split(jax.random.key(1), 4)
  shape = (args.batch, length, args.heads, args.head_dim)
  query, key, value, cotangent = (jax.random.normal(k, shape, dtype) for k in keys)
  mask = Mask(causal=causal)

  def forward(query, key, value):
    return dot_product_attention(query, key, value, mask=mask, implementation=implementation)

  def loss(query, key, value):
    return jnp.sum(forward(query, key, value).astype(jnp.float32) * cotangent.astype(jnp.float32))

  functions = {"forward": jax.jit(forward), "forward_backward": jax.jit(jax.grad(loss, (0, 1, 2)))}
  result = {}
  try:
    for mode in MODES:
      result[mode] = median_seconds(lambda fn=functions[mode]: fn(query, key, value), args.repeats)
  except Exception as error:  # pylint: disable=broad-except
    # Declined calls (ValueError from the dispatcher) and runtime failures (out of memory) are
    # results of the benchmark, not reasons to stop it.
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return {"error": f"{type(error).__name__}: {reason[:160]}"}
  return result


def markdown_section(rows: list[dict], environment: dict) -> str:
  """The RESULTS.md section: conditions, then one table row per configuration."""
  lines = [
      SECTION_BEGIN,
      "## GPU attention (`benchmarks/gpu_attention.py`)",
      "",
      f"Device: {environment['device']} ({environment['platform']}); jax {environment['jax']}; "
      f"batch {environment['batch']}, {environment['heads']} heads, head_dim "
      f"{environment['head_dim']}, {environment['dtype']}; median of {environment['repeats']} "
      f"after a warm-up. Measured {environment['dtype']} matmul rate "
      f"({environment['matmul_size']}^3): {environment['matmul_tflops']:.1f} TFLOP/s.",
      "",
      "| implementation | length | causal | forward ms | forward TFLOP/s | fwd+bwd ms | "
      "fwd+bwd TFLOP/s | fwd+bwd / matmul |",
      "|---|---:|---|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    head = f"| {row['implementation']} | {row['length']} | {'yes' if row['causal'] else 'no'} |"
    if "error" in row:
      lines.append(f"{head} {row['error'].replace('|', '/')} | | | | |")
      continue
    cells = []
    for mode in MODES:
      seconds = row[mode]
      tflops = attention_flops(row["length"], row["causal"], mode, batch=environment["batch"],
                               heads=environment["heads"], head_dim=environment["head_dim"])
      tflops /= seconds * 1e12
      cells += [f"{seconds * 1e3:,.2f}", f"{tflops:.3g}"]
      row[f"{mode}_tflops"] = tflops
    share = row["forward_backward_tflops"] / environment["matmul_tflops"]
    lines.append(f"{head} {' | '.join(cells)} | {share:.0%} |")
  lines.append(SECTION_END)
  return "\n".join(lines) + "\n"


def write_section(path: pathlib.Path, section: str) -> None:
  """Replaces the section between the markers in `path` (appends it, or creates the file)."""
  text = path.read_text() if path.exists() else "# Benchmark results\n\n"
  if SECTION_BEGIN in text and SECTION_END in text:
    before = text[:text.index(SECTION_BEGIN)]
    after = text[text.index(SECTION_END) + len(SECTION_END):].lstrip("\n")
    text = before + section + ("\n" + after if after else "")
  else:
    text = text.rstrip("\n") + "\n\n" + section
  path.write_text(text)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--lengths", default="4096,8192,16384,32768",
                      help="comma-separated sequence lengths")
  parser.add_argument("--impls", default="blockwise,cudnn,tokamax",
                      help="comma-separated flaxattn implementation names")
  parser.add_argument("--causal", choices=("no", "yes", "both"), default="both")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--head-dim", type=int, default=128)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--matmul-size", type=int, default=8192)
  parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "benchmarks" / "RESULTS.md")
  args = parser.parse_args(argv)
  for name in ("batch", "heads", "head_dim", "repeats", "matmul_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
  try:
    args.lengths = [int(length) for length in args.lengths.split(",")]
  except ValueError:
    parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
  if any(length < 1 for length in args.lengths):
    parser.error(f"--lengths must be positive, got {args.lengths}")
  args.impls = [name for name in args.impls.split(",") if name]
  return args


def main(argv=None) -> dict:
  """Runs the benchmark; returns {"environment": ..., "results": [...]}."""
  args = parse_args(argv)
  device = jax.devices()[0]
  environment = dict(
      device=device.device_kind, platform=device.platform, jax=jax.__version__,
      batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=args.dtype,
      repeats=args.repeats, matmul_size=args.matmul_size,
      matmul_tflops=measure_matmul_tflops(args.matmul_size, jnp.dtype(args.dtype), args.repeats))
  causal_values = {"no": (False,), "yes": (True,), "both": (False, True)}[args.causal]
  rows = []
  for implementation in args.impls:
    for length in args.lengths:
      for causal in causal_values:
        row = dict(implementation=implementation, length=length, causal=causal,
                   **measure(implementation, length, causal, args))
        rows.append(row)
        print(row, flush=True)
  section = markdown_section(rows, environment)
  write_section(args.out, section)
  print(section)
  return dict(environment=environment, results=rows)


if __name__ == "__main__":
  main()
