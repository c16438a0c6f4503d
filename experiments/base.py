"""The base experiment: every knob at its default.

Each knob is documented once, in `flaxattn/config.py` (the package validates configs against it, so
it lives there); this file is the starting point to copy, and runnable as it is:
  python -m flaxattn.main --config=experiments/base.py --workdir=/tmp/base
"""

from flaxattn.config import base_config


def get_config(arg=None):
  if arg:
    raise ValueError(f"experiments/base.py takes no variant, got {arg!r}")
  return base_config()
