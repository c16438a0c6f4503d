"""Models: KV-cache decoding == full forward (batch of different prompt lengths), scanned == unrolled,
bfloat16 compute vs float32, split/merge + jax.jit gradients, attention weights, classifier pooling.

Everything runs under `jax.jit` over split state (how training and decoding call the models); tiny
configs keep compilation short.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxattn.models import DecoderLM, EncoderClassifier, EncoderDecoder, EncoderModel
from flaxattn.nn import TransformerConfig, capture_attention_weights, mean_pool

LLAMA = TransformerConfig(
    vocab_size=37, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32, num_layers=2,
    activation="silu", gated_mlp=True, norm="rmsnorm", use_bias=False, positions="rope",
    rotary_dim=2, max_length=16)
BERT = TransformerConfig(
    vocab_size=37, d_model=16, num_heads=2, mlp_dim=32, num_layers=2, activation="gelu",
    norm="layernorm", norm_eps=1e-12, pre_norm=False, final_norm=False, positions="learned",
    type_vocab_size=2, embedding_norm=True, max_length=16)

# Left-padded prompts of lengths 6, 4 and 1 (0 = padding), then 3 generated tokens each.
PROMPTS = np.array([[5, 6, 7, 8, 9, 10], [0, 0, 11, 12, 13, 14], [0, 0, 0, 0, 0, 15]])
PROMPT_MASK = (PROMPTS > 0).astype(np.int32)
NEW = np.array([[20, 21, 22], [23, 24, 25], [26, 27, 28]])
TOL = dict(atol=1e-5, rtol=1e-5)  # float32, same weights, different summation order


def call(model, *args, **static):
  """`model(*args, **static)` under jax.jit over split state (static keyword arguments)."""
  graphdef, state = nnx.split(model)

  @functools.partial(jax.jit)
  def run(state, *args):
    return nnx.merge(graphdef, state)(*args, **static)

  return run(state, *args)


def decode_incrementally(step, cache):
  """Prompt in two chunks, then one token at a time; returns the logits of every column."""
  logits = []
  for ids, mask in ((PROMPTS[:, :4], PROMPT_MASK[:, :4]), (PROMPTS[:, 4:], PROMPT_MASK[:, 4:])):
    out, cache = step(ids, mask, cache)
    logits.append(out)
  for t in range(NEW.shape[1]):
    out, cache = step(NEW[:, t:t + 1], np.ones((3, 1), np.int32), cache)
    logits.append(out)
  return np.concatenate(logits, axis=1)


def check_against_unpadded(logits, full_fn, row=1):
  """A left-padded row's real-token logits equal those of the row run alone without padding."""
  ids = np.concatenate([PROMPTS, NEW], 1)
  mask = np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1).astype(bool)
  alone = full_fn(ids[row:row + 1, mask[row]])
  np.testing.assert_allclose(logits[row, mask[row]], alone[0], **TOL)


@pytest.mark.parametrize("positions,scan", [
    ("rope", False), ("rope", True),
    pytest.param("alibi", False, marks=pytest.mark.slow),
    pytest.param("relative", True, marks=pytest.mark.slow),
    pytest.param("learned", False, marks=pytest.mark.slow)])
def test_decoder_lm_cache_matches_full_forward(positions, scan):
  config = dataclasses.replace(LLAMA, positions=positions, scan_layers=scan,
                               tie_embeddings=positions != "learned")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  step = jax.jit(lambda state, ids, mask, cache: nnx.merge(graphdef, state)(ids, mask, cache=cache))
  incremental = decode_incrementally(functools.partial(step, state), model.init_cache(3, 12))
  # The padded batch without cache agrees too.
  ids = np.concatenate([PROMPTS, NEW], 1)
  padded, _ = call(model, ids, np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1))
  valid = np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1).astype(bool)
  np.testing.assert_allclose(incremental[valid], np.asarray(padded)[valid], **TOL)
  check_against_unpadded(incremental, lambda ids: np.asarray(call(model, ids)[0]))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_encoder_decoder_cache_matches_full_forward(scan):
  config = dataclasses.replace(BERT, positions="sinusoidal", pre_norm=True, final_norm=True,
                               num_decoder_layers=3, scan_layers=scan)
  model = EncoderDecoder(config, share_embeddings=False, source_vocab_size=19, rngs=nnx.Rngs(0))
  source = np.array([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
  source_mask = (source > 0).astype(np.int32)
  graphdef, state = nnx.split(model)
  encoded = jax.jit(lambda s, ids, m: nnx.merge(graphdef, s).encode(ids, m))(state, source, source_mask)
  step = jax.jit(lambda s, encoded, ids, mask, cache: nnx.merge(graphdef, s).decode(
      ids, encoded, source_mask, mask, cache=cache))
  calls = []

  def recording_step(ids, mask, cache):
    # After the first call the cross-attention keys/values come from the cache: a zero `encoded`
    # (same shape) must give the same logits, so the encoder output is not projected again.
    real = step(state, encoded, ids, mask, cache)
    if calls:
      np.testing.assert_array_equal(step(state, jnp.zeros_like(encoded), ids, mask, cache)[0],
                                    real[0])
    calls.append(ids.shape)
    return real

  incremental = decode_incrementally(recording_step, model.init_cache(3, 12))
  assert len(calls) == 5
  ids = np.concatenate([PROMPTS, NEW], 1)
  full = np.asarray(call(model, source, ids, source_mask,
                         np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1)))
  valid = np.concatenate([PROMPT_MASK, np.ones_like(NEW)], 1).astype(bool)
  np.testing.assert_allclose(incremental[valid], full[valid], **TOL)
  # Source padding does not change a row's result.
  alone = np.asarray(call(model, source[2:, :1], ids[2:, valid[2]]))
  np.testing.assert_allclose(full[2, valid[2]], alone[0], **TOL)
  # A source of another length than the one cached is an error, not a silent mix.
  cache = step(state, encoded, PROMPTS[:, :1], PROMPT_MASK[:, :1], model.init_cache(3, 12))[1]
  with pytest.raises(ValueError, match="context of length 4"):
    jax.eval_shape(lambda: model.decode(PROMPTS[:, 1:2], encoded[:, :2], source_mask[:, :2],
                                        cache=cache))


def test_learned_positions_bound_sequence_and_cache_length():
  model = DecoderLM(BERT, rngs=nnx.Rngs(0))  # a table of max_length=16 positions
  with pytest.raises(ValueError, match="sequence length 17 exceeds max_length=16"):
    jax.eval_shape(lambda: model(np.zeros((1, 17), np.int32)))
  with pytest.raises(ValueError, match="max_length=17 of the cache exceeds config.max_length=16"):
    model.init_cache(1, 17)
  with pytest.raises(ValueError, match="max_length must be a positive int"):
    model.init_cache(1, 0)
  # An additive mask (0 = attend, -inf = padding) would read inverted as 1/0 padding flags.
  with pytest.raises(ValueError, match="attention_mask must hold 1/True"):
    model(PROMPTS, np.where(PROMPT_MASK > 0, 0.0, -np.inf))
  with pytest.raises(ValueError, match="positions must be integer"):
    model(PROMPTS, positions=np.zeros(PROMPTS.shape, np.float32))
  assert model.init_cache(1).self_attention[0].key.shape[1] == 16
  # RoPE has no table: a cache longer than config.max_length is fine.
  assert DecoderLM(LLAMA, rngs=nnx.Rngs(0)).init_cache(1, 40).self_attention[0].key.shape[1] == 40


def copy_scanned_to_unrolled(scanned, unrolled, stack="decoder"):
  """Loads the stacked `layers` parameters of a scanned model into an unrolled one."""
  stacked = nnx.state(getattr(scanned, stack).layers)
  for i, block in enumerate(getattr(unrolled, stack).layers):
    nnx.update(block, jax.tree.map(lambda a: a[i], stacked))
  for name in ("embedder", "lm_head"):
    if getattr(scanned, name, None) is not None:
      nnx.update(getattr(unrolled, name), nnx.state(getattr(scanned, name)))
  nnx.update(getattr(unrolled, stack).final_norm, nnx.state(getattr(scanned, stack).final_norm))


@pytest.mark.parametrize("remat", ["none", pytest.param("dots", marks=pytest.mark.slow)])
def test_scanned_equals_unrolled(remat):
  scanned = DecoderLM(dataclasses.replace(LLAMA, scan_layers=True, remat=remat), rngs=nnx.Rngs(0))
  unrolled = DecoderLM(dataclasses.replace(LLAMA, remat=remat), rngs=nnx.Rngs(1))
  copy_scanned_to_unrolled(scanned, unrolled)
  ids = PROMPTS
  np.testing.assert_allclose(call(scanned, ids, PROMPT_MASK)[0], call(unrolled, ids, PROMPT_MASK)[0],
                             **TOL)

  def loss(model, ids):
    return jnp.mean(model(ids)[0] ** 2)

  grads = [nnx.jit(nnx.grad(loss))(m, ids) for m in (scanned, unrolled)]
  q_scanned = grads[0]["decoder"]["layers"]["attention"]["query"]["kernel"][...]
  q_unrolled = jnp.stack([grads[1]["decoder"]["layers"][i]["attention"]["query"]["kernel"][...]
                          for i in range(2)])
  np.testing.assert_allclose(q_scanned, q_unrolled, atol=1e-6)


def test_bfloat16_compute_float32_params_close_to_float32():
  model32 = DecoderLM(LLAMA, rngs=nnx.Rngs(0))
  model16 = DecoderLM(dataclasses.replace(LLAMA, dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  (logits32, _), (logits16, _) = call(model32, PROMPTS), call(model16, PROMPTS)
  assert logits16.dtype == jnp.float32  # logits are returned in float32
  # bfloat16 keeps 8 mantissa bits: relative error ~4e-3 per op, a few percent of the logit scale.
  scale = float(jnp.std(logits32))
  assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.05 * scale + 0.02
  cache = model16.init_cache(3, 8)
  assert cache.self_attention[0].key.dtype == jnp.bfloat16


def test_split_merge_jit_train_step_gradient():
  config = dataclasses.replace(LLAMA, dropout_rate=0.1, scan_layers=True, remat="full")
  model = DecoderLM(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def train_step(params, ids, key):
    def loss_fn(params):
      logits, _ = nnx.merge(graphdef, params)(ids[:, :-1], deterministic=False, dropout_rng=key)
      labels = jax.nn.one_hot(ids[:, 1:], config.vocab_size)
      return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

  ids = jnp.asarray(np.concatenate([PROMPTS[:1], NEW[:1]], 1).repeat(2, 0))
  losses = []
  for step in range(4):
    params, loss = train_step(params, ids, jax.random.key(step))
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0], losses


@pytest.mark.slow  # Fast coverage: tests/test_attention_maps.py checks the weights against NumPy.
def test_attention_weights_every_layer():
  model = EncoderModel(BERT, rngs=nnx.Rngs(0))
  ids, mask = PROMPTS[:, ::-1].copy(), PROMPT_MASK[:, ::-1].copy()  # right padding, BERT-style
  hidden, weights = capture_attention_weights(model, ids, mask)
  weights = weights["encoder/layers/attention"]
  assert hidden.shape == (3, 6, 16) and len(weights) == BERT.num_layers
  for w in weights:
    assert w.shape == (3, 2, 6, 6)
    np.testing.assert_allclose(np.asarray(w)[mask.astype(bool)[:, None, :].repeat(2, 1)].sum(-1), 1.0,
                               atol=1e-5)
    assert np.all(np.asarray(w)[2, :, 0, 1:] == 0)  # row 2 has one real token
  forced = EncoderModel(dataclasses.replace(BERT, attention_impl="xla"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="return_weights"):
    capture_attention_weights(forced, ids, attention_impl=None)
  seq2seq = EncoderDecoder(dataclasses.replace(LLAMA, num_decoder_layers=1), rngs=nnx.Rngs(0))
  _, weights = capture_attention_weights(seq2seq, PROMPTS, NEW, PROMPT_MASK)
  named = {"encoder": weights["encoder/layers/attention"],
           "decoder": weights["decoder/layers/attention"],
           "cross": weights["decoder/layers/cross_attention"]}
  assert [len(named[k]) for k in ("encoder", "decoder", "cross")] == [2, 1, 1]
  assert named["cross"][0].shape == (3, 4, 3, 6)


def test_encoder_padding_invariance_and_classifier_pooling():
  model = EncoderModel(BERT, rngs=nnx.Rngs(0))
  ids, mask = PROMPTS[:, ::-1].copy(), PROMPT_MASK[:, ::-1].copy()
  types = np.zeros_like(ids)
  hidden = np.asarray(call(model, ids, mask, types))
  alone = np.asarray(call(model, ids[1:2, :4], None, types[1:2, :4]))
  np.testing.assert_allclose(hidden[1, :4], alone[0], **TOL)
  pooled = mean_pool(jnp.asarray(hidden), jnp.asarray(mask))
  np.testing.assert_allclose(pooled[1], alone[0].mean(0), **TOL)
  for pooling in ("first", "mean", "attention"):
    classifier = EncoderClassifier(BERT, 3, pooling=pooling, rngs=nnx.Rngs(0))
    logits = np.asarray(call(classifier, ids, mask))
    single = np.asarray(call(classifier, ids[1:2, :4]))
    assert logits.shape == (3, 3)
    np.testing.assert_allclose(logits[1], single[0], **TOL)
  with pytest.raises(ValueError, match="pooling"):
    EncoderClassifier(BERT, 3, pooling="max", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="attention_mask"):
    model(ids, mask[:, :3])
  with pytest.raises(ValueError, match="input_ids"):
    model(ids.astype(np.float32))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_tree_mode_jit_and_grad_match_graph_mode(scan):
  model = DecoderLM(dataclasses.replace(LLAMA, scan_layers=scan), rngs=nnx.Rngs(0))
  ids = jnp.asarray(PROMPTS)
  tree, _ = nnx.jit(lambda m, ids: m(ids), graph=False)(model, ids)
  np.testing.assert_allclose(tree, call(model, ids)[0], **TOL)
  loss = lambda m, ids: jnp.mean(m(ids)[0] ** 2)
  tree_grads = nnx.jit(nnx.grad(loss, graph=False), graph=False)(model, ids)
  graphdef, params = nnx.split(model, nnx.Param)
  graph_grads = jax.jit(jax.grad(lambda p: loss(nnx.merge(graphdef, p), ids)))(params)
  tree_grads = nnx.state(tree_grads, nnx.Param)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), tree_grads, graph_grads)
