"""A tiny decoder LM on the generated Markov corpus: trains in well under a minute on CPU.

The corpus (256 tokens, 4 successors each) has an entropy rate of about 1.09 nats per token, against
log(256) = 5.55 for guessing; 300 steps bring the loss from 5.5 to about 1.3.

  python -m flaxattn.main --config=experiments/lm_tiny.py --workdir=/tmp/lm_tiny
  python -m flaxattn.main --config=experiments/lm_tiny.py:bf16 --workdir=/tmp/lm_tiny_bf16

Variants: '' (float32), 'bf16' (bfloat16 compute, float32 master weights), 'accum' (4 microbatches
per step), 'sharded' (fsdp=2, tensor=2, context=2 on 8 devices:
XLA_FLAGS=--xla_force_host_platform_device_count=8).
"""

from flaxattn.config import base_config

VARIANTS = ("", "bf16", "accum", "sharded")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"experiments/lm_tiny.py variant must be one of {VARIANTS}, got {arg!r}")
  config = base_config()
  config.steps = 300
  config.batch_size = 16
  config.log_every = 25
  config.eval_every = 100
  config.eval_batches = 2
  config.checkpoint_every = 100

  config.model.vocab_size = 256
  config.model.d_model = 64
  config.model.num_heads = 4
  config.model.num_kv_heads = 2
  config.model.mlp_dim = 128
  config.model.num_layers = 2
  config.model.max_length = 64
  config.model.positions = "rope"
  config.model.norm = "rmsnorm"
  config.model.activation = "silu"
  config.model.gated_mlp = True
  config.model.use_bias = False
  config.model.scan_layers = True

  config.optimizer.learning_rate = 3e-3
  config.optimizer.weight_decay = 0.01
  config.schedule.warmup_steps = 20
  config.data.seq_len = 64

  if arg == "bf16":
    config.model.dtype = "bfloat16"
  elif arg == "accum":
    config.grad_accum_steps = 4
  elif arg == "sharded":
    config.mesh.data = 1
    config.mesh.fsdp = config.mesh.tensor = config.mesh.context = 2
    config.sharding.preset = "context"
  return config
