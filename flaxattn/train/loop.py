"""The training loop: a validated config and a workdir in, a trained, checkpointed model out.

`train_and_evaluate(config, workdir)` builds the mesh, the sharded state (or restores the newest
checkpoint in `WORKDIR/checkpoints`), jits the steps once, and runs to `config.steps`. Metrics stay
on the devices between log steps: the host waits for the devices only to log (every
`config.log_every` steps), to evaluate, and to check the loss before a checkpoint. Each log line
goes to `WORKDIR/metrics.jsonl`, TensorBoard (`WORKDIR/tensorboard`) and a progress bar (step, loss,
tokens/s, ETA), with throughput over the interval (the first one includes compilation): real
(non-padding) input tokens per second, all input positions per second, and MFU: model FLOPs
(`flops.train_flops`: matmuls on real tokens) per second over the devices' matmul rate measured at
startup. Each phase prints one line (`flaxattn.train.console`, process 0), and a finished run
ends with the summary block (`console.summary_lines`) on stdout.

SIGTERM (on any process) finishes the current step, saves it, and returns, with no evaluation or
report; every process stops at the same step (`_Preemption`). A rerun of the same command resumes
bit for bit. A workdir holding a run with another config (outside `config.RESUMABLE_KEYS`) is
refused before anything is written; `restart=True` (`--restart`) moves that run aside instead.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from flaxattn import parallel
from flaxattn.train import console
from flaxattn.config import config_changes, parse_checkpoint
from flaxattn.files import write_atomically
from flaxattn.train.checkpoint import Checkpointer, abstract_like
from flaxattn.train.evaluate import prefixed
from flaxattn.train.flops import measured_peak_flops
from flaxattn.train.metrics import is_metric
from flaxattn.train.optim import make_optimizer, make_schedule
from flaxattn.train.run import build_run, evaluate_during_training, write_final_report
from flaxattn.train.step import init_train_state, jit_steps, make_train_step


class RunRefused(ValueError):
  """The workdir or config.checkpoint does not fit this run; raised before anything is written."""


class _Preemption:
  """SIGTERM (a preemption notice) as a stop at one step that every process agrees on.

  With several processes, JAX's preemption service (started by `jax.distributed.initialize`, on by
  default: `jax_enable_preemption_service`) catches SIGTERM on any of them, tells the others, and
  sets the stop one step past the furthest process; `reached(step)` (Orbax's
  `CheckpointManager.reached_preemption`, i.e. `multihost_utils.reached_preemption_sync_point`)
  turns true at that step on every process, so all save the same step and none waits on the others
  forever. It must be called at every step, starting from the same step on every process. One
  process alone catches the signal itself: the stop is the step after it arrives.
  """

  def __init__(self, manager):
    self.manager = manager
    self.shared = jax.process_count() > 1
    self.received_at = None  # time.monotonic() of a SIGTERM, one process alone.

  def __enter__(self):
    if not self.shared:
      self.previous = signal.signal(signal.SIGTERM, self._handle)
    elif not jax.config.jax_enable_preemption_service:
      logging.warning("jax_enable_preemption_service is off: SIGTERM ends this %d-process run "
                      "without a checkpoint", jax.process_count())
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
    self.received_at = time.monotonic()

  def reached(self, step: int) -> bool:
    """Whether training stops (and saves) after `step`."""
    if self.shared:
      return self.manager.reached_preemption(step)
    return self.received_at is not None

  def __exit__(self, *exc):
    if not self.shared:
      signal.signal(signal.SIGTERM, self.previous)


def _claim_workdir(config, workdir: str, restart: bool) -> None:
  """Refuses (ValueError, before anything is written) to continue the run in `workdir` when its
  `config.json` differs from `config` outside `RESUMABLE_KEYS`. With `restart`, a run already there
  is moved whole to `WORKDIR.old-N` (the first free N) and training starts over."""
  saved = os.path.join(workdir, "config.json")
  if restart:
    if jax.process_index() == 0 and os.path.isdir(workdir) and os.listdir(workdir):
      aside = next(f"{workdir.rstrip(os.sep)}.old-{n}" for n in itertools.count(1)
                   if not os.path.exists(f"{workdir.rstrip(os.sep)}.old-{n}"))
      os.replace(workdir, aside)
      logging.warning("--restart: the run in %s moved to %s", workdir, aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("workdir moved aside")
    return
  if os.path.isfile(saved):
    with open(saved) as f:
      changes = config_changes(json.load(f), config)
    if changes:
      raise RunRefused(
          f"--workdir={workdir} holds a run with another config ({'; '.join(changes)}; old -> "
          "new); nothing was changed. Resume it with its config, train in a new --workdir, or "
          "give --restart to move that run to WORKDIR.old-N and start over")


def _write_summary(run, workdir: str) -> None:
  """The model summary (`Run.summary`): on the console a line per top-level module (the first two
  parts of the modules' paths), the full table (a row per parameter) in `WORKDIR/summary.txt`.
  Process 0 only."""
  if jax.process_index() != 0:
    return
  model_summary = run.summary()
  path = os.path.join(workdir, "summary.txt")
  write_atomically(path, lambda f: f.write(model_summary.table("param") + "\n"))
  groups: dict[str, list[int]] = {}
  for row in model_summary.rows:
    module = row.path.split("/")[:-1] or [row.path]  # Its module's path, at most two parts.
    totals = groups.setdefault("/".join(module[:2]), [0, 0])
    totals[0], totals[1] = totals[0] + row.count, totals[1] + row.bytes
  flops = model_summary.flops_per_token
  console.say(f"model: {model_summary.total_params:,} parameters "
              f"({model_summary.total_bytes / 2**20:.1f} MiB)"
              + (f", {flops / 1e6:.3g} MFLOP per token forward" if flops else "")
              + f"; full table in {path}")
  width = max(map(len, groups))
  for name, (count, size) in groups.items():
    console.say(f"  {name:<{width}}  {count:>12,}  {size / 2**20:8.2f} MiB")
  logging.info("model:\n%s", model_summary)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# Per-step counts (`Run.batch_counts`, the loss weight `tokens`): summed into rates, not logged.
_COUNTS = ("tokens", "model_flops", "real_tokens", "padded_tokens")


def _rates(fetched: list[dict], elapsed: float, peak_flops: float) -> dict[str, float]:
  """A log line's train metrics from the interval's step metrics: the last step's values, and
  rates over the interval (`elapsed` seconds): `tokens_per_s` (real, non-padding input tokens),
  `padded_tokens_per_s` (every input position), `steps_per_s`, and `mfu` (model FLOPs per second
  over `peak_flops`)."""
  total = lambda name: sum(float(m[name]) for m in fetched)
  return {**{name: float(value) for name, value in fetched[-1].items() if name not in _COUNTS},
          "tokens_per_s": total("real_tokens") / elapsed,
          "padded_tokens_per_s": total("padded_tokens") / elapsed,
          "steps_per_s": len(fetched) / elapsed,
          "mfu": total("model_flops") / elapsed / peak_flops}


def _write_metrics(path: str, record: dict, board: SummaryWriter | None) -> None:
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and is_metric(name):  # Counters stay in the file only.
        board.add_scalar(name, value, record["step"])
    board.flush()


def _truncate_metrics(path: str, after_step: int) -> None:
  """Drops lines logged after `after_step` (by a run that died before its next checkpoint), so a
  resumed run's file reads as if it had never stopped."""
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if json.loads(line)["step"] <= after_step]
  with open(path, "w") as f:
    f.writelines(lines)


def train_and_evaluate(config, workdir: str, *, restart: bool = False) -> dict:
  """Trains per `config` (already `flaxattn.config.validate`d), writing to `workdir`.

  A run already in `workdir` is resumed from its newest readable checkpoint when its config
  matches (`_claim_workdir`; `restart` moves it aside instead); a checkpoint that does not fit the
  model and optimizer raises `CheckpointMismatch` before anything is written. The final report
  evaluates the parameters of `config.checkpoint`.

  Returns the last logged metrics (a dict of floats, with `step`; after the final evaluation also
  `test_*` metrics when `config.eval.test`).
  """
  console.start_clock()
  _claim_workdir(config, workdir, restart)
  report_checkpoint = parse_checkpoint(config.checkpoint)
  if isinstance(report_checkpoint, int) and report_checkpoint > config.steps:
    raise RunRefused(f"config.checkpoint={config.checkpoint!r} is past config.steps={config.steps}")
  os.makedirs(workdir, exist_ok=True)
  run = build_run(config, workdir)
  mesh, rules = run.mesh, run.rules
  _write_summary(run, workdir)

  schedule = make_schedule(config.schedule.name, config.optimizer.learning_rate, steps=config.steps,
                           warmup_steps=config.schedule.warmup_steps,
                           end_factor=config.schedule.end_factor)
  opt = config.optimizer
  tx = make_optimizer(opt.name, schedule, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
                      eps=opt.eps, momentum=opt.momentum, clip_norm=opt.clip_norm or None)
  graphdef, state, state_shardings = init_train_state(run.make_model, tx, config.seed, mesh, rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  peak_flops = measured_peak_flops(mesh)
  logging.info("%d parameters, measured peak %.3g FLOP/s", num_params, peak_flops)
  axes = " x ".join(f"{name} {size}" for name, size in mesh.shape.items() if size > 1)
  console.say(f"mesh: {axes or 'one device'}; measured peak {peak_flops:.3g} FLOP/s")
  train_data = run.train_iterator()
  batch_shardings = run.batch_shardings
  train_step, eval_step = jit_steps(
      make_train_step(graphdef, tx, run.loss_fn, schedule, grad_accum_steps=config.grad_accum_steps,
                      batch_counts=run.batch_counts),
      run.eval_step(graphdef), state_shardings, batch_shardings, mesh, rules)
  evaluator = run.evaluator(graphdef, eval_step)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  checkpoints = Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
      best_metric=config.best_checkpoint_metric, best_mode=config.best_checkpoint_mode,
      preserve_steps=(report_checkpoint,) if isinstance(report_checkpoint, int) else ())
  abstract_state = abstract_like(state, state_shardings)
  # Nothing has been written yet: a checkpoint that does not fit raises here.
  restored = checkpoints.restore_latest(abstract_state)
  if restored is not None:
    state, data_state = restored
    train_data.set_state(data_state)
    logging.info("resumed from step %d (data %s)", int(state.step), data_state)
    console.say(f"resumed from the checkpoint of step {int(state.step)} in {workdir}")
  else:
    state = run.with_pretrained(state, state_shardings)
  step = int(state.step)
  if (isinstance(report_checkpoint, int) and report_checkpoint not in checkpoints.steps() and
      (report_checkpoint <= step or report_checkpoint % config.checkpoint_every and
       report_checkpoint != config.steps)):
    raise RunRefused(f"config.checkpoint={config.checkpoint!r}: no such checkpoint in {workdir} "
                     f"(available steps: {checkpoints.steps()}) and this run will not save one "
                     f"(every {config.checkpoint_every} steps and at step {config.steps})")
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
    logging.info("mesh %s; rules %s", dict(mesh.shape), rules)
  _truncate_metrics(metrics_path, step)

  record = {}
  pending = []  # This log interval's metrics, still on the devices.
  interval_start = time.perf_counter()
  console.say(f"training to step {config.steps} (compiling first)" if step < config.steps else
              f"trained to step {step} already")
  progress = console.progress(total=config.steps, desc="train", unit="step", leave=True,
                              initial=step)
  board = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  stopping = False
  with _Preemption(checkpoints.manager) as preemption, progress:
    preemption.reached(step)  # Every process has a step on record from the start.
    while step < config.steps and not stopping:
      state, metrics = train_step(state, parallel.global_batch(next(train_data), batch_shardings))
      step += 1
      pending.append(metrics)
      # Asked once a step: a SIGTERM arriving later in this iteration stops after the next one.
      # A stop neither evaluates nor reports: a preemption notice leaves seconds to save.
      stopping = preemption.reached(step)
      last = step == config.steps
      evaluating = not stopping and (
          last or bool(config.eval_every) and step % config.eval_every == 0)
      if step % config.log_every == 0 or last or stopping or evaluating:
        fetched = jax.device_get(pending)
        elapsed = time.perf_counter() - interval_start
        record = {"step": step, **_rates(fetched, elapsed, peak_flops)}
        tokens_per_s = record["tokens_per_s"]
        if not math.isfinite(record["loss"]):
          checkpoints.wait()
          raise FloatingPointError(
              f"loss is {record['loss']} at step {step}; the last good checkpoint is step "
              f"{checkpoints.manager.latest_step()} in {workdir}/checkpoints")
        if evaluating:
          record.update(prefixed(evaluate_during_training(
              run, evaluator, state.params, step=step, board=board, final=last),
              "eval"))
        _write_metrics(metrics_path, record, board)
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tokens_per_s=f"{tokens_per_s:.0f}")
        logging.debug("step %d: %s", step, record)
        pending, interval_start = [], time.perf_counter()
      if step % config.checkpoint_every == 0 or last or stopping:
        if not bool(_all_finite(state.params)):
          raise FloatingPointError(
              f"parameters are not finite after step {step}; not saving them, the last good "
              f"checkpoint is step {checkpoints.manager.latest_step()} in {workdir}/checkpoints")
        evaluated = {k: v for k, v in record.items() if k.startswith("eval_")} if evaluating else None
        checkpoints.save(step, state, train_data.get_state(), metrics=evaluated)
    checkpoints.wait()  # Still under the SIGTERM handler: the last save is not cut short.
  if stopping:
    if preemption.received_at is not None:
      logging.warning("stopped at step %d, saved %.1f s after SIGTERM", step,
                      time.monotonic() - preemption.received_at)
    else:
      logging.warning("preempted: stopped at step %d on every process, saved", step)
  elif step == config.steps:
    if not any(key.startswith("eval_") for key in record):  # Resumed at the end: evaluate now.
      record = {"step": step, **prefixed(
          evaluate_during_training(run, evaluator, state.params, step=step, final=True), "eval")}
    params, used = state.params, step
    if report_checkpoint != "latest":
      used = checkpoints.select(report_checkpoint)
      params = checkpoints.restore(used, abstract_state)[0].params
    record.update(write_final_report(run, evaluator, params, workdir, record, board,
                                     checkpoint=f"{config.checkpoint} (step {used})"))
  checkpoints.close()
  if board is not None:
    board.close()
  if step == config.steps and not stopping:
    console.print_summary(record, title=f"{config.data.name} ({run.kind})", workdir=workdir,
                          seconds=console.elapsed(),
                          checkpoint=f"{config.checkpoint}, step {used}")
  return record
