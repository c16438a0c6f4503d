"""The base experiment: every knob at its default, and what several experiments share.

Each knob is documented once, on its line in `flaxattn/config.py` (the package validates configs
against it, so it lives there); this file is the starting point to copy, and runnable as it is:
  python -m flaxattn.main --config=experiments/base.py --workdir=/tmp/base

Experiment files reach the shared builders here with
`load_experiment(os.path.join(os.path.dirname(__file__), 'base.py'))` (a path, so that they load
from any working directory).
"""

from flaxattn.config import base_config, parse_variant

VARIANTS = ("",)


def get_config(arg=None):
  parse_variant(arg, __file__, VARIANTS)
  return base_config()


def bible_seq2seq_config(target: str, *, smoke: bool = False):
  """The encoder-decoder on Bible verse pairs, King James Version -> version `target` (a
  `flaxattn.data.corpora` code: 'l' French, 'e' German, '3' Basic English) with a shared
  SentencePiece vocabulary and beam search (`translate_bible.py`, `simplify_bible.py`). Sized for
  a 2-core CPU (about 15 minutes of training); scale layers, width and steps up on an accelerator.
  `smoke`: tiny, 30 steps, 16 decoded verses."""
  config = base_config()
  config.task = "seq2seq"
  config.update(steps=400, batch_size=32, log_every=50, eval_every=50, eval_batches=4,
                checkpoint_every=300)
  config.data.update(name="bible", source="k", target=target, source_len=64, target_len=80,
                     tokenizer="sentencepiece", vocab_size=8000)
  config.model.update(d_model=256, num_heads=4, mlp_dim=1024, num_layers=2, max_length=128,
                      positions="sinusoidal", dropout_rate=0.1, share_embeddings=True)
  config.optimizer.update(learning_rate=1e-3, weight_decay=0.01)
  config.schedule.warmup_steps = 100
  config.loss.label_smoothing = 0.1
  config.eval.update(beam_size=4, length_penalty=0.6)
  config.report.attention_examples = 1
  if smoke:
    config.update(steps=30, batch_size=16, log_every=10, eval_every=30, checkpoint_every=30,
                  eval_batches=2)
    config.data.update(source_len=32, target_len=32, vocab_size=1000)
    config.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, max_length=32)
    config.eval.update(decode_examples=16, beam_size=2)
  return config
