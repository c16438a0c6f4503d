"""flex_attention on a causal + document mask, side by side with the other ways to run that mask.

  python benchmarks/flex.py --lengths 4096 8192 [--cases documents alibi] [--repeats 3] [--no-torch]

Batch 1, `--heads` heads, head_dim `--head-dim`, float32, documents of mixed lengths (uniform in
[`--doc-min`, `--doc-max`], mean 2k by default) packed into each sequence. Rows, for forward and
forward+backward (gradient of `sum(out * cotangent)` w.r.t. query, key, value):

- `flex`: `flex_attention` with `mask_mod = causal & same document` (ids captured, traced), the block
  mask built inside the timed call; `flex (mask given)`: the block mask built outside the call.
- `blockwise dense mask`: `dot_product_attention(implementation='blockwise')` with the mask as a
  dense `[T, T]` boolean array (what a user of an arbitrary mask had before flex).
- `blockwise segment ids`: the same kernel with the structured `Mask(causal, segment ids)`: the
  hand-written special case flex should approach.
- `xla`: `dot_product_attention(implementation='xla')`, dense mask (O(T^2) memory: forward+backward
  only up to `--xla-max-length`).
- `torch flex` (forward only; torch has no CPU backward): `torch.compile(flex_attention)` with the
  same mask_mod, its block mask built outside.

Case `alibi` (`--cases alibi`): causal attention with the ALiBi bias `slope_h * (kv_idx - q_idx)`
(slopes captured, differentiated in fwd+bwd): `flex` as a score_mod, `blockwise dense bias` and `xla`
with the bias as a dense `[1, heads, T, T]` float32 array (only up to `--dense-bias-max-length`:
2 GiB at 8k), and `torch flex` with the same score_mod.

Medians of `--repeats` interleaved runs after a warm-up (xla's timed after the others); wall and process CPU time. Timings on a
shared machine are noisy: compare rows of one run only. `--peak alibi` runs only flex ALiBi
fwd+bwd once at each length (for `/usr/bin/time -v` peak memory).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxattn.attention import Mask, create_block_mask, dot_product_attention, flex_attention
from flaxattn.nn import alibi_slopes


def document_ids(length: int, low: int, high: int, seed: int = 0) -> np.ndarray:
  """`[1, length]` int32 ids of documents with lengths uniform in [low, high], packed end to end."""
  rng = np.random.default_rng(seed)
  ids, start, doc = np.zeros(length, np.int32), 0, 0
  while start < length:
    size = int(rng.integers(low, high + 1))
    ids[start:start + size] = doc
    start, doc = start + size, doc + 1
  return ids[None]


def _mask_mod(docs):
  return lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (docs[b, q_idx] == docs[b, kv_idx])


def _jax_calls(length: int, docs: np.ndarray):
  """name -> attend(query, key, value, docs, dense) for the JAX rows."""

  def flex(q, k, v, docs, dense):
    return flex_attention(q, k, v, mask_mod=_mask_mod(docs))

  def blockwise_dense(q, k, v, docs, dense):
    return dot_product_attention(q, k, v, mask=dense, implementation="blockwise")

  def blockwise_segments(q, k, v, docs, dense):
    return dot_product_attention(q, k, v, mask=Mask(causal=True, q_segment_ids=docs),
                                 implementation="blockwise")

  def xla(q, k, v, docs, dense):
    return dot_product_attention(q, k, v, mask=dense, implementation="xla")

  return {"flex": flex, "blockwise dense mask": blockwise_dense,
          "blockwise segment ids": blockwise_segments, "xla": xla}


def _alibi_mod(slopes):
  return lambda score, b, h, q_idx, kv_idx: score + slopes[h] * (kv_idx - q_idx).astype(score.dtype)


def _causal(b, h, q_idx, kv_idx):
  return kv_idx <= q_idx


def _alibi_calls(length: int, dense_bias_max_length: int):
  """name -> attend(query, key, value, slopes, unused) for the JAX rows of the ALiBi case."""

  def flex(q, k, v, slopes, unused):
    return flex_attention(q, k, v, score_mod=_alibi_mod(slopes), mask_mod=_causal)

  def dense_bias(slopes):
    position = jnp.arange(length)
    return (slopes[:, None, None] * (position[None, :] - position[:, None])[None])[None]

  def blockwise_dense(q, k, v, slopes, unused):
    return dot_product_attention(q, k, v, bias=dense_bias(slopes), mask=Mask(causal=True),
                                 implementation="blockwise")

  def xla(q, k, v, slopes, unused):
    return dot_product_attention(q, k, v, bias=dense_bias(slopes), mask=Mask(causal=True),
                                 implementation="xla")

  calls = {"flex": flex}
  if length <= dense_bias_max_length:
    calls.update({"blockwise dense bias": blockwise_dense, "xla": xla})
  return calls


def _torch_alibi_runner(inputs, slopes: np.ndarray, threads: int):
  import torch  # Optional peer.
  from torch.nn.attention import flex_attention as torch_flex

  torch.set_num_threads(threads)
  query, key, value = (torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy())
                       for x in inputs[:3])
  torch_slopes = torch.from_numpy(slopes)
  length = query.shape[2]
  block_mask = torch_flex.create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx,
                                            1, None, length, length, device="cpu")
  compiled = torch.compile(torch_flex.flex_attention)
  score_mod = lambda score, b, h, q_idx, kv_idx: score + torch_slopes[h] * (kv_idx - q_idx)
  return lambda: compiled(query, key, value, score_mod=score_mod, block_mask=block_mask)


def _runner(attend, inputs, docs, dense, backward: bool):
  query, key, value, cotangent = inputs
  if backward:
    fn = jax.jit(jax.grad(lambda q, k, v, docs, dense: jnp.sum(attend(q, k, v, docs, dense)
                                                               * cotangent), argnums=(0, 1, 2)))
  else:
    fn = jax.jit(attend)
  return lambda: jax.block_until_ready(fn(query, key, value, docs, dense))


def _flex_mask_given_runner(inputs, docs, backward: bool):
  query, key, value, cotangent = inputs
  length = query.shape[1]
  block_mask = jax.jit(lambda docs: create_block_mask(_mask_mod(docs), 1, None, length, length))(docs)

  def attend(q, k, v, block_mask, docs):
    return flex_attention(q, k, v, mask_mod=_mask_mod(docs), block_mask=block_mask)

  if backward:
    fn = jax.jit(jax.grad(lambda q, k, v, bm, docs: jnp.sum(attend(q, k, v, bm, docs) * cotangent),
                          argnums=(0, 1, 2)))
  else:
    fn = jax.jit(attend)
  return lambda: jax.block_until_ready(fn(query, key, value, block_mask, docs))


def _torch_runner(inputs, docs, threads: int):
  import torch  # Optional peer.
  from torch.nn.attention import flex_attention as torch_flex

  torch.set_num_threads(threads)
  query, key, value = (torch.from_numpy(np.asarray(x).transpose(0, 2, 1, 3).copy())
                       for x in inputs[:3])
  ids = torch.from_numpy(docs)
  length = query.shape[2]
  block_mask = torch_flex.create_block_mask(
      lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (ids[b, q_idx] == ids[b, kv_idx]),
      1, None, length, length, device="cpu")
  compiled = torch.compile(torch_flex.flex_attention)
  return lambda: compiled(query, key, value, block_mask=block_mask)


def _medians(runs: dict, repeats: int, alone: tuple[str, ...] = ("xla",)) -> dict:
  """Median (wall, CPU) seconds per run; runs interleaved so that load hits all alike, except those
  in `alone`, timed after the others: xla's GiB-sized dense buffers slow whichever run follows it
  (measured: up to 2x process CPU time at 8k)."""
  for run in runs.values():
    run()  # Warm-up and compilation.
  times = {name: ([], []) for name in runs}
  rounds = [[name for name in runs if name not in alone]] * repeats
  rounds += [[name] * repeats for name in runs if name in alone]
  for names in rounds:
    for name in names:
      wall, cpu = time.perf_counter(), time.process_time()
      runs[name]()
      times[name][0].append(time.perf_counter() - wall)
      times[name][1].append(time.process_time() - cpu)
  return {name: tuple(statistics.median(x) for x in pair) for name, pair in times.items()}


def _case_runs(case: str, length: int, inputs, args, backward: bool) -> dict:
  """name -> zero-argument timed call for one (case, length, mode)."""
  if case == "documents":
    docs = document_ids(length, args.doc_min, args.doc_max)
    position, ids = np.arange(length), docs[0]
    dense = jnp.asarray((position[None, :] <= position[:, None]) & (ids[:, None] == ids[None, :]))
    runs = {name: _runner(attend, inputs, docs, dense, backward)
            for name, attend in _jax_calls(length, docs).items()
            if not (name == "xla" and length > (args.xla_max_length if backward
                                                else args.xla_forward_max_length))}
    runs["flex (mask given)"] = _flex_mask_given_runner(inputs, docs, backward)
    if not backward and not args.no_torch:
      runs["torch flex"] = _torch_runner(inputs, docs, args.threads)
    return runs
  slopes = np.asarray(alibi_slopes(args.heads), np.float32)
  runs = {name: _runner(attend, inputs, jnp.asarray(slopes), None, backward)
          for name, attend in _alibi_calls(length, args.dense_bias_max_length).items()
          if not (name == "xla" and length > (args.xla_max_length if backward
                                              else args.xla_forward_max_length))}
  if not backward and not args.no_torch:
    runs["torch flex"] = _torch_alibi_runner(inputs, slopes, args.threads)
  return runs




def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
  parser.add_argument("--cases", nargs="+", choices=("documents", "alibi"), default=["documents"])
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--doc-min", type=int, default=512)
  parser.add_argument("--doc-max", type=int, default=3584)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
  parser.add_argument("--xla-max-length", type=int, default=4096,
                      help="xla forward+backward only up to this length (dense scores: 11.5 GiB at 8k)")
  parser.add_argument("--xla-forward-max-length", type=int, default=8192,
                      help="xla forward only up to this length (scores: 2 GiB at 8k, 8 GiB at 16k)")
  parser.add_argument("--dense-bias-max-length", type=int, default=8192,
                      help="dense [1, heads, T, T] bias rows only up to this length (2 GiB at 8k)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--peak", choices=("alibi",),
                      help="only flex ALiBi fwd+bwd, once per length (peak memory under time -v)")
  args = parser.parse_args(argv)

  results = {}
  if args.peak:
    for length in args.lengths:
      inputs = _inputs(length, args)
      slopes = jnp.asarray(alibi_slopes(args.heads), jnp.float32)
      run = _runner(_alibi_calls(length, 0)["flex"], inputs, slopes, None, backward=True)
      wall, cpu = time.perf_counter(), time.process_time()
      run()
      print(f"{length:7d} flex ALiBi fwd+bwd (with compile): wall {time.perf_counter() - wall:.1f} s, "
            f"cpu {time.process_time() - cpu:.1f} s", flush=True)
    return results
  print(f"{'case':>9} {'length':>7} {'mode':>9} {'implementation':>24} {'wall ms':>9} {'cpu ms':>9} "
        f"{'x flex':>7}")
  for case in args.cases:
    for length in args.lengths:
      inputs = _inputs(length, args)
      for backward in (False, True):
        mode = "fwd+bwd" if backward else "fwd"
        seconds = _medians(_case_runs(case, length, inputs, args, backward), args.repeats)
        for name, (wall, cpu) in seconds.items():
          ratio = cpu / seconds["flex"][1]
          print(f"{case:>9} {length:7d} {mode:>9} {name:>24} {wall * 1e3:9.1f} {cpu * 1e3:9.1f} "
                f"{ratio:7.2f}", flush=True)
          results[(case, length, mode, name)] = (wall, cpu)
  return results


def _inputs(length: int, args):
  rng = np.random.default_rng(0)
  shape = (1, length, args.heads, args.head_dim)
  return tuple(jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(4))


if __name__ == "__main__":
  main()
