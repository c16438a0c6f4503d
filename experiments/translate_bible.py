"""Bible translation, English (KJV) to French (Louis Segond 1910) or German (Elberfelder 1932):
an encoder-decoder with a shared SentencePiece vocabulary, beam search, BLEU and chrF (sacrebleu)
on held-out books (the split is by book, so no verse of a test book is seen in training).

  python -m flaxattn.main --config=experiments/translate_bible.py:en-fr --workdir=workdirs/en_fr

Variants: 'en-fr' (default), 'en-de', and 'smoke' (EN->FR, tiny, 30 steps, 16 decoded verses).
"""

import os

from flaxattn.config import load_experiment, parse_variant

base = load_experiment(os.path.join(os.path.dirname(__file__), "base.py"))

VARIANTS = ("", "en-fr", "en-de", "smoke")


def get_config(arg=None):
  arg = parse_variant(arg, __file__, VARIANTS)
  return base.bible_seq2seq_config("e" if arg.variant == "en-de" else "l",
                                   smoke=arg.variant == "smoke")
