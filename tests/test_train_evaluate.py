"""`flaxattn.train.evaluate`: classification evaluation runs the model once per batch and gives the
metrics of an independent computation from the model's own logits."""

from __future__ import annotations

import types

import jax
import numpy as np
from flax import nnx

from flaxattn import parallel
from flaxattn.models import EncoderClassifier
from flaxattn.nn import TransformerConfig
from flaxattn.train import metrics as task_metrics
from flaxattn.train.evaluate import Evaluator
from flaxattn.train.losses import classification_loss
from flaxattn.train.step import init_train_state, jit_steps, make_eval_step, make_train_step

import optax

CONFIG = TransformerConfig(vocab_size=12, d_model=16, num_heads=2, mlp_dim=32, num_layers=1,
                           max_length=8)
CLASSES, BATCH, LENGTH = 3, 8, 6


def _batches(seed=0, count=2):
  rng = np.random.default_rng(seed)
  batches = []
  for index in range(count):
    mask = (np.arange(LENGTH) < rng.integers(1, LENGTH + 1, (BATCH, 1))).astype(np.int32)
    weights = np.ones(BATCH, np.float32)
    if index == count - 1:
      weights[-3:] = 0.0  # The last batch is padded with weight-0 rows, as eval splits are.
    batches.append({"inputs": rng.integers(0, CONFIG.vocab_size, (BATCH, LENGTH)).astype(np.int32),
                    "mask": mask, "labels": rng.integers(0, CLASSES, BATCH).astype(np.int32),
                    "weights": weights})
  return batches


def test_classification_eval_is_one_forward_pass_with_the_reference_metrics(monkeypatch):
  mesh = parallel.make_mesh({"data": 2, "tensor": 2}, jax.devices()[:4])
  rules = parallel.make_rules("fsdp_tp")
  make_model = lambda rngs: EncoderClassifier(CONFIG, CLASSES, rngs=rngs)
  tx = optax.sgd(0.1)
  graphdef, state, shardings = init_train_state(make_model, tx, 0, mesh, rules)
  batches = _batches()
  batch_shardings = parallel.batch_shardings({k: v.shape for k, v in batches[0].items()}, mesh,
                                             rules)
  _, eval_step = jit_steps(
      make_train_step(graphdef, tx, classification_loss, optax.constant_schedule(0.1)),
      make_eval_step(graphdef, classification_loss, predictions=True), shardings,
      batch_shardings, mesh, rules)

  calls = []
  forward = EncoderClassifier.__call__
  monkeypatch.setattr(EncoderClassifier, "__call__",
                      lambda self, *args, **kwargs: calls.append(1) or forward(self, *args, **kwargs))
  evaluator = Evaluator("classification", lambda split: batches,
                        types.SimpleNamespace(class_names=("a", "b", "c")), graphdef, eval_step,
                        batch_shardings, mesh, rules, batch_size=BATCH)
  evaluation = evaluator.evaluate(state.params, "validation")
  # Traced once (both batches share one compilation), and that trace runs the model once.
  assert len(calls) == 1
  assert evaluation.outputs == ()

  model = nnx.merge(graphdef, jax.device_get(state.params))
  logits = np.concatenate([np.asarray(model(b["inputs"], b["mask"]), np.float64) for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  keep = np.concatenate([b["weights"] for b in batches]) > 0
  logits, labels = logits[keep], labels[keep]
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  predicted = logits.argmax(-1)
  metrics = evaluation.metrics
  assert metrics["examples"] == keep.sum() == 13
  np.testing.assert_allclose(metrics["loss"], -log_probs[np.arange(len(labels)), labels].mean(),
                             rtol=1e-5)
  assert metrics["accuracy"] == (predicted == labels).mean()
  assert metrics["macro_f1"] == task_metrics.macro_f1(predicted, labels, CLASSES)
