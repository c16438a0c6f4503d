"""Long-range attention head to head: training-step time, peak memory and ListOps accuracy.

  python benchmarks/long_range.py --quick    # lengths 256, 512; 20 ListOps steps: a few minutes
  python benchmarks/long_range.py --budget 5400 --timeout 1200  # 1k .. 16k and ListOps: ~75 min
  python benchmarks/long_range.py --impls blockwise,linear --lengths 4096 --no-listops

The Long Range Arena's question, for flaxattn's attention choices on one machine in one run. The
same small bidirectional classifier (`EncoderClassifier`: `MODEL` below, mean pooling, 10 classes)
is trained with each attention:

  reference   dense softmax, the float64-tested oracle (`attention_impl='reference'`)
  xla         dense softmax through `jax.nn.dot_product_attention`
  blockwise   exact FlashAttention-style kernel, O(length) memory
  local       blockwise with `window=--window` (each token sees `2 * window - 1` neighbours)
  linear      elu+1 kernelized linear attention (`attention_kind='linear'`)
  performer   FAVOR+ random features (`attention_kind='performer'`, `--performer-features`)
  ring        exact ring attention over a `context` mesh axis of 8 simulated CPU devices
              (`attention_impl='ring'`); measured only when that implementation is registered in
              this checkout, otherwise reported as not available

Speed and memory: one AdamW training step (forward, backward, update) on a batch of `--batch`
random sequences of each length, median of `--repeats` steps after a warm-up step, in a fresh
subprocess per (implementation, length) with a time limit (`--timeout`), so out-of-memory, errors
and time-outs are reported, not fatal; an implementation that failed at one length is not tried at
longer ones, and `--budget` bounds the whole run (ListOps runs first, then lengths shortest first).
Dense implementations are not started when their score
matrices would not fit in the available memory ("OOM (estimated X GiB)"). Peak memory is the peak
resident set during the timed steps above the resident set after imports (as in
`benchmarks/attention.py`).

ListOps: `flaxattn.data.synthetic.listops` examples of `--listops-length` tokens at most, whitespace
tokens as ids, padded to that length; `--listops-steps` AdamW steps of batch `--listops-batch`
(the fixed budget, the same for every implementation; learning rate 1e-3 after a linear warm-up over
the first tenth, then cosine decay; gradient norm clipped to 1), then accuracy on `--listops-test` test
examples (the majority-class rate is reported beside it).

Writes results.json, results.md and results.png (step time and peak memory vs length, log-log) to
`--out` (default benchmarks/results/long_range/).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # Benchmark this checkout, whatever flaxattn is installed.

_spec = importlib.util.spec_from_file_location("attention_benchmark",
                                               pathlib.Path(__file__).with_name("attention.py"))
attention_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(attention_benchmark)
available_bytes = attention_benchmark.available_bytes
cpu_cores = attention_benchmark.cpu_cores
median_seconds = attention_benchmark.median_seconds
peak_rss_bytes = attention_benchmark.peak_rss_bytes
reset_peak_rss = attention_benchmark.reset_peak_rss

GiB = 2**30
# The model every implementation trains: 2 pre-LN layers, d_model 128, 4 heads of 32, sinusoidal
# positions (no length limit), float32.
MODEL = dict(d_model=128, num_heads=4, mlp_dim=256, num_layers=2, positions="sinusoidal",
             dropout_rate=0.0, norm="layernorm", activation="gelu")
NUM_CLASSES = 10
IMPLEMENTATIONS = ("reference", "xla", "blockwise", "local", "linear", "performer", "ring")
RING_DEVICES = 8
# Peak bytes per score element (batch * heads * length^2) of one dense attention call's forward and
# backward, measured by benchmarks/attention.py (reference 41, xla 25); a training step keeps every
# layer's, so the estimate multiplies by the layers.
DENSE_BYTES_PER_SCORE = {"reference": 41, "xla": 25}


def model_overrides(implementation: str, args) -> dict:
  """The `TransformerConfig` fields that select `implementation`."""
  return {
      "reference": dict(attention_impl="reference"),
      "xla": dict(attention_impl="xla"),
      "blockwise": dict(attention_impl="blockwise"),
      "local": dict(attention_impl="blockwise", window=args["window"]),
      "linear": dict(attention_kind="linear"),
      "performer": dict(attention_kind="performer", performer_features=args["performer_features"]),
      "ring": dict(attention_impl="ring"),
  }[implementation]


# ------------------------------------------------------------------------------------------------
# Worker: one implementation in its own process; prints one JSON line.


def _build(spec: dict, vocab_size: int, max_length: int):
  """(graphdef, params, optimizer, optimizer state, jitted train step) for `spec`."""
  import jax
  import optax
  from flax import nnx

  from flaxattn.models import EncoderClassifier
  from flaxattn.nn import TransformerConfig

  config = TransformerConfig(vocab_size=vocab_size, max_length=max_length, **MODEL,
                             **model_overrides(spec["implementation"], spec))
  model = EncoderClassifier(config, NUM_CLASSES, pooling="mean", rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  # Warm-up then cosine decay over the ListOps budget (what `experiments/listops.py` uses), with
  # gradient clipping; the speed runs time the same update.
  steps = spec.get("listops_steps", 100)
  schedule = optax.warmup_cosine_decay_schedule(0.0, spec.get("learning_rate", 1e-3),
                                                max(1, steps // 10), steps)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.adamw(schedule, weight_decay=0.01))

  def loss_fn(params, ids, mask, labels, rng):
    # deterministic=False with a key: Performer draws fresh features every step (dropout is 0).
    logits = nnx.merge(graphdef, params)(ids, mask, deterministic=False, dropout_rng=rng)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def train_step(params, opt_state, ids, mask, labels, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, labels, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def predict(params, ids, mask):
    return nnx.merge(graphdef, params)(ids, mask).argmax(-1)

  return params, optimizer.init(params), train_step, predict


def _speed(spec: dict, baseline: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  length, batch = spec["length"], spec["batch"]
  params, opt_state, train_step, _ = _build(spec, vocab_size=32, max_length=length)
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 32, size=(batch, length)), jnp.int32)
  mask = jnp.ones((batch, length), jnp.int32)
  labels = jnp.asarray(rng.integers(0, NUM_CLASSES, size=(batch,)), jnp.int32)
  state = dict(params=params, opt_state=opt_state, step=0)

  def step():
    state["params"], state["opt_state"], loss = train_step(
        state["params"], state["opt_state"], ids, mask, labels, jax.random.key(state["step"]))
    state["step"] += 1
    loss.block_until_ready()

  start = time.perf_counter()
  step()  # Compiles.
  first = time.perf_counter() - start
  reset_peak_rss()
  seconds = median_seconds(step, spec["repeats"])
  return dict(seconds=seconds, first_step_seconds=first, peak_bytes=peak_rss_bytes() - baseline)


def listops_data(spec: dict):
  """Tokenised ListOps: train ids, mask, labels, test ids, mask, labels (int32 `[n, length]` and
  `[n]`), and the vocabulary size (id 0 is padding)."""
  import numpy as np

  from flaxattn.data import synthetic

  vocabulary = {token: index + 1 for index, token in enumerate(synthetic.LISTOPS_TOKENS)}  # 0: pad
  length = spec["listops_length"]
  kwargs = dict(seed=0, min_length=spec["listops_min_length"], max_length=length,
                max_depth=spec["listops_depth"])

  def encode(split, count):
    examples = synthetic.listops(split, count, **kwargs)
    ids = np.zeros((count, length), np.int32)
    labels = np.zeros((count,), np.int32)
    for row in range(count):
      example = examples[row]
      tokens = [vocabulary[token] for token in example["text"].split(" ")]
      ids[row, :len(tokens)] = tokens
      labels[row] = example["label"]
    return ids, (ids > 0).astype(np.int32), labels

  train_count = spec["listops_steps"] * spec["listops_batch"]
  return (*encode("train", train_count), *encode("test", spec["listops_test"]),
          len(vocabulary) + 1)


def _listops(spec: dict) -> dict:
  import jax
  import numpy as np

  train_ids, train_mask, train_labels, test_ids, test_mask, test_labels, vocab_size = (
      listops_data(spec))
  params, opt_state, train_step, predict = _build(spec, vocab_size, spec["listops_length"])
  batch = spec["listops_batch"]
  start = time.perf_counter()
  for step in range(spec["listops_steps"]):
    rows = slice(step * batch, (step + 1) * batch)
    params, opt_state, loss = train_step(params, opt_state, train_ids[rows], train_mask[rows],
                                         train_labels[rows], jax.random.key(step))
    if spec["implementation"] == "ring":
      # Hundreds of queued 8-device programs on a 2-core host ended in an XLA CPU collective
      # rendezvous time-out and an abort (exit -6; `flaxattn.train.evaluate` waits likewise): one
      # step in flight at a time.
      loss.block_until_ready()
  final_loss = float(loss)
  train_seconds = time.perf_counter() - start
  predictions = np.concatenate([
      np.asarray(predict(params, test_ids[i:i + 64], test_mask[i:i + 64]))
      for i in range(0, len(test_ids), 64)])
  majority = np.bincount(train_labels, minlength=NUM_CLASSES).argmax()
  return dict(accuracy=float((predictions == test_labels).mean()),
              majority_accuracy=float((test_labels == majority).mean()),
              final_train_loss=final_loss, train_seconds=train_seconds)


def run_worker(spec: dict) -> None:
  import jax

  import flaxattn.models  # noqa: F401  (imported before the baseline is taken)

  jax.devices()
  baseline = reset_peak_rss()
  task = _speed if spec["task"] == "speed" else (lambda spec, _: _listops(spec))
  try:
    if spec["implementation"] == "ring":
      from flax import nnx

      mesh = jax.make_mesh((RING_DEVICES,), ("context",),
                           axis_types=(jax.sharding.AxisType.Explicit,))
      # The ring runs over the mesh axis the logical rules give the sequence (as in training).
      with jax.set_mesh(mesh), nnx.logical_axis_rules([("length", "context")]):
        result = task(spec, baseline)
    else:
      result = task(spec, baseline)
  except Exception as error:  # noqa: BLE001  (XLA reports failed allocations as runtime errors)
    result = dict(status=attention_benchmark.failure_status(error))
  print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# Driver


def unavailable(implementation: str) -> str | None:
  """Why `implementation` cannot run in this checkout, or None."""
  if implementation != "ring":
    return None
  from flaxattn.attention import implementations

  if "ring" not in implementations():
    return "not available: implementation 'ring' is not registered in this checkout"
  return None


def dense_estimate(implementation: str, length: int, batch: int) -> float | None:
  per_score = DENSE_BYTES_PER_SCORE.get(implementation)
  if per_score is None:
    return None
  return float(MODEL["num_layers"] * batch * MODEL["num_heads"] * length * length * per_score)


def run_subprocess(spec: dict, timeout: float) -> dict:
  """Runs one worker; its result, or a status saying how it ended."""
  extra_env = {}
  if spec["implementation"] == "ring":
    extra_env["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={RING_DEVICES}"]))
  reports, ended = attention_benchmark.run_worker_process(pathlib.Path(__file__), spec, timeout,
                                                          extra_env)
  return reports[-1] if reports else dict(status=ended)


def _cell(result: dict, field: str, scale: float, digits: int) -> str:
  return f"{result[field] * scale:,.{digits}f}" if field in result else result.get("status", "-")


def markdown(report: dict) -> str:
  lengths = report["lengths"] if report["speed"] else []
  lines = [] if not lengths else ["## Training-step time (ms, median) and peak memory (MiB)", "",
           "| implementation | " + " | ".join(f"{n} ms | {n} MiB" for n in lengths) + " |",
           "|---|" + "---:|---:|" * len(lengths)]
  for name, row in report["speed"].items():
    cells = []
    for n in lengths:
      result = row[str(n)]
      cells += [_cell(result, "seconds", 1e3, 0),
                _cell(result, "peak_bytes", 1 / 2**20, 0) if "seconds" in result else "-"]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  dense = report["speed"].get("xla", {})
  ratios = []
  for name in ("local", "linear", "performer", "blockwise"):
    for n in lengths:
      ours, theirs = report["speed"].get(name, {}).get(str(n), {}), dense.get(str(n), {})
      if "seconds" in ours and "seconds" in theirs:
        ratios.append(f"{name} {n}: {theirs['seconds'] / ours['seconds']:.1f}x")
  if ratios:
    lines += ["", "Speed-up over dense xla: " + ", ".join(ratios) + "."]
  if report.get("listops"):
    lines += ["", f"## ListOps accuracy ({report['listops_budget']})", "",
              "| implementation | test accuracy | majority class | final train loss | train s |",
              "|---|---:|---:|---:|---:|"]
    for name, result in report["listops"].items():
      if "accuracy" in result:
        lines.append(f"| {name} | {result['accuracy']:.3f} | {result['majority_accuracy']:.3f} | "
                     f"{result['final_train_loss']:.3f} | {result['train_seconds']:.0f} |")
      else:
        lines.append(f"| {name} | {result['status']} | | | |")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for axis, (field, scale, title) in zip(axes, (
      ("seconds", 1.0, "training-step time (s)"), ("peak_bytes", 1 / GiB, "peak memory (GiB)"))):
    for name, row in report["speed"].items():
      points = [(int(n), result[field] * scale) for n, result in row.items() if field in result]
      if points:
        lengths, values = zip(*points)
        axis.plot(lengths, [max(v, 1e-6) for v in values], marker="o", label=name)
    axis.set(xscale="log", yscale="log", xlabel="sequence length", title=title)
    axis.set_xscale("log", base=2)
    axis.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize="small")
  figure.suptitle(f"EncoderClassifier {MODEL['num_layers']} layers, d_model {MODEL['d_model']}, "
                  f"{MODEL['num_heads']} heads, batch {report['batch']}, float32, AdamW step")
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="tiny settings to try the script")
  parser.add_argument("--impls", default=",".join(IMPLEMENTATIONS),
                      help=f"comma-separated, from {IMPLEMENTATIONS}")
  parser.add_argument("--lengths", help="comma-separated (default 1024,2048,4096,8192,16384)")
  parser.add_argument("--batch", type=int, default=1, help="speed batch size")
  parser.add_argument("--repeats", type=int, help="timed steps after warm-up (default 3; quick 2)")
  parser.add_argument("--timeout", type=float, help="seconds per subprocess (default 600; quick 180)")
  parser.add_argument("--budget", type=float,
                      help="seconds for the whole run: what would start after it is reported as "
                      "not run (default: no limit)")
  parser.add_argument("--window", type=int, default=128,
                      help="'local': TransformerConfig.window (each token sees 2 * window - 1)")
  parser.add_argument("--performer-features", type=int, default=64)
  parser.add_argument("--no-listops", action="store_true", help="skip the ListOps accuracy runs")
  parser.add_argument("--no-speed", action="store_true", help="skip the step time / memory runs")
  parser.add_argument("--listops-length", type=int, help="longest example (default 256; quick 64)")
  parser.add_argument("--listops-min-length", type=int, help="shortest (default 32; quick 8)")
  parser.add_argument("--listops-depth", type=int, default=6, help="ListOps max_depth")
  parser.add_argument("--listops-steps", type=int, help="training steps (default 1000; quick 20)")
  parser.add_argument("--listops-batch", type=int, default=32)
  parser.add_argument("--listops-test", type=int, help="test examples (default 1000; quick 64)")
  parser.add_argument("--out", type=pathlib.Path,
                      default=REPO_ROOT / "benchmarks" / "results" / "long_range")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  quick = args.quick
  pick = lambda value, full, small: value if value is not None else (small if quick else full)
  args.lengths = attention_benchmark.parse_lengths(
      parser, args.lengths, [256, 512] if quick else [1024, 2048, 4096, 8192, 16384])
  args.repeats = pick(args.repeats, 3, 2)
  args.timeout = pick(args.timeout, 600.0, 180.0)
  args.listops_length = pick(args.listops_length, 256, 64)
  args.listops_min_length = pick(args.listops_min_length, 32, 8)
  args.listops_steps = pick(args.listops_steps, 1000, 20)
  args.listops_test = pick(args.listops_test, 1000, 64)
  args.impls = args.impls.split(",")
  unknown = sorted(set(args.impls) - set(IMPLEMENTATIONS))
  if unknown:
    parser.error(f"--impls: unknown {unknown}; choose from {IMPLEMENTATIONS}")
  attention_benchmark.require_positive(
      parser, repeats=args.repeats, timeout=args.timeout, lengths=args.lengths, window=args.window,
      performer_features=args.performer_features, listops_steps=args.listops_steps,
      listops_batch=args.listops_batch, listops_test=args.listops_test)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.worker:
    run_worker(json.loads(args.worker))
    return {}
  import jax

  start_load = [round(x, 2) for x in os.getloadavg()]
  common = dict(window=args.window, performer_features=args.performer_features)
  deadline = time.monotonic() + args.budget if args.budget else None

  def budget_left() -> float:
    """Seconds a subprocess may take now (the time-out, cut to what is left of `--budget`)."""
    return args.timeout if deadline is None else min(args.timeout, deadline - time.monotonic())

  def run(spec: dict) -> dict:
    limit = budget_left()
    if limit < 10:
      return dict(status=f"not run: the --budget of {args.budget:g}s was spent")
    result = run_subprocess(spec, limit)
    if result.get("status", "").startswith("timeout") and limit < args.timeout:
      result["status"] += " (cut by --budget)"
    return result

  listops = {}
  budget = (f"{args.listops_steps} AdamW steps of batch {args.listops_batch}, examples of "
            f"{args.listops_min_length}-{args.listops_length} tokens, max_depth "
            f"{args.listops_depth}, {args.listops_test} test examples")
  if not args.no_listops:
    for name in args.impls:
      listops[name] = (dict(status=unavailable(name)) if unavailable(name) else run(
          dict(task="listops", implementation=name, listops_length=args.listops_length,
               listops_min_length=args.listops_min_length, listops_depth=args.listops_depth,
               listops_steps=args.listops_steps, listops_batch=args.listops_batch,
               listops_test=args.listops_test, **common)))
      result = listops[name]
      print(f"{name:>10} ListOps: " + (f"accuracy {result['accuracy']:.3f}" if "accuracy" in result
                                       else result["status"]), flush=True)

  # Shortest lengths first for every implementation, so that a spent budget cuts the longest; an
  # implementation that failed at one length is not tried at longer ones.
  speed = {} if args.no_speed else {name: {} for name in args.impls}
  failed_at = {}
  for length in [] if args.no_speed else sorted(args.lengths):
    for name in args.impls:
      estimate = dense_estimate(name, length, args.batch)
      if unavailable(name):
        result = dict(status=unavailable(name))
      elif name in failed_at:
        result = dict(status=f"not run: failed at {failed_at[name]}")
      elif estimate is not None and estimate > available_bytes():
        result = dict(status=f"OOM (estimated {estimate / GiB:.1f} GiB)")
      else:
        result = run(dict(task="speed", implementation=name, length=length, batch=args.batch,
                          repeats=args.repeats, **common))
      failed = "seconds" not in result and not result["status"].startswith("not run")
      if failed and "cut by --budget" not in result["status"] and not unavailable(name):
        failed_at.setdefault(name, length)
      speed[name][str(length)] = result
      print(f"{name:>10} {length:>6}: " + (
          f"{result['seconds'] * 1e3:,.0f} ms, {result['peak_bytes'] / 2**20:,.0f} MiB"
          if "seconds" in result else result["status"]), flush=True)

  load = os.getloadavg()
  report = dict(
      model=MODEL, batch=args.batch, lengths=args.lengths, repeats=args.repeats,
      timeout_s=args.timeout, budget_s=args.budget, window=args.window,
      performer_features=args.performer_features, listops_budget=budget,
      environment=dict(python=sys.version.split()[0], jax=jax.__version__, cores=cpu_cores(),
                       load_average_at_start=start_load,
                       load_average_at_end=[round(x, 2) for x in load]),
      speed=speed, listops=listops)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
  (args.out / "results.md").write_text(
      f"# Long-range attention benchmark\n\nModel {MODEL}, batch {args.batch}, float32, one AdamW "
      f"step; medians of {args.repeats} after a warm-up; local window {args.window} (each token "
      f"sees {2 * args.window - 1}); Performer {args.performer_features} features; {cpu_cores()} "
      f"cores, 1-minute load average {start_load[0]:.1f} at the start, {load[0]:.1f} at the "
      f"end.\n\n{markdown(report)}")
  if speed:
    plot(report, args.out / "results.png")
  return report


if __name__ == "__main__":
  main()
