"""Word-level language modelling on the Penn Treebank (Mikolov's split: 10k words, 887k training
tokens), reporting perplexity per word on the validation and test sets.

Each sentence ends in `<eos>` and each split is one token stream cut into windows (every token
predicted exactly once), as in Zaremba et al. (2014), whose LSTMs reached 114.5 (small, 2x200) and
82.7 (medium, 2x650, dropout) test perplexity: the published anchors.

  python -m flaxattn.main --config=experiments/lm_ptb.py --workdir=workdirs/ptb

Variants: '' (a 2-layer decoder, d_model 256, dropout 0.3, about 2 epochs: sized for a 2-core CPU;
scale `model.num_layers`, `model.d_model` and `steps` up on an accelerator), 'smoke'.
"""

from flaxattn.config import base_config, parse_variant

VARIANTS = ("", "smoke")


def get_config(arg=None):
  variant = parse_variant(arg, __file__, VARIANTS).variant
  config = base_config()
  config.task = "lm"
  config.update(steps=900, batch_size=32, log_every=50, eval_every=100, eval_batches=8,
                checkpoint_every=300)
  config.data.update(name="ptb", seq_len=64, tokenizer="word")
  config.model.update(d_model=256, num_heads=4, mlp_dim=1024, num_layers=2, max_length=64,
                      positions="rope", norm="rmsnorm", dropout_rate=0.3, scan_layers=True)
  config.optimizer.update(learning_rate=1e-3, weight_decay=0.1)
  config.schedule.warmup_steps = 200
  config.report.attention_examples = 1

  if variant == "smoke":
    config.update(steps=20, batch_size=16, log_every=10, eval_every=20, checkpoint_every=20,
                  eval_batches=4)
    config.data.seq_len = 32
    config.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, max_length=32,
                        dropout_rate=0.0)
  return config
