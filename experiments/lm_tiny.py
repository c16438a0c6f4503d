"""A tiny decoder LM on the generated Markov corpus: trains in well under a minute on CPU.

The corpus (256 tokens, 4 successors each) has an entropy rate of about 1.09 nats per token, against
log(256) = 5.55 for guessing; 300 steps bring the loss from 5.5 to about 1.3.

  python -m flaxattn.main --config=experiments/lm_tiny.py --workdir=/tmp/lm_tiny
  python -m flaxattn.main --config=experiments/lm_tiny.py:bf16 --workdir=/tmp/lm_tiny_bf16

Variants: '' (float32), 'bf16' (bfloat16 compute, float32 master weights), 'accum' (the same
batch of 16 in 2 microbatches: also valid on 8 devices), 'sharded' (fsdp=2, tensor=2, context=2
on 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8), 'ring' (context parallelism:
the sequence split over context=4 devices with ring attention, batch over fsdp=2; 8 devices as for
'sharded').
"""

from flaxattn.config import base_config, parse_variant

VARIANTS = ("", "bf16", "accum", "sharded", "ring")


def get_config(arg=None):
  variant = parse_variant(arg, __file__, VARIANTS).variant
  config = base_config()
  config.update(steps=300, batch_size=16, log_every=25, eval_every=30, eval_batches=2,
                checkpoint_every=100)
  # A small Llama: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases, scanned layers.
  config.model.update(vocab_size=256, d_model=64, num_heads=4, kv_heads=2, mlp_dim=128,
                      num_layers=2, max_length=64, positions="rope", norm="rmsnorm",
                      activation="silu", gated_mlp=True, use_bias=False, scan_layers=True)
  config.optimizer.update(learning_rate=3e-3, weight_decay=0.01)
  config.schedule.warmup_steps = 20
  config.data.seq_len = 64

  if variant == "bf16":
    config.model.dtype = "bfloat16"
  elif variant == "accum":
    config.grad_accum_steps = 2
  elif variant == "sharded":
    config.mesh.data = 1
    config.mesh.fsdp = config.mesh.tensor = config.mesh.context = 2
    config.sharding.preset = "context"
  elif variant == "ring":
    config.mesh.data = config.mesh.tensor = 1
    config.mesh.fsdp, config.mesh.context = 2, 4
    config.sharding.preset = "context"
    config.model.attention_impl = "ring"
  return config
