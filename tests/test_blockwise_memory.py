"""Blockwise attention needs O(length) memory, forward and backward.

Each length runs in a fresh subprocess (a peak never goes down within a process): forward+backward of
causal attention, batch 1, 8 heads, head_dim 64, float32, with the default block sizes. Two measures:
the process's peak resident memory above its resident memory once JAX has started (not above the
earlier peak: the import's own transient peak can exceed what a small run needs), and XLA's compiled
memory analysis (arguments + outputs + temporaries). Going from 2k to 16k tokens multiplies the inputs
by 8; a kernel materialising the scores would multiply its memory by 64 (8 GiB of scores at 16k). The
test allows 12x.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_MEASURE = textwrap.dedent("""
    import json, sys
    import jax
    import jax.numpy as jnp
    from flaxattn.attention import Mask, dot_product_attention

    def status_kib(field):  # VmRSS: resident now; VmHWM: peak resident so far.
      with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

    length = int(sys.argv[1])
    jax.numpy.zeros(1).block_until_ready()  # Start the backend before taking the baseline.
    baseline = status_kib("VmRSS")
    shape = (1, length, 8, 64)
    keys = jax.random.split(jax.random.key(0), 4)
    query, key, value, cotangent = (jax.random.normal(k, shape, jnp.float32) for k in keys)

    def loss(query, key, value):
      out = dot_product_attention(query, key, value, mask=Mask(causal=True),
                                  implementation="blockwise")
      return jnp.sum(out * cotangent)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grad.lower(query, key, value).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(query, key, value))
    print(json.dumps({
        "rss_bytes": (status_kib("VmHWM") - baseline) * 1024,
        "compiled_bytes": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                          + analysis.temp_size_in_bytes,
    }))
""")


def _measure(length: int) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _MEASURE, str(length)], capture_output=True,
                          text=True, env=env, check=True, timeout=900)
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_grows_linearly_with_length():
  short, long = _measure(2048), _measure(16384)
  for measure in ("rss_bytes", "compiled_bytes"):
    ratio = long[measure] / short[measure]
    assert ratio <= 12.0, (
        f"{measure}: {long[measure] / 2**20:.0f} MiB at 16k vs {short[measure] / 2**20:.0f} MiB at "
        f"2k (x{ratio:.1f}; linear is x8, quadratic x64)")
