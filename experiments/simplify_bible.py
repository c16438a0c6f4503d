"""Text simplification, a summarization-like seq2seq task: King James Version -> Bible in Basic
English (a translation into an 850-word vocabulary), verse by verse, scored with ROUGE-1/2/L
(rouge-score) and BLEU (sacrebleu) on held-out books.

  python -m flaxattn.main --config=experiments/simplify_bible.py --workdir=workdirs/simplify

Variants: '' and 'smoke' (tiny, 30 steps, 16 decoded verses).
"""

from flaxattn.config import bible_seq2seq_config

VARIANTS = ("", "smoke")


def get_config(arg=None):
  arg = arg or ""
  if arg not in VARIANTS:
    raise ValueError(f"experiments/simplify_bible.py variant must be one of {VARIANTS}, got {arg!r}")
  return bible_seq2seq_config("3", smoke=arg == "smoke")
