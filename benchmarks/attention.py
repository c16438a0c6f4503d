"""Attention speed and memory by sequence length: every flaxattn implementation and torch SDPA.

  python benchmarks/attention.py --quick     # 512 and 1k tokens, 3 repeats: about a minute
  python benchmarks/attention.py             # 1k .. 64k tokens (long: run it on a quiet machine)

Batch 1, 8 heads, head_dim 64, float32, causal and not. Each (implementation, length, causal) runs in
a fresh subprocess with a time limit, so that running out of memory or time is reported ("OOM",
"timeout > Ns") instead of ending the run; dense implementations (declared memory O(length^2)) are
not started when their score matrices would not fit in the available memory ("OOM (estimated X GiB)").
A subprocess times the forward pass, then forward+backward (the gradient of the output sum with
respect to query, key and value): the median of `--repeats` calls after one warm-up call. Peak memory
is the peak resident set during the timed calls (after compilation) minus the resident set after
imports: it includes the inputs and what compilation kept, not compilation's own transient peak.

FLOP convention: forward 4 * batch * heads * q_len * kv_len * head_dim (two matmuls), backward 2.5x
forward (forward+backward 3.5x), halved when causal. Achieved GFLOP/s is printed against the float32
matmul rate of JAX measured in the same run. Writes results.json, results.md and results.png to `--out`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Benchmark the checkout this script lives in, whatever flaxattn is installed.
sys.path.insert(0, str(REPO_ROOT))

BATCH, HEADS, HEAD_DIM = 1, 8, 64
MODES = ("forward", "forward_backward")
GiB = 2**30
# Peak resident bytes per score-matrix element (batch * heads * q_len * kv_len) of the dense
# implementations, measured with this script on CPU at 2k tokens: forward 11.5 (reference) and 11.6
# (xla), forward+backward 41 (reference: float32 logits, mask, weights and their cotangents all
# live) and 25 (xla). The larger is used for both.
DENSE_BYTES_PER_SCORE = {"forward": 12, "forward_backward": 41}
# torch SDPA is timed through this name; it is not a flaxattn implementation.
TORCH = "torch_sdpa"


def cpu_cores() -> int:
  """Cores this process may use: what JAX's CPU client sizes its thread pool by."""
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _proc_status_bytes(field: str) -> int | None:
  try:
    with open("/proc/self/status") as status:
      for line in status:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def reset_peak_rss() -> int:
  """Restarts peak-RSS tracking from now (Linux); returns the resident bytes now.

  Without the reset, a transient peak during imports would hide smaller allocations after them.
  """
  try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
      clear_refs.write("5")  # 5: reset the peak resident set size (VmHWM) to the current one.
  except OSError:
    pass
  return _proc_status_bytes("VmRSS") or peak_rss_bytes()


def peak_rss_bytes() -> int:
  peak = _proc_status_bytes("VmHWM")
  if peak is not None:
    return peak
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB.


def available_bytes() -> int:
  with open("/proc/meminfo") as meminfo:
    for line in meminfo:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def flops(length: int, causal: bool, mode: str) -> float:
  forward = 4.0 * BATCH * HEADS * length * length * HEAD_DIM * (0.5 if causal else 1.0)
  return forward * (3.5 if mode == "forward_backward" else 1.0)


def median_seconds(fn, repeats: int) -> float:
  """Median wall time of `repeats` calls of `fn` (call it once before: compiling, allocating)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# Worker: one (implementation, length, causal) in its own process. Prints one JSON line per mode.


def _report(mode: str, baseline: int, **fields) -> None:
  print(json.dumps(dict(mode=mode, peak_bytes=peak_rss_bytes() - baseline, **fields)), flush=True)


def _jax_functions(spec):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxattn.attention import Mask, dot_product_attention

  rng = np.random.default_rng(0)
  shape = (BATCH, spec["length"], HEADS, HEAD_DIM)
  inputs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)]
  mask = Mask(causal=True) if spec["causal"] else None

  def attend(query, key, value):
    return dot_product_attention(query, key, value, mask=mask, implementation=spec["implementation"])

  forward = jax.jit(attend)
  gradients = jax.jit(jax.grad(lambda *qkv: attend(*qkv).sum(), argnums=(0, 1, 2)))
  return {"forward": lambda: forward(*inputs).block_until_ready(),
          "forward_backward": lambda: jax.block_until_ready(gradients(*inputs))}


def _torch_functions(spec):
  import torch

  torch.set_num_threads(spec["threads"])
  generator = torch.Generator().manual_seed(0)
  shape = (BATCH, HEADS, spec["length"], HEAD_DIM)  # torch's layout
  inputs = [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(3)]
  attend = torch.nn.functional.scaled_dot_product_attention

  def forward():
    with torch.no_grad():
      attend(*inputs, is_causal=spec["causal"])

  def forward_backward():
    attend(*inputs, is_causal=spec["causal"]).sum().backward()
    for x in inputs:
      x.grad = None

  return {"forward": forward, "forward_backward": forward_backward}


def failure_status(error: Exception) -> str:
  """'OOM' for a failed allocation (XLA reports those as runtime errors), else the error's first line."""
  text = str(error)
  if isinstance(error, MemoryError) or "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
    return "OOM"
  return f"error: {type(error).__name__}: {text.splitlines()[0][:200] if text else ''}"


def run_worker(spec: dict) -> None:
  if spec["implementation"] == TORCH:
    import torch  # noqa: F401  (imported before the baseline is taken)
  else:
    import jax

    import flaxattn.attention  # noqa: F401

    jax.devices()  # Starts the CPU client now, so that it is part of the baseline.
  baseline = reset_peak_rss()
  functions = (_torch_functions if spec["implementation"] == TORCH else _jax_functions)(spec)
  failed = None
  for mode in spec["modes"]:
    if failed:  # Forward+backward cannot succeed where the forward pass failed.
      _report(mode, baseline, status=failed)
      continue
    try:
      functions[mode]()  # Compiling takes memory of its own: start the peak after it.
      reset_peak_rss()
      seconds = median_seconds(functions[mode], spec["repeats"])
    except Exception as error:  # noqa: BLE001  (XLA reports failed allocations as runtime errors)
      failed = failure_status(error)
      _report(mode, baseline, status=failed)
    else:
      _report(mode, baseline, seconds=seconds)


# ------------------------------------------------------------------------------------------------
# Driver


def measure_matmul_gflops(size: int, repeats: int) -> float:
  """float32 `size`^3 matmul rate of JAX on this machine, GFLOP/s (2 * size^3 FLOPs)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
  return 2.0 * size**3 / seconds / 1e9


def dense_estimate(implementation: str, length: int, mode: str, described: dict) -> float | None:
  """Estimated peak bytes of a dense (O(length^2)) implementation; None for the others."""
  if implementation == TORCH or "length^2" not in described[implementation]["memory"]:
    return None
  return float(BATCH * HEADS * length * length * DENSE_BYTES_PER_SCORE[mode])


def run_worker_process(script: pathlib.Path, spec: dict, timeout: float,
                       extra_env: dict | None = None) -> tuple[list[dict], str]:
  """Runs `python script --worker SPEC` (this checkout first on the path) for at most `timeout` s.

  Returns the JSON objects it printed (lines starting with '{') and how it ended, for the results
  it did not print: 'timeout > Ns', 'OOM (killed)' (SIGKILL without a time-out is the kernel's
  out-of-memory killer) or the exit status and last line of stderr.
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])), **(extra_env or {}))
  process = subprocess.Popen([sys.executable, str(script), "--worker", json.dumps(spec)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout)
    ended = None
  except subprocess.TimeoutExpired:
    process.kill()
    stdout, stderr = process.communicate()
    ended = f"timeout > {timeout:g}s"
  reports = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
  if ended is None:
    last = (stderr.strip().splitlines() or [""])[-1]
    ended = "OOM (killed)" if process.returncode == -9 else (
        f"error (exit {process.returncode}): {last[-200:]}")
  return reports, ended


def run_config(implementation, length, causal, args, described) -> dict:
  """Runs one (implementation, length, causal) in a subprocess; returns a result per mode."""
  results, modes = {}, []
  for mode in MODES:
    estimate = dense_estimate(implementation, length, mode, described)
    # Forward+backward (the second mode) never fits where the forward pass alone did not.
    if estimate is not None and (estimate > available_bytes() or results):
      results[mode] = dict(status=f"OOM (estimated {estimate / GiB:.1f} GiB)")
    else:
      modes.append(mode)
  if not modes:
    return results
  spec = dict(implementation=implementation, length=length, causal=causal, modes=modes,
              repeats=args.repeats, threads=cpu_cores())
  reports, ended = run_worker_process(pathlib.Path(__file__), spec, args.timeout)
  for report in reports:
    results[report.pop("mode")] = report
  for mode in modes:
    if mode not in results:
      results[mode] = dict(status=ended)
  for mode, result in results.items():
    if "seconds" in result:
      result["gflops"] = flops(length, causal, mode) / result["seconds"] / 1e9
  return results


def _cell_time(result: dict) -> str:
  return f"{result['seconds'] * 1e3:.1f}" if "seconds" in result else result["status"]


def _cell_rate(result: dict, matmul_gflops: float) -> str:
  if "gflops" not in result:
    return "-"
  return f"{result['gflops']:.1f} ({100 * result['gflops'] / matmul_gflops:.0f}%)"


def _cell_memory(result: dict) -> str:
  return f"{result['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in result else "-"


def markdown_table(rows: list[dict], matmul_gflops: float) -> str:
  lines = [
      "| implementation | causal | length | forward ms | forward GFLOP/s (% matmul) | "
      "fwd+bwd ms | fwd+bwd GFLOP/s (% matmul) | forward peak MiB | fwd+bwd peak MiB |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for row in rows:
    forward, both = row["forward"], row["forward_backward"]
    lines.append(
        f"| {row['implementation']} | {row['causal']} | {row['length']} | {_cell_time(forward)} | "
        f"{_cell_rate(forward, matmul_gflops)} | {_cell_time(both)} | "
        f"{_cell_rate(both, matmul_gflops)} | {_cell_memory(forward)} | {_cell_memory(both)} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = [("forward", "seconds", "forward time (s)"),
            ("forward_backward", "seconds", "forward+backward time (s)"),
            ("forward_backward", "peak_bytes", "forward+backward peak memory (GiB)")]
  figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
  implementations = sorted({row["implementation"] for row in rows})
  colors = dict(zip(implementations, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
  for axis, (mode, field, title) in zip(axes, panels):
    for implementation in implementations:
      for causal in (False, True):
        points = [(row["length"], row[mode][field]) for row in rows
                  if row["implementation"] == implementation and row["causal"] == causal
                  and field in row[mode]]
        if not points:
          continue
        lengths, values = zip(*points)
        if field == "peak_bytes":
          values = [max(value, 1) / GiB for value in values]
        axis.plot(lengths, values, marker="o", color=colors[implementation],
                  linestyle="--" if causal else "-",
                  label=f"{implementation}{' causal' if causal else ''}")
    axis.set(xscale="log", yscale="log", xlabel="sequence length", title=title)
    axis.set_xscale("log", base=2)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize="small")
  figure.suptitle(f"attention, batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def parse_lengths(parser: argparse.ArgumentParser, text: str | None, default: list[int]) -> list[int]:
  """`--lengths` as ints (`default` when not given); a parser error naming the text otherwise."""
  if not text:
    return default
  try:
    return [int(n) for n in text.split(",")]
  except ValueError:
    parser.error(f"--lengths must be comma-separated integers, got {text!r}")


def require_positive(parser: argparse.ArgumentParser, **values) -> None:
  """A parser error naming every option (`name=value`, lists by their smallest) that is not > 0."""
  bad = [f"--{name.replace('_', '-')}={value}" for name, value in values.items()
         if (min(value) if isinstance(value, list) else value) <= 0]
  if bad:
    parser.error(f"must be positive: {', '.join(bad)}")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="small sizes: lengths 512,1024, 3 repeats, 1024^3 matmul (about a minute)")
  parser.add_argument("--impls", help=f"comma-separated implementations, '{TORCH}' included "
                      "(default: every registered one that runs here, and torch SDPA)")
  parser.add_argument("--lengths", help="comma-separated sequence lengths (default 1024..65536)")
  parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
  parser.add_argument("--repeats", type=int, help="timed calls after warm-up (default 5; quick 3)")
  parser.add_argument("--timeout", type=float, help="seconds per subprocess (default 600; quick 120)")
  parser.add_argument("--matmul-size", type=int, help="matmul size for the peak rate (default 4096)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=REPO_ROOT / "benchmarks" / "results" / "attention")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = args.quick
  pick = lambda value, full, small: value if value is not None else (small if quick else full)
  args.lengths = parse_lengths(parser, args.lengths,
                               [512, 1024] if quick else [2**k for k in range(10, 17)])
  args.repeats = pick(args.repeats, 5, 3)
  args.timeout = pick(args.timeout, 600.0, 120.0)
  args.matmul_size = pick(args.matmul_size, 4096, 1024)
  require_positive(parser, repeats=args.repeats, timeout=args.timeout, lengths=args.lengths,
                   matmul_size=args.matmul_size)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    run_worker(json.loads(args.worker))
    return {}

  import jax

  from flaxattn.attention import describe_implementations

  described = {d["name"]: d for d in describe_implementations()}
  # Mesh-only implementations (ring attention) need a sharded setup of their own: benchmarks/ring.py.
  runnable = [name for name, d in described.items()
              if jax.default_backend() in d["platforms"] and not d["sequence_sharded"]]
  names = args.impls.split(",") if args.impls else [*runnable, TORCH]
  unknown = sorted(set(names) - set(described) - {TORCH})
  if unknown:
    raise SystemExit(f"--impls: unknown {unknown}; choose from {sorted(described)} or {TORCH}")
  causal_flags = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]

  matmul_gflops = measure_matmul_gflops(args.matmul_size, args.repeats)
  print(f"jax {jax.__version__} on {jax.default_backend()}, {cpu_cores()} cores: float32 "
        f"{args.matmul_size}^3 matmul {matmul_gflops:.1f} GFLOP/s", flush=True)
  rows = []
  for length in args.lengths:
    for causal in causal_flags:
      for name in names:
        row = dict(implementation=name, length=length, causal=causal,
                   **run_config(name, length, causal, args, described))
        rows.append(row)
        print(f"{name:>12} causal={causal!s:5} {length:>6}: forward {_cell_time(row['forward'])} ms, "
              f"fwd+bwd {_cell_time(row['forward_backward'])} ms, fwd+bwd peak "
              f"{_cell_memory(row['forward_backward'])} MiB", flush=True)

  environment = dict(python=sys.version.split()[0], jax=jax.__version__, cores=cpu_cores(),
                     platform=jax.default_backend(), matmul_size=args.matmul_size,
                     matmul_gflops=matmul_gflops)
  if TORCH in names:
    environment["torch"] = importlib.metadata.version("torch")  # Without importing it here.
  report = dict(
      shape=dict(batch=BATCH, heads=HEADS, head_dim=HEAD_DIM, dtype="float32"),
      repeats=args.repeats, timeout_s=args.timeout, environment=environment,
      flop_convention="forward 4*B*H*T*S*D, backward 2.5x forward, causal half; times are medians "
                      "after one warm-up; peak_bytes is peak RSS above the post-import baseline",
      results=rows)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
  table = markdown_table(rows, matmul_gflops)
  (args.out / "results.md").write_text(
      f"# Attention benchmark\n\n{report['flop_convention']}. Matmul reference: jax float32 "
      f"{args.matmul_size}^3 = {matmul_gflops:.1f} GFLOP/s, {cpu_cores()} cores.\n\n{table}\n")
  plot(rows, args.out / "results.png")
  print(f"\n{table}\n\nwrote {args.out}/results.json, results.md, results.png")
  return report


if __name__ == "__main__":
  main()
