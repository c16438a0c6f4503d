"""Learning-rate schedules and optax optimizers, with weight decay that skips norms and biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "warmup_cosine", "warmup_linear", "inverse_sqrt")
OPTIMIZERS = ("adamw", "adafactor", "sgd", "lion")
# Parameters named so are norm scales, norm/projection biases: decaying them toward 0 only hurts.
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(name: str, learning_rate: float, *, steps: int, warmup_steps: int,
                  end_factor: float = 0.0) -> optax.Schedule:
  """Learning rate as a function of the step (0-based).

  'constant': `learning_rate` throughout (after a linear warmup when `warmup_steps > 0`).
  'warmup_cosine': linear warmup from 0 to `learning_rate` over `warmup_steps`, then cosine decay to
    `end_factor * learning_rate` at `steps`.
  'warmup_linear': the same with a linear decay.
  'inverse_sqrt': "Attention Is All You Need": linear warmup, then `learning_rate *
    sqrt(warmup_steps / step)`; the paper's `d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)` is
    this with `learning_rate = (d_model * warmup_steps)**-0.5` (steps counted from 1 there, 0 here).
  """
  if name not in SCHEDULES:
    raise ValueError(f"config.schedule.name must be one of {SCHEDULES}, got {name!r}")
  if warmup_steps < 0 or (name == "inverse_sqrt" and warmup_steps == 0):
    raise ValueError(
        f"config.schedule.warmup_steps must be >= 0 (> 0 for 'inverse_sqrt'), got {warmup_steps}")
  warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  decay_steps = max(steps - warmup_steps, 1)
  if name == "constant":
    after = optax.constant_schedule(learning_rate)
  elif name == "warmup_cosine":
    after = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=end_factor)
  elif name == "warmup_linear":
    after = optax.linear_schedule(learning_rate, end_factor * learning_rate, decay_steps)
  else:
    return lambda step: learning_rate * jnp.minimum(
        step / warmup_steps, jnp.sqrt(warmup_steps / jnp.maximum(step, 1)))
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params):
  """True for each parameter that weight decay applies to (not norm scales or biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in NO_DECAY_NAMES, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, momentum: float = 0.9,
                   clip_norm: float | None = None) -> optax.GradientTransformation:
  """An optax optimizer: gradients clipped to global norm `clip_norm` (None: not clipped), then
  'adamw' (`b1`, `b2`, `eps`), 'adafactor' (factored second moments, relative step sizes scaled by
  the schedule), 'sgd' (heavy-ball `momentum`; decay added to the gradient, classic L2) or 'lion'
  (`b1`, `b2`). Weight decay (decoupled and scaled by the learning rate, except for 'sgd') skips
  the parameters `decay_mask` excludes.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {name!r}")
  if clip_norm is not None and clip_norm <= 0:
    raise ValueError(f"config.optimizer.clip_norm must be positive or None, got {clip_norm}")
  if name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "adafactor":
    tx = optax.adafactor(schedule, weight_decay_rate=weight_decay or None,
                         weight_decay_mask=decay_mask)
  elif name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask),
                     optax.sgd(schedule, momentum=momentum or None))
  else:
    tx = optax.lion(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask)
  return tx if clip_norm is None else optax.chain(optax.clip_by_global_norm(clip_norm), tx)
