"""Model FLOPs of a Transformer training step and the devices' measured matmul rate, for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.nn.config import TransformerConfig


def train_flops_per_token(config: TransformerConfig, num_params: int, seq_len: int) -> float:
  """FLOPs to train on one token (forward and backward), as in PaLM (Chowdhery et al., appendix B):
  `6 * num_params` for the matmuls with the weights (a tied embedding counted once, as the output
  projection) plus `12 * layers * heads * head_dim * seq_len` for the attention scores and values
  (causal masking not discounted)."""
  attention = 12 * config.num_layers * config.num_heads * config.features_per_head * seq_len
  return 6.0 * num_params + attention


def measured_peak_flops(mesh: jax.sharding.Mesh, size: int = 1024, repeats: int = 5) -> float:
  """FLOP/s of a float32 `[size, size] @ [size, size]` matmul on every device of `mesh` at once
  (the best of `repeats`): the reference for MFU on CPUs, which publish no peak. Simulated CPU
  devices share the host's cores, so their combined rate is the host's."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  devices = mesh.devices.size
  # Built per device (`make_array_from_callback`), so it also works when other processes own some.
  a = jax.make_array_from_callback((devices, size, size), sharding,
                                   lambda index: np.ones((1, size, size), np.float32))
  matmul = jax.jit(lambda x: jnp.einsum("dij,djk->dik", x, x), out_shardings=sharding)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * devices * size**3 / best
