"""Training: optimizers and schedules, losses, the pure train/eval steps."""

from flaxattn.train.checkpoint import Checkpointer, load_params
from flaxattn.train.losses import LOSSES, token_sums
from flaxattn.train.optim import decay_mask, make_optimizer, make_schedule
from flaxattn.train.step import (TrainState, init_train_state, jit_steps, make_eval_step,
                                 make_train_step, metrics_from_sums)

__all__ = ["Checkpointer", "LOSSES", "TrainState", "decay_mask", "init_train_state", "jit_steps",
           "load_params", "make_eval_step", "make_optimizer", "make_schedule", "make_train_step",
           "metrics_from_sums", "token_sums"]
