"""Training-step throughput of a decoder-only LM: flaxattn (JAX, jitted) against PyTorch (eager and
`torch.compile`), the same model, optimizer, data and threads, side by side in one run.

  python benchmarks/train_throughput.py            # 6 layers, d_model 512, 8 heads, seq 512, vocab 32k
  python benchmarks/train_throughput.py --quick    # a small model, for a smoke run

The model is Llama-style: tied embeddings, RMSNorm, RoPE, causal self-attention, SwiGLU MLP, no
biases; the optimizer AdamW (weight decay on matrices only) after global-norm clipping at 1.0;
float32 throughout. Reported per implementation: median step time, tokens/s, MFU (model
FLOPs of the matmuls, `flaxattn.train.flops`, over a float32 matmul rate measured here), and for flaxattn the step's compile time.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxattn import parallel, train
from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig
from flaxattn.train.flops import measured_peak_flops, train_flops

FULL = dict(vocab_size=32000, d_model=512, num_heads=8, mlp_dim=1408, num_layers=6, seq_len=512,
            batch=8)
QUICK = dict(vocab_size=4096, d_model=128, num_heads=4, mlp_dim=352, num_layers=2, seq_len=128,
             batch=4)
LEARNING_RATE, WEIGHT_DECAY, CLIP = 3e-4, 0.1, 1.0


def time_steps(step, warmup: int, steps: int) -> list[float]:
  """Seconds per call of `step()` (which must block until done), after `warmup` calls."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def flaxattn_step(sizes, tokens):
  config = TransformerConfig(
      vocab_size=sizes["vocab_size"], d_model=sizes["d_model"], num_heads=sizes["num_heads"],
      mlp_dim=sizes["mlp_dim"], num_layers=sizes["num_layers"], max_length=sizes["seq_len"],
      positions="rope", norm="rmsnorm", norm_eps=1e-6, activation="silu", gated_mlp=True,
      use_bias=False, scan_layers=True)
  mesh = parallel.make_mesh({}, jax.devices()[:1])
  rules = parallel.make_rules("dp")
  tx = train.make_optimizer("adamw", lambda step: LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                            b1=0.9, b2=0.95, clip_norm=CLIP)
  graphdef, state, shardings = train.init_train_state(lambda rngs: DecoderLM(config, rngs=rngs), tx,
                                                      0, mesh, rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": np.ones(tokens[:, 1:].shape, np.float32)}
  batch_shardings = parallel.batch_shardings({k: v.shape for k, v in batch.items()}, mesh, rules)
  step_fn, _ = train.jit_steps(
      train.make_train_step(graphdef, tx, train.LOSSES["lm"], lambda step: LEARNING_RATE),
      train.make_eval_step(graphdef, train.LOSSES["lm"]), shardings, batch_shardings, mesh, rules)
  batch = parallel.global_batch(batch, batch_shardings)
  holder = {"state": state}

  def step():
    holder["state"], metrics = step_fn(holder["state"], batch)
    return float(metrics["loss"])

  start = time.perf_counter()
  first_loss = step()  # Traces, compiles, and runs once.
  compile_s = time.perf_counter() - start
  return step, config, num_params, compile_s, first_loss


def torch_model(sizes, torch):
  """The same model in PyTorch (`torch.nn`), built inside a function so torch stays optional."""
  nn, F = torch.nn, torch.nn.functional
  d, heads = sizes["d_model"], sizes["num_heads"]
  head_dim = d // heads

  def rope(x, positions):  # x: [batch, heads, length, head_dim]; the "rotate half" layout.
    half = head_dim // 2
    freq = 1.0 / (10000.0 ** (torch.arange(half, dtype=torch.float32) / half))
    angles = positions[:, None].float() * freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

  class Block(nn.Module):
    def __init__(self):
      super().__init__()
      self.attention_norm = nn.RMSNorm(d, eps=1e-6)
      self.qkv = nn.Linear(d, 3 * d, bias=False)
      self.out = nn.Linear(d, d, bias=False)
      self.mlp_norm = nn.RMSNorm(d, eps=1e-6)
      self.gate_up = nn.Linear(d, 2 * sizes["mlp_dim"], bias=False)
      self.down = nn.Linear(sizes["mlp_dim"], d, bias=False)

    def forward(self, x, positions):
      batch, length, _ = x.shape
      q, k, v = self.qkv(self.attention_norm(x)).view(batch, length, 3, heads, head_dim).unbind(2)
      q, k, v = (t.transpose(1, 2) for t in (q, k, v))
      attended = F.scaled_dot_product_attention(rope(q, positions), rope(k, positions), v,
                                                is_causal=True)
      x = x + self.out(attended.transpose(1, 2).reshape(batch, length, d))
      gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
      return x + self.down(F.silu(gate) * up)

  class LM(nn.Module):
    def __init__(self):
      super().__init__()
      self.embedding = nn.Embedding(sizes["vocab_size"], d)
      nn.init.normal_(self.embedding.weight, std=d**-0.5)  # As flaxattn's Embed (tied logits ~1).
      self.blocks = nn.ModuleList(Block() for _ in range(sizes["num_layers"]))
      self.norm = nn.RMSNorm(d, eps=1e-6)

    def forward(self, inputs, targets):
      positions = torch.arange(inputs.shape[1])
      x = self.embedding(inputs)
      for block in self.blocks:
        x = block(x, positions)
      logits = self.norm(x) @ self.embedding.weight.T
      return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

  return LM()


def torch_step(sizes, tokens, torch, compiled: bool):
  torch.manual_seed(0)
  model = torch_model(sizes, torch)
  matrices = [p for p in model.parameters() if p.ndim >= 2]
  vectors = [p for p in model.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": WEIGHT_DECAY},
                                 {"params": vectors, "weight_decay": 0.0}],
                                lr=LEARNING_RATE, betas=(0.9, 0.95))
  loss_fn = torch.compile(model) if compiled else model
  inputs = torch.from_numpy(tokens[:, :-1].astype(np.int64))
  targets = torch.from_numpy(tokens[:, 1:].astype(np.int64))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    return float(loss.detach())

  start = time.perf_counter()
  first_loss = step()
  return step, time.perf_counter() - start, first_loss


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="a small model (smoke run)")
  parser.add_argument("--steps", type=int, default=5, help="timed steps per implementation")
  parser.add_argument("--no_compile", action="store_true", help="skip torch.compile")
  args = parser.parse_args()
  sizes = QUICK if args.quick else FULL
  tokens = np.random.default_rng(0).integers(0, sizes["vocab_size"],
                                             (sizes["batch"], sizes["seq_len"] + 1)).astype(np.int32)
  tokens_per_step = sizes["batch"] * sizes["seq_len"]
  print(f"sizes {sizes}; {os.cpu_count()} CPUs; jax {jax.__version__} on {jax.devices()[0]}")

  step, config, num_params, compile_s, jax_loss = flaxattn_step(sizes, tokens)
  # Every position is a real token here (no padding): model FLOPs of the step's matmuls.
  flops_per_step = float(train_flops(config, "lm", {"inputs": tokens[:, :-1]}))
  peak = measured_peak_flops(parallel.make_mesh({}, jax.devices()[:1]), size=2048)
  print(f"{num_params / 1e6:.1f}M parameters, {flops_per_step / 1e9:.1f} GFLOP per step, "
        f"measured float32 matmul peak {peak / 1e9:.0f} GFLOP/s")
  rows = [("flaxattn (jax.jit)", compile_s, jax_loss, time_steps(step, 1, args.steps))]

  try:
    import torch
  except ImportError:
    torch = None
    print("torch is not installed: no PyTorch rows")
  if torch is not None:
    torch.set_num_threads(os.cpu_count())
    for compiled in (False, True) if not args.no_compile else (False,):
      name = "PyTorch torch.compile" if compiled else "PyTorch eager"
      try:
        step, first_s, torch_loss = torch_step(sizes, tokens, torch, compiled)
        rows.append((name, first_s if compiled else None, torch_loss,
                     time_steps(step, 1, args.steps)))
      except Exception as error:  # torch.compile needs a C++ toolchain; report, don't stop.
        print(f"{name} failed: {type(error).__name__}: {str(error)[:200]}")

  eager = next((statistics.median(r[3]) for r in rows if r[0] == "PyTorch eager"), None)
  print(f"\n| implementation | compile / first step (s) | first loss | step (s, median) | tokens/s "
        f"| MFU | vs PyTorch eager |\n|---|---|---|---|---|---|---|")
  for name, compile_time, loss, times in rows:
    median = statistics.median(times)
    print(f"| {name} | {'' if compile_time is None else f'{compile_time:.1f}'} | {loss:.3f} | "
          f"{median:.3f} | {tokens_per_step / median:,.0f} | {flops_per_step / median / peak:.1%} | "
          f"{'' if eager is None else f'{eager / median:.2f}x'} |")
  print(f"\n(first loss ~ log(vocab) = {math.log(sizes['vocab_size']):.3f} for both: same model)")


if __name__ == "__main__":
  main()
