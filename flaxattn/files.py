"""File writing every layer may use (it imports nothing from flaxattn)."""

from __future__ import annotations

import os
import tempfile
from typing import IO, Callable


def write_atomically(path: str | os.PathLike, write: Callable[[IO], object], *,
                     binary: bool = False) -> str:
  """Calls `write(file)` on a temporary file beside `path`, then renames it over `path`, so a reader
  (a later run loading a tokenizer, TensorBoard, a report viewer) never sees half a file, even when
  the writer is killed. Creates the parent directories; returns `path` as a str."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                       dir=directory)
  try:
    with os.fdopen(handle, "wb" if binary else "w") as f:
      write(f)
    os.replace(temporary, path)
  except BaseException:
    os.unlink(temporary)
    raise
  return path
