"""Ring attention vs blockwise on simulated CPU devices: forward+backward time and communication.

  python benchmarks/ring.py                           # 8 devices, 1k and 2k tokens, causal
  python benchmarks/ring.py --lengths 4096 --devices 4 --repeats 3

Three ways to run the same attention (batch 1, 8 heads, 2 key/value heads, head_dim 64, float32):
  blockwise, 1 device: the whole sequence on one device (the baseline);
  blockwise, sharded: inputs sharded over the sequence on a `context` mesh, the kernel left to XLA's
    partitioner (which gathers what it needs);
  ring: `implementation='ring'` over the same mesh.
For each: compile time, median forward+backward time (the variants timed in turn, round robin),
and the collectives in the compiled program.

Simulated CPU devices (`--xla_force_host_platform_device_count`) share this machine's cores, so
nothing here measures a parallel speedup: all devices' work runs on the same few cores, and a
"transfer" is a memory copy. What it does show is the per-device work's overhead (the ring's extra
steps, merges and re-layouts) and which collectives each program uses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import sys
import time


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices = ring size")
  parser.add_argument("--lengths", default="1024,2048", help="comma-separated sequence lengths")
  parser.add_argument("--causal", choices=("yes", "no"), default="yes")
  parser.add_argument("--repeats", type=int, default=5,
                      help="timed runs of each variant (round robin) after one warm-up")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  # Before jax is imported: the device count is fixed when the backend starts.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  import jax
  import jax.numpy as jnp
  import numpy as np

  from flaxattn.attention import Mask, activation_layout, dot_product_attention

  spec = jax.sharding.PartitionSpec(None, "context", None, None)
  mesh = jax.make_mesh((args.devices,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
  causal = args.causal == "yes"
  print(f"jax {jax.__version__}, {jax.device_count()} simulated CPU devices on {os.cpu_count()} "
        f"cores; batch 1, 8 heads (2 kv), head_dim 64, float32, causal={causal}; forward+backward "
        f"median of {args.repeats}")
  print("| length | implementation | compile (s) | fwd+bwd (ms) | collectives in the program |")
  print("|---:|---|---:|---:|---|")
  variants = (("blockwise, 1 device", "blockwise", False), ("blockwise, sharded", "blockwise", True),
              ("ring", "ring", True))
  for length in map(int, args.lengths.split(",")):
    rng = np.random.default_rng(0)
    shapes = ((1, length, 8, 64), (1, length, 2, 64), (1, length, 2, 64))
    inputs = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
    programs = []
    for label, implementation, on_mesh in variants:
      def loss(query, key, value, implementation=implementation, on_mesh=on_mesh):
        # The layout the inputs are placed in, stated as flaxattn.nn does (ring rings over its
        # length axis).
        with activation_layout(spec if on_mesh else None):
          out = dot_product_attention(query, key, value, mask=Mask(causal=causal),
                                      implementation=implementation)
        return jnp.sum(out * out)

      if on_mesh:
        arguments = [jax.device_put(x, jax.sharding.NamedSharding(mesh, spec)) for x in inputs]
      else:
        arguments = [jax.device_put(x, jax.devices()[0]) for x in inputs]
      start = time.perf_counter()
      with jax.set_mesh(mesh) if on_mesh else contextlib.nullcontext():
        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*arguments).compile()
      compile_seconds = time.perf_counter() - start
      hlo = compiled.as_text()
      counts = {name: len(re.findall(rf"\b{name}(?:-start)?\(", hlo))
                for name in ("all-gather", "all-to-all", "all-reduce", "collective-permute")}
      collectives = ", ".join(f"{count} {name}" for name, count in counts.items() if count) or "none"
      jax.block_until_ready(compiled(*arguments))  # Warm-up.
      programs.append((label, compiled, arguments, compile_seconds, collectives, []))
    # Round robin, so that a change in the machine's load hits every variant alike.
    for _ in range(args.repeats):
      for _, compiled, arguments, _, _, times in programs:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*arguments))
        times.append(time.perf_counter() - start)
    for label, _, _, compile_seconds, collectives, times in programs:
      print(f"| {length} | {label} | {compile_seconds:.1f} | {1e3 * statistics.median(times):,.0f} "
            f"| {collectives} |", flush=True)

if __name__ == "__main__":
  sys.exit(main())
