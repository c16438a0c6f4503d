"""`flaxattn.models.generate` against references written here: full forward passes without a cache,
a naive decoding loop, an exhaustive search over every continuation, and float64 NumPy softmaxes.

Tiny random float32 models; a vocabulary of 6 keeps the exhaustive search small.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.models import DecoderLM, EncoderDecoder, decoding, generate
from flaxattn.nn.attention import KVCache, MultiHeadAttention
from flaxattn.nn.config import TransformerConfig

VOCAB = 6
PAD = 0
EOS = 2
# Logits from the cached path and the full forward pass agree to float32 rounding.
LOGITS_ATOL = 1e-5
# Prompts of different lengths, right-padded with PAD.
PROMPTS = [[2, 3, 4, 5, 2], [5, 4, 3], [3]]


def right_padded(prompts):
  ids = np.full((len(prompts), max(map(len, prompts))), PAD, np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = prompt
  return jnp.asarray(ids), jnp.asarray([len(p) for p in prompts], jnp.int32)


def lm_config(**overrides):
  return TransformerConfig(**(dict(
      vocab_size=VOCAB, d_model=32, num_heads=4, kv_heads=2, mlp_dim=64, num_layers=2,
      activation="silu", gated_mlp=True, norm="rmsnorm", use_bias=False, positions="rope",
      max_length=32) | overrides))


@pytest.fixture(scope="module")
def lm():
  return DecoderLM(lm_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def seq2seq():
  # Scanned layers: the cache then has its batch on axis 1 (beam search reorders it there).
  config = TransformerConfig(vocab_size=VOCAB, d_model=32, num_heads=4, mlp_dim=64, num_layers=2,
                             positions="sinusoidal", max_length=32, scan_layers=True)
  return EncoderDecoder(config, rngs=nnx.Rngs(1))


def jitted(fn, model):
  """`fn(model, *arrays)` as one jitted function of the arrays (split/merge, as generate does)."""
  graphdef, state = nnx.split(model)
  compiled = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: compiled(state, *args)


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# Full forward passes run on one fixed-length buffer (one compiled shape): the decoders are causal,
# so the filler after a sequence never changes the logits of the sequence itself.
BUFFER = 16


def filled(sequence):
  if len(sequence) > BUFFER:
    raise ValueError(f"sequence longer than BUFFER={BUFFER}: {sequence}")
  return jnp.asarray([list(sequence) + [PAD] * (BUFFER - len(sequence))], jnp.int32)


@pytest.fixture(scope="module")
def lm_forward(lm):
  """Full forward (no cache) of one unpadded sequence -> float64 logits [len(sequence), V]."""
  forward = jitted(lambda model, ids: model(ids)[0], lm)
  return lambda sequence: np.asarray(forward(filled(sequence)), np.float64)[0, :len(sequence)]


@pytest.fixture(scope="module")
def seq2seq_forward(seq2seq):
  """Full forward of one unpadded source and a target -> float64 logits [len(target), V]."""
  forward = jitted(lambda model, source, target: model(source, target), seq2seq)
  return lambda source, target: np.asarray(
      forward(jnp.asarray([source], jnp.int32), filled(target)), np.float64)[0, :len(target)]


def naive_decode(logits_of, prompt, max_new_tokens, *, eos_id=None):
  """Greedy decoding with a full forward pass (`logits_of(sequence)`) for every new token."""
  sequence = list(prompt)
  new = []
  while len(new) < max_new_tokens:
    token = int(np.argmax(logits_of(sequence)[-1]))
    new.append(token)
    sequence.append(token)
    if token == eos_id:
      break
  return new + [PAD] * (max_new_tokens - len(new))


# ------------------------------------------------------------------------------------------------
# The KV cache against full forward passes.


def test_cached_logits_match_full_forward_every_step(lm, lm_forward):
  ids, lengths = right_padded(PROMPTS)
  valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
  continuation = np.array([[4, 2, 5, 3], [3, 3, 2, 4], [5, 2, 2, 4]], np.int32)
  prefill = jitted(lambda model, ids, valid: model(
      ids, valid, cache=model.init_cache(len(PROMPTS), ids.shape[1] + continuation.shape[1])), lm)
  step = jitted(lambda model, ids, cache: model(ids, cache=cache), lm)
  logits, cache = prefill(ids, valid)
  cached = [np.asarray(logits)[np.arange(len(PROMPTS)), np.asarray(lengths) - 1]]
  for column in continuation.T:
    logits, cache = step(jnp.asarray(column)[:, None], cache)
    cached.append(np.asarray(logits[:, 0]))
  for row, prompt in enumerate(PROMPTS):
    expected = lm_forward(prompt + continuation[row].tolist())[len(prompt) - 1:]
    np.testing.assert_allclose(np.stack([step[row] for step in cached]), expected,
                               atol=LOGITS_ATOL, rtol=0)


def test_a_cached_step_never_reads_the_slots_past_the_written_ones():
  # Unwritten slots hold NaN from the second key block on (the CPU blockwise kernel's blocks are
  # 512 keys): a step that read them would give NaN (0 * NaN in the weighted sum). Its output must
  # be finite and equal the output against a cache that just fits.
  layer = MultiHeadAttention(4, 16, kv_heads=2, positions="rope", attention_impl="blockwise",
                             rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  positions = jnp.asarray([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]], jnp.int32)  # row 1 left-padded

  def prefill_and_step(layer, cache):
    out, cache = layer(x[:, :4], positions=positions[:, :4], cache=cache)
    step, _ = layer(x[:, 4:], positions=positions[:, 4:], cache=cache)
    return jnp.concatenate([out, step], axis=1)

  run = jitted(prefill_and_step, layer)

  small = run(layer.init_cache(2, 5))
  big = layer.init_cache(2, 1100)
  poison = jnp.arange(1100)[None, :, None, None] >= 512
  big = KVCache(key=jnp.where(poison, jnp.nan, big.key), value=jnp.where(poison, jnp.nan, big.value),
                positions=big.positions, index=big.index)
  np.testing.assert_allclose(np.asarray(run(big)), np.asarray(small), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_a_bigger_cache_gives_the_same_tokens_and_scores(lm, method):
  ids, lengths = right_padded(PROMPTS)
  kwargs = dict(max_new_tokens=4, prompt_lengths=lengths, method=method, eos_id=EOS,
                return_scores=True) | (dict(num_beams=3) if method == "beam" else {})
  tokens, scores = generate(lm, ids, **kwargs)
  # Beyond the beam reorder's chunk of 64 slots: two chunks, the last clamped.
  big_tokens, big_scores = generate(lm, ids, max_length=100, **kwargs)
  np.testing.assert_array_equal(np.asarray(big_tokens), np.asarray(tokens))
  np.testing.assert_allclose(np.asarray(big_scores), np.asarray(scores), atol=1e-5, rtol=0)


@pytest.mark.parametrize("filled", [0, 1, 3, 4, 9, 10])
def test_beam_reorder_moves_exactly_the_written_slots(monkeypatch, filled):
  # Chunks of 3 over 10 slots: the last chunk is clamped and overlaps the one before.
  monkeypatch.setattr(decoding, "REORDER_CHUNK", 3)
  layers, batch, slots = 2, 4, 10
  cache = dict(
      key=jax.random.normal(jax.random.key(0), (layers, batch, slots, 2)),  # scanned: batch axis 1
      positions=jax.random.randint(jax.random.key(1), (batch, slots), 0, 9),
      state=jax.random.normal(jax.random.key(2), (batch, 3)),  # no slot axis
      index=jnp.int32(7))
  axes = (dict(key=1, positions=0, state=0, index=None), dict(key=2, positions=1, state=None,
                                                              index=None))
  rows = jnp.asarray([2, 0, 0, 3])
  moved = decoding._reorder_rows(cache, rows, axes, jnp.int32(filled))
  key, positions = np.asarray(cache["key"]), np.asarray(cache["positions"])
  expected_key, expected_positions = key.copy(), positions.copy()
  expected_key[:, :, :filled] = key[:, np.asarray(rows), :filled]
  expected_positions[:, :filled] = positions[np.asarray(rows), :filled]
  np.testing.assert_array_equal(np.asarray(moved["key"]), expected_key)
  np.testing.assert_array_equal(np.asarray(moved["positions"]), expected_positions)
  np.testing.assert_array_equal(np.asarray(moved["state"]), np.asarray(cache["state"])[rows])
  assert int(moved["index"]) == 7


def test_logits_at_gives_one_position_per_row(lm, lm_forward):
  ids, lengths = right_padded(PROMPTS)
  valid = jnp.arange(ids.shape[1])[None, :] < lengths[:, None]
  last = jitted(lambda model, ids, valid, at: model(ids, valid, logits_at=at)[0], lm)(
      ids, valid, lengths - 1)
  assert last.shape == (len(PROMPTS), 1, VOCAB)
  for row, prompt in enumerate(PROMPTS):
    np.testing.assert_allclose(last[row, 0], lm_forward(prompt)[-1], atol=LOGITS_ATOL, rtol=0)
  with pytest.raises(ValueError, match=r"logits_at must have shape \[batch\] = \(3,\), got \(3, 1\)"):
    lm(ids, valid, logits_at=jnp.zeros((3, 1), jnp.int32))


def test_seq2seq_cached_logits_match_full_forward_every_step(seq2seq, seq2seq_forward):
  sources, source_lengths = right_padded(PROMPTS)
  source_valid = jnp.arange(sources.shape[1])[None, :] < source_lengths[:, None]
  targets = np.array([[0, 4, 2, 5], [0, 3, 2, 4], [0, 2, 2, 3]], np.int32)
  encode = jitted(lambda model, ids, valid: model.encode(ids, valid), seq2seq)
  step = jitted(lambda model, ids, encoded, valid, cache: model.decode(ids, encoded, valid,
                                                                       cache=cache), seq2seq)
  encoded = encode(sources, source_valid)
  cache = seq2seq.init_cache(len(PROMPTS), targets.shape[1])
  cached = []
  for column in targets.T:
    logits, cache = step(jnp.asarray(column)[:, None], encoded, source_valid, cache)
    cached.append(np.asarray(logits[:, 0]))
  for row, source in enumerate(PROMPTS):
    np.testing.assert_allclose(np.stack([step[row] for step in cached]),
                               seq2seq_forward(source, targets[row].tolist()),
                               atol=LOGITS_ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# Greedy decoding and batching.

MAX_NEW = 6


@pytest.fixture(scope="module")
def greedy_reference(lm_forward):
  """The naive loop's new tokens for each prompt alone, without and with an end-of-sequence id."""
  return {eos: [naive_decode(lm_forward, prompt, MAX_NEW, eos_id=eos) for prompt in PROMPTS]
          for eos in (None, EOS)}


@pytest.mark.parametrize("eos_id", [None, EOS])
def test_greedy_matches_naive_full_forward_loop(lm, greedy_reference, eos_id):
  ids, lengths = right_padded(PROMPTS)
  tokens = np.asarray(generate(lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths,
                               eos_id=eos_id, pad_id=PAD))
  assert tokens.shape == (len(PROMPTS), ids.shape[1] + MAX_NEW)
  np.testing.assert_array_equal(tokens[:, :ids.shape[1]], ids)
  np.testing.assert_array_equal(tokens[:, ids.shape[1]:], np.array(greedy_reference[eos_id]))


def test_second_call_with_the_same_shapes_compiles_nothing(lm):
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, seconds, **kwargs: compiles.append(event)
      if event == "/jax/core/compile/backend_compile_duration" else None)
  ids, lengths = right_padded(PROMPTS)
  other_ids, other_lengths = right_padded([prompt[::-1] for prompt in PROMPTS[::-1]])
  generate(lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths)
  before = len(compiles)
  generate(lm, other_ids, max_new_tokens=MAX_NEW, prompt_lengths=other_lengths)
  assert len(compiles) == before


def test_eos_stops_a_row_and_pads_the_rest(greedy_reference):
  # The reference with eos must exercise the stop: some row ends early, so pad follows its eos.
  rows = greedy_reference[EOS]
  stopped = [row for row in rows if EOS in row[:-1]]
  assert stopped, f"no row emitted eos before the last step: {rows}"
  for row in stopped:
    after = row[row.index(EOS) + 1:]
    assert after == [PAD] * len(after)


def test_batched_generation_equals_each_prompt_alone(lm):
  ids, lengths = right_padded(PROMPTS)
  batched = np.asarray(generate(lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths,
                                eos_id=EOS))
  # The same prompts left-padded through attention_mask give the same new tokens.
  width = ids.shape[1]
  left = np.full_like(np.asarray(ids), PAD)
  left_mask = np.zeros(left.shape, bool)
  for row, prompt in enumerate(PROMPTS):
    left[row, width - len(prompt):] = prompt
    left_mask[row, width - len(prompt):] = True
  left_batched = np.asarray(generate(lm, left, max_new_tokens=MAX_NEW, attention_mask=left_mask,
                                     eos_id=EOS))
  np.testing.assert_array_equal(left_batched[:, width:], batched[:, width:])
  for row, prompt in enumerate(PROMPTS):
    alone = np.asarray(generate(lm, jnp.asarray([prompt]), max_new_tokens=MAX_NEW, eos_id=EOS))
    np.testing.assert_array_equal(batched[row, width:], alone[0, len(prompt):])


def test_seq2seq_greedy_matches_naive_loop_per_source(seq2seq, seq2seq_forward):
  sources, source_lengths = right_padded(PROMPTS)
  tokens = np.asarray(generate(seq2seq, sources, max_new_tokens=MAX_NEW,
                               prompt_lengths=source_lengths, eos_id=EOS, decoder_start_id=PAD))
  assert tokens.shape == (len(PROMPTS), 1 + MAX_NEW)
  for row, source in enumerate(PROMPTS):
    expected = naive_decode(lambda target: seq2seq_forward(source, target), [PAD], MAX_NEW,
                            eos_id=EOS)
    np.testing.assert_array_equal(tokens[row], [PAD] + expected)


# ------------------------------------------------------------------------------------------------
# Beam search.


def exhaustive_hypotheses(logits_of, prompt, max_new_tokens, eos_id, alpha):
  """Every hypothesis (ends in eos, or has max_new_tokens tokens) -> GNMT-penalised score, float64."""
  scores = {}
  for continuation in itertools.product(range(VOCAB), repeat=max_new_tokens):
    continuation = list(continuation)
    if eos_id in continuation:
      continuation = continuation[:continuation.index(eos_id) + 1]
    key = tuple(continuation)
    if key in scores:
      continue
    log_probs = log_softmax(logits_of(list(prompt) + continuation))
    total = sum(log_probs[len(prompt) - 1 + i, token] for i, token in enumerate(continuation))
    scores[key] = total / ((5.0 + len(key)) / 6.0) ** alpha
  return scores


def strip(tokens, eos_id):
  tokens = list(tokens)
  return tuple(tokens[:tokens.index(eos_id) + 1]) if eos_id in tokens else tuple(tokens)


@pytest.mark.parametrize("alpha", [0.6, 0.0])
def test_beam_search_finds_the_best_hypotheses_of_an_exhaustive_search(lm, lm_forward, alpha):
  max_new = 3
  # With as many beams as there are extensions before the last step ((VOCAB - 1) ** (max_new - 2)
  # live prefixes times VOCAB tokens), beam search prunes nothing that could reach the top (at the
  # last step every hypothesis has the same length penalty): its hypotheses must be exactly the
  # exhaustive search's best.
  beams = (VOCAB - 1) ** (max_new - 2) * VOCAB
  prompts = PROMPTS[:2]
  ids, lengths = right_padded(prompts)
  tokens, scores = generate(lm, ids, max_new_tokens=max_new, prompt_lengths=lengths,
                            method="beam", num_beams=beams, length_penalty=alpha, eos_id=EOS,
                            return_scores=True)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert tokens.shape == (len(prompts), beams, ids.shape[1] + max_new)
  for row, prompt in enumerate(prompts):
    reference = exhaustive_hypotheses(lm_forward, prompt, max_new, EOS, alpha)
    best = sorted(reference.values(), reverse=True)[:beams]
    # Scores to float32 rounding of a few summed log-probabilities.
    np.testing.assert_allclose(scores[row], best, atol=1e-5, rtol=0)
    for beam in range(beams):
      hypothesis = strip(tokens[row, beam, ids.shape[1]:], EOS)
      np.testing.assert_array_equal(tokens[row, beam, :len(prompt)], prompt)
      assert hypothesis in reference, hypothesis
      np.testing.assert_allclose(reference[hypothesis], scores[row, beam], atol=1e-5, rtol=0)


def test_beam_search_with_one_beam_is_greedy(lm, greedy_reference):
  # With length_penalty 0 a lone beam stops at the first eos, as greedy does.
  ids, lengths = right_padded(PROMPTS)
  tokens = generate(lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths, method="beam",
                    num_beams=1, length_penalty=0.0, eos_id=EOS)
  np.testing.assert_array_equal(np.asarray(tokens)[:, 0, ids.shape[1]:],
                                np.array(greedy_reference[EOS]))


def test_seq2seq_beam_search_on_scanned_layers_reports_true_scores(seq2seq, seq2seq_forward):
  # The scanned cache has its batch on axis 1 and the encoder output is repeated per beam: each
  # hypothesis' score must still be its own length-penalised log-probability, best first.
  alpha, beams = 0.6, 3
  sources, source_lengths = right_padded(PROMPTS)
  tokens, scores = generate(seq2seq, sources, max_new_tokens=MAX_NEW, prompt_lengths=source_lengths,
                            method="beam", num_beams=beams, length_penalty=alpha, eos_id=EOS,
                            return_scores=True)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  assert np.all(np.diff(scores, axis=1) <= 0)
  for row, source in enumerate(PROMPTS):
    for beam in range(beams):
      log_probs = log_softmax(seq2seq_forward(source, tokens[row, beam].tolist()))
      hypothesis = strip(tokens[row, beam, 1:], EOS)
      total = sum(log_probs[i, token] for i, token in enumerate(hypothesis))
      np.testing.assert_allclose(scores[row, beam], total / ((5.0 + len(hypothesis)) / 6.0) ** alpha,
                                 atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Sampling.


def test_top_k_one_sampling_is_greedy(lm, greedy_reference):
  ids, lengths = right_padded(PROMPTS)
  tokens = generate(lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths, method="sample",
                    top_k=1, eos_id=EOS, rng=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(tokens)[:, ids.shape[1]:], np.array(greedy_reference[EOS]))


def allowed_tokens(log_probs, temperature, top_k, top_p):
  """The tokens temperature, then top-k, then top-p keep (float64; ties at the cut kept)."""
  logits = log_probs / temperature
  keep = logits >= np.sort(logits)[-top_k]
  probs = np.where(keep, np.exp(logits - logits.max()), 0.0)
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  mass_before = np.cumsum(probs[order]) - probs[order]
  nucleus = np.zeros_like(keep)
  # A margin of 1e-6 on top_p admits tokens whose float32 mass sits on the boundary.
  nucleus[order[mass_before < top_p + 1e-6]] = True
  return keep & nucleus


def test_sampling_emits_only_filtered_tokens_and_is_deterministic(lm, lm_forward):
  temperature, top_k, top_p = 0.7, 4, 0.8
  ids, lengths = right_padded(PROMPTS * 4)
  sample = lambda seed: np.asarray(generate(
      lm, ids, max_new_tokens=MAX_NEW, prompt_lengths=lengths, method="sample",
      temperature=temperature, top_k=top_k, top_p=top_p, rng=jax.random.key(seed)))
  first, again, other = sample(0), sample(0), sample(1)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other), "a different key gave the same samples"
  width = ids.shape[1]
  nucleus_binding = False
  for row, prompt in enumerate(PROMPTS * 4):
    new = first[row, width:].tolist()
    log_probs = log_softmax(lm_forward(list(prompt) + new))
    for step, token in enumerate(new):
      allowed = allowed_tokens(log_probs[len(prompt) - 1 + step], temperature, top_k, top_p)
      assert allowed[token], (row, step, token, np.flatnonzero(allowed))
      nucleus_binding |= allowed.sum() < top_k
  assert nucleus_binding, "top_p never cut below top_k: the test would not check it"


def test_sampling_distribution_matches_softmax_over_temperature(lm, lm_forward):
  scipy_stats = pytest.importorskip("scipy.stats", reason="chi-square quantile")
  temperature, samples = 0.5, 4000
  prompt = PROMPTS[1]
  tokens = generate(lm, jnp.asarray([prompt] * samples), max_new_tokens=1, method="sample",
                    temperature=temperature, rng=jax.random.key(7))
  counts = np.bincount(np.asarray(tokens)[:, -1], minlength=VOCAB)
  logits = lm_forward(prompt)[-1] / temperature
  expected = np.exp(logits - logits.max())
  expected = samples * expected / expected.sum()
  chi_square = float(np.sum((counts - expected) ** 2 / expected))
  # Pearson's chi-square with VOCAB - 1 degrees of freedom: reject only beyond the 0.999 quantile.
  assert chi_square < scipy_stats.chi2.ppf(0.999, VOCAB - 1), (counts, expected)


# ------------------------------------------------------------------------------------------------
# Argument checks.


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nucleus"), "method"),
    (dict(top_k=2), "apply to method='sample'"),
    (dict(method="sample"), "needs rng"),
    (dict(method="sample", rng=jax.random.key(0), top_p=1.5), "top_p"),
    (dict(method="sample", rng=jax.random.key(0), top_k=VOCAB + 1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_lengths=[3]), "prompt_lengths"),
    (dict(prompt_lengths=[3, 0]), "rows \\[1\\]"),
    (dict(eos_id=VOCAB), "eos_id"),
    (dict(method="beam", num_beams=0), "num_beams"),
    (dict(num_beams=3), "applies to method='beam'"),
    (dict(max_length=4), "max_length \\(cache slots\\) must be an int >= 5"),
])
def test_bad_arguments_raise_value_error_naming_them(lm, kwargs, message):
  arguments = dict(max_new_tokens=2) | kwargs
  with pytest.raises(ValueError, match=message):
    generate(lm, jnp.ones((2, 3), jnp.int32), **arguments)


@pytest.mark.slow
def test_an_lm_trained_with_ring_attention_decodes(tmp_path):
  # Cached decoding has one-token queries, which ring attention cannot split over the context axis:
  # the layers fall back to a single-device kernel. The tokens must be the greedy continuation of
  # full forward passes of the same weights with the 'xla' kernel.
  import pathlib
  import sys

  from flaxattn.train import inference
  from flaxattn.train.loop import train_and_evaluate

  sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
  from experiments import lm_tiny  # pylint: disable=import-outside-toplevel

  config = lm_tiny.get_config("ring")
  config.update(steps=3, log_every=1, eval_every=0, eval_batches=1, checkpoint_every=3)
  train_and_evaluate(config, str(tmp_path))
  run, graphdef, params, _ = inference.restore(config, str(tmp_path))
  model = nnx.merge(graphdef, params)
  prompt = [[5, 17, 200, 3, 42]]
  with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
    tokens = np.asarray(generate(model, jnp.asarray(prompt, jnp.int32), max_new_tokens=6))
  reference = nnx.clone(model)
  for _, module in nnx.iter_modules(reference):
    if isinstance(module, MultiHeadAttention):
      module.attention_impl = "xla"
  forward = jitted(lambda model, ids: model(ids)[0], reference)
  expected = naive_decode(
      lambda sequence: np.asarray(forward(filled(sequence)), np.float64)[0, :len(sequence)],
      prompt[0], 6)
  np.testing.assert_array_equal(tokens[0, len(prompt[0]):], expected)


def test_beam_search_fills_a_learned_position_cache_to_max_length():
  # The cache is exactly config.max_length slots, the most learned positions allow; one beam with
  # no length penalty is greedy.
  model = DecoderLM(lm_config(positions="learned", max_length=8), rngs=nnx.Rngs(2))
  ids = jnp.asarray([[3, 4, 5]], jnp.int32)
  beam = generate(model, ids, max_new_tokens=5, method="beam", num_beams=1, length_penalty=0.0)
  greedy = generate(model, ids, max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(beam)[:, 0], np.asarray(greedy))
