"""Generated sequence-to-sequence checks: copy, reverse, or associative recall of random ids.

A model and pipeline that work reach exact outputs within a few hundred steps; anything less points
at a bug, not at the data. `reverse` (the default): 10 ids in, the same ids reversed out.

  python -m flaxattn.main --config=experiments/sequence_tasks.py:reverse --workdir=/tmp/reverse

Variants: 'copy', 'reverse' (default), 'recall' (key/value pairs, then a key: output its value),
'smoke' (reverse, 20 steps).
"""

from flaxattn.config import base_config

VARIANTS = ("", "copy", "reverse", "recall", "smoke")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"experiments/sequence_tasks.py variant must be one of {VARIANTS}, got {arg!r}")
  config = base_config()
  config.task = "seq2seq"
  config.update(steps=400, batch_size=32, log_every=50, eval_every=0, eval_batches=0,
                checkpoint_every=400)
  config.data.update(name=arg if arg in ("copy", "recall") else "reverse", source_len=16,
                     target_len=16, vocab_size=20, min_length=11 if arg == "recall" else 10,
                     train_examples=20_000, eval_examples=64)
  config.model.update(d_model=64, num_heads=4, mlp_dim=128, num_layers=2, max_length=32,
                      positions="sinusoidal")
  config.optimizer.update(learning_rate=3e-3, weight_decay=0.0)
  config.schedule.warmup_steps = 50
  config.eval.beam_size = 2
  config.report.attention_examples = 1
  if arg == "smoke":
    config.update(steps=20, log_every=10, checkpoint_every=20)
  return config
