"""Train state, its sharded creation, and the pure train and eval steps.

The model lives as `(graphdef, params)` from `nnx.split(model, nnx.Param)`: `graphdef` is static and
closed over, `params` an `nnx.State` of plain arrays inside a `TrainState` pytree. The steps are pure
functions `train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch) -> (sums,
outputs)`, jitted once by `jit_steps` with explicit shardings, the train state donated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flaxattn.parallel import create_sharded, like_params, param_shardings
from flaxattn.parallel.rules import Rules
from flaxattn.train.losses import LOSS_SUMS


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (what a checkpoint holds, with the data position).

  Attributes:
    step: int32 `[]`, optimizer steps taken.
    params: `nnx.State` of float32 arrays (the master weights), the model's `nnx.Param`s.
    opt_state: the optax state for `params`.
    rng: uint32 `[2]`, raw key data of the run's base key (each step folds in `step`).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def init_train_state(make_model: Callable[[nnx.Rngs], nnx.Module], tx: optax.GradientTransformation,
                     seed: int, mesh: jax.sharding.Mesh, rules: Rules):
  """Creates the model and optimizer state directly sharded on `mesh`.

  The model is traced abstractly (`nnx.eval_shape`) to read its parameters' shapes and logical axes,
  the shardings follow from `rules`, and then parameters and optimizer state are initialised inside
  one jit with those `out_shardings`, so no device ever holds a full copy.

  Args:
    make_model: `rngs -> module`; its only state must be `nnx.Param`s.
    tx: the optimizer.
    seed: parameters come from `nnx.Rngs(seed)`, the train RNG from `jax.random.key(seed + 1)`.

  Returns:
    `(graphdef, state, shardings)`: the model's static graph, a `TrainState`, and a `TrainState` of
    `NamedSharding`s for it.
  """
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(seed))),
                                        nnx.Param)
  params_sharding = param_shardings(abstract_params, mesh, rules)
  pure_params = nnx.as_pure(abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = TrainState(
      step=replicated, params=params_sharding,
      opt_state=like_params(jax.eval_shape(tx.init, pure_params), pure_params, params_sharding, mesh),
      rng=replicated)

  def init():
    params = nnx.as_pure(nnx.split(make_model(nnx.Rngs(seed)), nnx.Param)[1])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed + 1)))

  return graphdef, create_sharded(init, shardings), shardings


def _microbatches(batch: dict[str, jax.Array], count: int) -> dict[str, jax.Array]:
  """`[batch, ...]` -> `[count, batch // count, ...]`; microbatch `i` takes rows `i, i + count, ...`
  so that each device's rows are spread over all microbatches and no data moves between devices."""
  def split(x):
    if x.shape[0] % count:
      raise ValueError(
          f"the batch size {x.shape[0]} must be divisible by grad_accum_steps={count}")
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, tx: optax.GradientTransformation, loss_fn: Callable,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1,
                    batch_counts: Callable | None = None):
  """The pure step `train_step(state, batch) -> (state, metrics)`.

  The batch is split into `grad_accum_steps` microbatches run in a `lax.scan`; the loss and
  gradient are per-token means over the whole batch (sums over microbatches divided by the total
  weight). Each microbatch gets dropout key `fold_in(fold_in(rng, step), microbatch)`.

  Args:
    graphdef: from `init_train_state`.
    tx: the optimizer.
    loss_fn: `loss_fn(model, batch, dropout_rng=key) -> sums` (see `flaxattn.train.losses`).
    schedule: for the `learning_rate` metric (the optimizer holds its own).
    batch_counts: `batch -> {name: float32 scalar}` of the whole batch, added to the metrics (the
      run's `model_flops`, `real_tokens`, `padded_tokens`: `flaxattn.train.run.Run.batch_counts`).

  Returns metrics (float32 scalars): `loss`, `nll`, `z_loss`, `accuracy` (per token), `tokens`
  (total weight), `grad_norm` (before clipping), `learning_rate` (of this step), and those of
  `batch_counts`.
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def accumulate(carry, inputs):
      grads, sums = carry
      index, microbatch = inputs

      def objective(params):
        micro_sums = loss_fn(nnx.merge(graphdef, params), microbatch,
                             dropout_rng=jax.random.fold_in(step_key, index))
        return micro_sums["loss"], micro_sums

      (_, micro_sums), micro_grads = jax.value_and_grad(objective, has_aux=True)(state.params)
      return (jax.tree.map(jnp.add, grads, micro_grads),
              {name: sums[name] + micro_sums[name] for name in LOSS_SUMS}), None

    zeros = (jax.tree.map(jnp.zeros_like, state.params),
             {name: jnp.zeros((), jnp.float32) for name in LOSS_SUMS})
    (grads, sums), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum_steps), _microbatches(batch, grad_accum_steps)))
    weight = jnp.maximum(sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / weight, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = metrics_from_sums(sums)
    metrics.update(grad_norm=optax.tree.norm(grads),
                   learning_rate=jnp.asarray(schedule(state.step), jnp.float32))
    if batch_counts is not None:
      metrics.update(batch_counts(batch))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def metrics_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Per-token `loss`, `nll`, `z_loss`, `accuracy` and the `tokens` count from loss sums."""
  weight = jnp.maximum(sums["weight"], 1.0)
  return {"loss": sums["loss"] / weight, "nll": sums["nll"] / weight,
          "z_loss": sums["z_loss"] / weight, "accuracy": sums["correct"] / weight,
          "tokens": sums["weight"]}


def make_eval_step(graphdef, loss_fn: Callable, *, predictions: bool = False):
  """The pure step `eval_step(params, batch) -> (sums, outputs)` (dropout off); add the sums of
  several batches and pass them to `metrics_from_sums`.

  `outputs` is `{}`, or with `predictions` (classification) `{'predictions': argmax of the logits,
  'labels', 'weights'}`, each `[batch]`, from the same forward pass as the sums.
  """
  def eval_step(params, batch):
    sums, logits = loss_fn(nnx.merge(graphdef, params), batch, with_logits=True)
    if not predictions:
      return sums, {}
    return sums, {"predictions": jnp.argmax(logits, axis=-1), "labels": batch["labels"],
                  "weights": batch["weights"]}
  return eval_step


def jit_steps(train_step, eval_step, state_shardings: TrainState, batch_shardings, mesh, rules):
  """`train_step` and `eval_step` jitted with explicit shardings (metrics, sums and outputs
  replicated: every process reads the whole global batch's outputs) and
  the train state donated; each call runs with `mesh` set and the logical axis `rules` active, as
  `flaxattn.nn.constrain` needs when the steps are traced."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                  out_shardings=(state_shardings, replicated), donate_argnums=0)
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings.params, batch_shardings),
                     out_shardings=replicated)

  def in_context(jitted):
    @functools.wraps(jitted)
    def call(*args):
      with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return jitted(*args)
    return call

  return in_context(train), in_context(evaluate)
