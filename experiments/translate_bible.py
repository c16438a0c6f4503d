"""Bible translation, English (KJV) to French (Louis Segond 1910) or German (Elberfelder 1932):
an encoder-decoder with a shared SentencePiece vocabulary, beam search, BLEU and chrF (sacrebleu)
on held-out books (the split is by book, so no verse of a test book is seen in training).

  python -m flaxattn.main --config=experiments/translate_bible.py:en-fr --workdir=workdirs/en_fr

Variants: 'en-fr' (default), 'en-de', and 'smoke' (EN->FR, tiny, 30 steps, 16 decoded verses).
"""

from flaxattn.config import base_config

VARIANTS = ("", "en-fr", "en-de", "smoke")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"experiments/translate_bible.py variant must be one of {VARIANTS}, got {arg!r}")
  config = base_config()
  config.task = "seq2seq"
  # Sized for a 2-core CPU (about 15 minutes of training); scale layers, width and steps up on
  # an accelerator.
  config.update(steps=400, batch_size=32, log_every=50, eval_every=300, eval_batches=0,
                checkpoint_every=300)
  config.data.update(name="bible", source="k", target="e" if arg == "en-de" else "l",
                     source_len=64, target_len=80, tokenizer="sentencepiece", vocab_size=8000)
  config.model.update(d_model=256, num_heads=4, mlp_dim=1024, num_layers=2, max_length=128,
                      positions="sinusoidal", dropout_rate=0.1, share_embeddings=True)
  config.optimizer.update(learning_rate=1e-3, weight_decay=0.01)
  config.schedule.warmup_steps = 100
  config.loss.label_smoothing = 0.1
  config.eval.update(beam_size=4, length_penalty=0.6)
  config.report.attention_examples = 1

  if arg == "smoke":
    config.update(steps=30, batch_size=16, log_every=10, eval_every=30, checkpoint_every=30,
                  eval_batches=2)
    config.data.update(source_len=32, target_len=32, vocab_size=1000)
    config.model.update(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, max_length=32)
    config.eval.update(decode_examples=16, beam_size=2)
  return config
