"""Generated sequence-to-sequence checks: copy, reverse, or associative recall of random ids.

A model and pipeline that work reach exact outputs within a few hundred steps; anything less points
at a bug, not at the data. `reverse` (the default): 10 ids in, the same ids reversed out.

  python -m flaxattn.main --config=experiments/sequence_tasks.py:reverse --workdir=/tmp/reverse
  python -m flaxattn.main --config=experiments/sequence_tasks.py:copy,length=20 --workdir=/tmp/copy

Variants: 'copy', 'reverse' (default), 'recall' (key/value pairs, then a key: output its value),
'smoke' (reverse, 20 steps). Option `length`: source ids per example (default 10; recall rounds it
up to odd: pairs then a query); the source and target lengths grow with it.
"""

from flaxattn.config import base_config, parse_variant

VARIANTS = ("", "copy", "reverse", "recall", "smoke")


def get_config(arg=None):
  arg = parse_variant(arg, __file__, VARIANTS, length=10)
  name = arg.variant if arg.variant in ("copy", "recall") else "reverse"
  # recall's source is key/value pairs then a query: an odd length.
  length = arg.length + 1 - arg.length % 2 if name == "recall" else arg.length
  # Room for the ids and eos, in multiples of 8 (at least 16), for the source and the target.
  padded = max(16, -(-(length + 2) // 8) * 8)
  config = base_config()
  config.task = "seq2seq"
  config.update(steps=400, batch_size=32, log_every=50, eval_every=50, eval_batches=4,
                checkpoint_every=400)
  config.data.update(name=name, source_len=padded, target_len=padded, vocab_size=20,
                     min_length=length, train_examples=20_000, eval_examples=64)
  config.model.update(d_model=64, num_heads=4, mlp_dim=128, num_layers=2, max_length=2 * padded,
                      positions="sinusoidal")
  config.optimizer.update(learning_rate=3e-3, weight_decay=0.0)
  config.schedule.warmup_steps = 50
  config.eval.beam_size = 2
  config.report.attention_examples = 1
  if arg.variant == "smoke":
    config.update(steps=20, log_every=10, checkpoint_every=20)
  return config
