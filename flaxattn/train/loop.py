"""The training loop: a validated config and a workdir in, a trained, checkpointed model out.

`train_and_evaluate(config, workdir)` builds the mesh, the sharded state (or restores the newest
checkpoint in `WORKDIR/checkpoints`), jits the steps once, and runs to `config.steps`. Metrics stay
on the devices between log steps: the host waits for the devices only to log (every
`config.log_every` steps), to evaluate, and to check the loss before a checkpoint. Each log line
goes to `WORKDIR/metrics.jsonl`, TensorBoard (`WORKDIR/tensorboard`) and a progress bar (step, loss, tokens/s, ETA), with throughput over the interval (the first one includes
compilation) and MFU: model FLOPs (`flops.train_flops_per_token`) per second over the devices'
matmul rate measured at startup. SIGTERM finishes the current step, saves, and returns.
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

from flaxattn import parallel
from flaxattn.train.checkpoint import Checkpointer, abstract_like
from flaxattn.train.evaluate import prefixed
from flaxattn.train.flops import measured_peak_flops, train_flops_per_token
from flaxattn.train.optim import make_optimizer, make_schedule
from flaxattn.train.run import build_run, write_final_report
from flaxattn.train.step import init_train_state, jit_steps, make_eval_step, make_train_step


class _Preemption:
  """Records SIGTERM (while active) instead of dying, so the loop can save first."""

  def __init__(self):
    self.requested = False

  def __enter__(self):
    self.previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint after this step, then exiting")
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self.previous)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _write_metrics(path: str, record: dict, board: SummaryWriter | None) -> None:
  if jax.process_index() == 0:
    with open(path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step":
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


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` (already `flaxattn.config.validate`d), writing to `workdir`.

  Returns the last logged metrics (a dict of floats, with `step`; after the final evaluation also
  `test_*` metrics when `config.eval.test`).
  """
  os.makedirs(workdir, exist_ok=True)
  run = build_run(config, workdir)
  mesh, rules = run.mesh, run.rules
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json(indent=2, sort_keys=True))
    logging.info("mesh %s; rules %s", dict(mesh.shape), rules)

  schedule = make_schedule(config.schedule.name, config.optimizer.learning_rate, steps=config.steps,
                           warmup_steps=config.schedule.warmup_steps,
                           end_factor=config.schedule.end_factor)
  opt = config.optimizer
  tx = make_optimizer(opt.name, schedule, weight_decay=opt.weight_decay, b1=opt.b1, b2=opt.b2,
                      eps=opt.eps, momentum=opt.momentum, clip_norm=opt.clip_norm or None)
  graphdef, state, state_shardings = init_train_state(run.make_model, tx, config.seed, mesh, rules)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  flops_per_token = train_flops_per_token(run.model_config, num_params, run.seq_len)
  peak_flops = measured_peak_flops(mesh)
  logging.info("%d parameters, %.3g train FLOPs per token, measured peak %.3g FLOP/s", num_params,
               flops_per_token, peak_flops)
  train_data = run.train_iterator()
  batch_shardings = run.batch_shardings
  train_step, eval_step = jit_steps(
      make_train_step(graphdef, tx, run.loss_fn, schedule, grad_accum_steps=config.grad_accum_steps),
      make_eval_step(graphdef, run.loss_fn), state_shardings, batch_shardings, mesh, rules)
  evaluator = run.evaluator(graphdef, eval_step)

  metrics_path = os.path.join(workdir, "metrics.jsonl")
  checkpoints = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                             best_metric=config.best_checkpoint_metric,
                             best_mode=config.best_checkpoint_mode)
  restored = checkpoints.restore_latest(abstract_like(state, state_shardings))
  if restored is not None:
    state, data_state = restored
    train_data.set_state(data_state)
    logging.info("resumed from step %d (data %s)", int(state.step), data_state)
  else:
    state = run.with_pretrained(state, state_shardings)
  step = int(state.step)
  _truncate_metrics(metrics_path, step)

  record = {}
  pending = []  # This log interval's metrics, still on the devices.
  interval_start = time.perf_counter()
  progress = tqdm.tqdm(total=config.steps, initial=step, unit="step", dynamic_ncols=True,
                       disable=jax.process_index() != 0)
  board = SummaryWriter(os.path.join(workdir, "tensorboard")) if jax.process_index() == 0 else None
  with _Preemption() as preemption, progress:
    while step < config.steps:
      state, metrics = train_step(state, parallel.global_batch(next(train_data), batch_shardings))
      step += 1
      pending.append(metrics)
      # Read the flag once: a SIGTERM arriving later in this iteration is handled after the next.
      stopping = preemption.requested
      last = step == config.steps or stopping
      evaluating = last or bool(config.eval_every) and step % config.eval_every == 0
      if step % config.log_every == 0 or last or evaluating:
        fetched = jax.device_get(pending)
        elapsed = time.perf_counter() - interval_start
        tokens_per_s = sum(float(m["tokens"]) for m in fetched) / elapsed
        record = {"step": step, **{name: float(value) for name, value in fetched[-1].items()},
                  "tokens_per_s": tokens_per_s, "steps_per_s": len(fetched) / elapsed,
                  "mfu": tokens_per_s * flops_per_token / peak_flops}
        if not math.isfinite(record["loss"]):
          checkpoints.wait()
          raise FloatingPointError(
              f"loss is {record['loss']} at step {step}; the last good checkpoint is step "
              f"{checkpoints.manager.latest_step()} in {workdir}/checkpoints")
        if evaluating:
          record.update(prefixed(evaluator.evaluate(state.params, step=step, board=board), "eval"))
        _write_metrics(metrics_path, record, board)
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{record['loss']:.4f}", tokens_per_s=f"{tokens_per_s:.0f}")
        logging.debug("step %d: %s", step, record)
        pending, interval_start = [], time.perf_counter()
      if step % config.checkpoint_every == 0 or last:
        if not bool(_all_finite(state.params)):
          raise FloatingPointError(
              f"parameters are not finite after step {step}; not saving them, the last good "
              f"checkpoint is step {checkpoints.manager.latest_step()} in {workdir}/checkpoints")
        evaluated = {k: v for k, v in record.items() if k.startswith("eval_")} if evaluating else None
        checkpoints.save(step, state, train_data.get_state(), metrics=evaluated)
      if stopping:
        break
  checkpoints.wait()
  checkpoints.close()
  if step == config.steps and not preemption.requested:
    record.update(write_final_report(run, evaluator, state.params, workdir, record, board))
  if board is not None:
    board.close()
  return record
