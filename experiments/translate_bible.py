"""Bible translation, English (KJV) to French (Louis Segond 1910) or German (Elberfelder 1932):
an encoder-decoder with a shared SentencePiece vocabulary, beam search, BLEU and chrF (sacrebleu)
on held-out books (the split is by book, so no verse of a test book is seen in training).

  python -m flaxattn.main --config=experiments/translate_bible.py:en-fr --workdir=workdirs/en_fr

Variants: 'en-fr' (default), 'en-de', and 'smoke' (EN->FR, tiny, 30 steps, 16 decoded verses).
"""

from flaxattn.config import bible_seq2seq_config

VARIANTS = ("", "en-fr", "en-de", "smoke")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"experiments/translate_bible.py variant must be one of {VARIANTS}, got {arg!r}")
  return bible_seq2seq_config("e" if arg == "en-de" else "l", smoke=arg == "smoke")
