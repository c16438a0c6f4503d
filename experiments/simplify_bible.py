"""Text simplification, a summarization-like seq2seq task: King James Version -> Bible in Basic
English (a translation into an 850-word vocabulary), verse by verse, scored with ROUGE-1/2/L
(rouge-score) and BLEU (sacrebleu) on held-out books.

  python -m flaxattn.main --config=experiments/simplify_bible.py --workdir=workdirs/simplify

Variants: '' and 'smoke' (tiny, 30 steps, 16 decoded verses).
"""

import os

from flaxattn.config import load_experiment, parse_variant

base = load_experiment(os.path.join(os.path.dirname(__file__), "base.py"))

VARIANTS = ("", "smoke")


def get_config(arg=None):
  arg = parse_variant(arg, __file__, VARIANTS)
  return base.bible_seq2seq_config("3", smoke=arg.variant == "smoke")
