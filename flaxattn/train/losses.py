"""Losses for language modelling, seq2seq and classification, as sums over weighted tokens.

Every loss function returns sums (`LOSS_SUMS`) rather than means, so that the train step can add
them over gradient-accumulation microbatches and normalise once per token of the whole batch:
`loss = sums['loss'] / sums['weight']` is the same however the batch is split.

Batches (dicts of arrays; `weights` are 1 for a counted target, 0 for padding or a target that
crosses a packed-document boundary):
  lm: `inputs`, `targets`, `weights` int `[batch, length]`; optional `mask` `[batch, length]`
    (1 = real input token; None: all real); packed rows also carry `segment_ids` (1, 2, ... per
    document, 0 = padding) and `positions` (restarting at 0 in each document).
  seq2seq: `source`, `source_mask` `[batch, src_len]`; `target_inputs`, `target_mask`, `targets`,
    `weights` `[batch, tgt_len]`.
  classification: `inputs`, `mask` `[batch, length]`; `labels` int `[batch]`; optional `weights`
    `[batch]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_SUMS = ("loss", "nll", "z_loss", "correct", "weight")


def token_sums(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
               label_smoothing: float = 0.0, z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Weighted sums of per-token losses, in float32.

  Args:
    logits: `[..., vocab]` (any float dtype; computed in float32).
    labels: int `[...]`.
    weights: `[...]`, the weight of each token (0 = ignored).
    label_smoothing: mix `label_smoothing` of the uniform distribution into the one-hot target.
    z_loss: coefficient of `logsumexp(logits)**2` (PaLM's z-loss, keeps the softmax normaliser near
      1 for stability).

  Returns:
    `{'loss': smoothed cross-entropy + z-loss, 'nll': cross-entropy, 'z_loss': the z-loss term,
    'correct': argmax == label, 'weight': sum of weights}`, each a float32 scalar summed over tokens
    with `weights`.
  """
  if logits.shape[:-1] != labels.shape or labels.shape != weights.shape:
    raise ValueError(
        f"logits [..., vocab], labels and weights [...] must agree, got logits {logits.shape}, "
        f"labels {labels.shape}, weights {weights.shape}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
  logits = logits.astype(jnp.float32)
  weights = weights.astype(jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = log_normalizer - label_logits
  # Cross-entropy against the uniform distribution: logsumexp minus the mean logit.
  uniform = log_normalizer - jnp.mean(logits, axis=-1)
  z_term = z_loss * jnp.square(log_normalizer)
  loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform + z_term
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  total = lambda x: jnp.sum(x * weights)
  return {"loss": total(loss), "nll": total(nll), "z_loss": total(z_term),
          "correct": total(correct), "weight": jnp.sum(weights)}


def _sums(logits, labels, weights, with_logits: bool, options):
  sums = token_sums(logits, labels, weights, **options)
  return (sums, logits) if with_logits else sums


def lm_loss(model, batch, *, dropout_rng=None, with_logits: bool = False, **options):
  """Next-token loss sums of a `DecoderLM` on an lm batch (dropout on when `dropout_rng` is given);
  with `with_logits`, `(sums, logits [batch, length, vocab])`, as for every loss here."""
  logits, _ = model(batch["inputs"], batch.get("mask"), positions=batch.get("positions"),
                    segment_ids=batch.get("segment_ids"), deterministic=dropout_rng is None,
                    dropout_rng=dropout_rng)
  return _sums(logits, batch["targets"], batch["weights"], with_logits, options)


def seq2seq_loss(model, batch, *, dropout_rng=None, with_logits: bool = False, **options):
  """Target-token loss sums of an `EncoderDecoder` on a seq2seq batch."""
  logits = model(batch["source"], batch["target_inputs"], batch["source_mask"],
                 batch["target_mask"], deterministic=dropout_rng is None, dropout_rng=dropout_rng)
  return _sums(logits, batch["targets"], batch["weights"], with_logits, options)


def classification_loss(model, batch, *, dropout_rng=None, with_logits: bool = False, **options):
  """Per-example loss sums of an `EncoderClassifier` on a classification batch (logits
  `[batch, classes]`)."""
  logits = model(batch["inputs"], batch["mask"], deterministic=dropout_rng is None,
                 dropout_rng=dropout_rng)
  weights = batch.get("weights", jnp.ones(batch["labels"].shape, jnp.float32))
  return _sums(logits, batch["labels"], weights, with_logits, options)


LOSSES = {"lm": lm_loss, "seq2seq": seq2seq_loss, "classification": classification_loss}
