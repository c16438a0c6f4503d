"""Autoregressive decoding: greedy, sampling (temperature, top-k, top-p) and beam search.

`generate(model, input_ids, max_new_tokens=N, ...)` works on a `DecoderLM` (continue prompts) and on an
`EncoderDecoder` (`input_ids` are the sources; targets start from `decoder_start_id`). Everything after
the argument checks is one `jax.jit` over the split model state (`nnx.split` / `nnx.merge`), compiled once
per model structure, shapes and options: a prefill of the prompts through the KV cache, then a
`jax.lax.while_loop` that feeds one token per row per iteration and stops when every row has finished
(or, for beam search, when no live hypothesis can still beat the finished ones). Nothing returns to the
host until the end.

Prompts of different lengths share one `[batch, prompt_len]` array; `prompt_lengths` (right padding) or
`attention_mask` (padding anywhere, e.g. left padding) says which tokens are real. The cache records each
token's position, so padding never changes a row's result: a row decodes exactly as it would alone.

Output layout: the input columns as given, then `max_new_tokens` new columns. A row that emits `eos_id`
keeps it and is padded with `pad_id` afterwards.

Beam search scores a hypothesis `y` of `n` new tokens (its `eos_id` included) as
`log p(y) / lp(n)` with the GNMT length penalty `lp(n) = ((5 + n) / 6) ** length_penalty` (Wu et al.
2016, alpha = 0.6 in "Attention Is All You Need"). Hypotheses are sequences that end in `eos_id` within
`max_new_tokens` tokens, or that reach `max_new_tokens` without it. At each step the `num_beams` best
extensions without `eos_id` stay live; an extension by `eos_id` becomes a finished hypothesis when it
ranks among the `num_beams` best extensions (fairseq's and Hugging Face's rule, so that one beam decodes
exactly as greedy). The search stops when no live beam can still beat the worst kept hypothesis.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.models.decoder import DecoderLM
from flaxattn.models.seq2seq import EncoderDecoder

METHODS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class _Options:
  """The static (compile-time) settings of one `generate` call."""

  method: str
  max_new_tokens: int
  temperature: float
  top_k: int | None
  top_p: float | None
  num_beams: int
  length_penalty: float
  eos_id: int | None
  pad_id: int
  decoder_start_id: int
  return_scores: bool
  max_length: int | None


def generate(model: DecoderLM | EncoderDecoder, input_ids, *, max_new_tokens: int,
             prompt_lengths=None, attention_mask=None, method: str = "greedy",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             num_beams: int | None = None, length_penalty: float = 0.6, eos_id: int | None = None,
             pad_id: int = 0, decoder_start_id: int | None = None, rng: jax.Array | None = None,
             return_scores: bool = False, max_length: int | None = None):
  """Generates up to `max_new_tokens` tokens per row.

  Args:
    model: a `DecoderLM` or an `EncoderDecoder` (then `input_ids` are the source ids).
    input_ids: int `[batch, prompt_len]` prompts (sources); every row needs at least one real token.
    max_new_tokens: tokens to generate per row (fewer when every row ends early; the output keeps
      `max_new_tokens` columns, padded).
    prompt_lengths: int `[batch]`: row `b`'s real tokens are its first `prompt_lengths[b]` (right
      padding). None = all real.
    attention_mask: `[batch, prompt_len]`, 1/True = real token, padding anywhere (instead of
      `prompt_lengths`).
    method: 'greedy' (argmax), 'sample' (with `temperature`, `top_k`, `top_p`, `rng`) or 'beam'.
    temperature: 'sample' draws from `softmax(logits / temperature)`.
    top_k: 'sample' keeps the `top_k` most likely tokens (ties with the k-th are kept too).
    top_p: 'sample' keeps the smallest set of most likely tokens whose probability (after
      temperature and top-k) reaches `top_p` (nucleus sampling).
    num_beams: hypotheses kept per row by 'beam' (default 4).
    length_penalty: GNMT alpha of 'beam' (0 = rank by total log-probability).
    eos_id: end-of-sequence token, or None to always generate `max_new_tokens`.
    pad_id: written after a row's `eos_id` (and in hypotheses beam search could not fill).
    decoder_start_id: first target token of an `EncoderDecoder` (default `pad_id`, as T5 and Marian).
    rng: PRNG key, required by 'sample'; the same key gives the same tokens.
    return_scores: also return scores (float32): for 'greedy'/'sample' `[batch]`, the summed model
      log-probabilities of the generated tokens (before temperature or filtering); for 'beam'
      `[batch, num_beams]`, each hypothesis' length-penalised score (-inf where none was found).
    max_length: slots of the KV cache, at least the prompt (1 for an `EncoderDecoder`) plus
      `max_new_tokens`; None = exactly that. A larger cache gives the same tokens: a step attends
      only the slots written so far.

  Returns:
    int32 tokens `[batch, prompt_len + max_new_tokens]` ('greedy', 'sample'; an `EncoderDecoder` gives
    `[batch, 1 + max_new_tokens]`, starting with `decoder_start_id`), or `[batch, num_beams, ...]` for
    'beam', best hypothesis first; with `return_scores`, `(tokens, scores)`.
  """
  if not isinstance(model, (DecoderLM, EncoderDecoder)):
    raise ValueError(f"model must be a DecoderLM or an EncoderDecoder, got {type(model).__name__}")
  input_ids = jnp.asarray(input_ids)
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(
        f"input_ids must be integer [batch, prompt_len], got shape {input_ids.shape} "
        f"dtype {input_ids.dtype}")
  valid = _valid_tokens(input_ids.shape, prompt_lengths, attention_mask)
  options = _options(
      model.config.vocab_size, method=method, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p,
      num_beams=(4 if method == "beam" else 1) if num_beams is None else num_beams,
      length_penalty=length_penalty, eos_id=eos_id, pad_id=pad_id,
      decoder_start_id=pad_id if decoder_start_id is None else decoder_start_id,
      return_scores=return_scores, max_length=max_length)
  if method == "sample" and rng is None:
    raise ValueError("method='sample' needs rng (a jax.random key)")
  needed = (1 if isinstance(model, EncoderDecoder) else input_ids.shape[1]) + max_new_tokens
  if max_length is not None and not (
      isinstance(max_length, (int, np.integer)) and max_length >= needed):
    raise ValueError(f"max_length (cache slots) must be an int >= {needed} (the prompt plus "
                     f"max_new_tokens), got {max_length!r}")
  graphdef, state = nnx.split(model)
  tokens, scores = _generate(graphdef, state, input_ids.astype(jnp.int32), valid,
                             jax.random.key(0) if rng is None else rng, options=options)
  return (tokens, scores) if return_scores else tokens


def _valid_tokens(shape, prompt_lengths, attention_mask) -> jax.Array:
  """bool `[batch, prompt_len]`, True = real token, from `prompt_lengths` or `attention_mask`."""
  batch, length = shape
  if prompt_lengths is not None and attention_mask is not None:
    raise ValueError("give prompt_lengths or attention_mask, not both")
  if prompt_lengths is not None:
    if tuple(np.shape(prompt_lengths)) != (batch,):
      raise ValueError(f"prompt_lengths must have shape ({batch},), got {np.shape(prompt_lengths)}")
    valid = jnp.arange(length)[None, :] < jnp.asarray(prompt_lengths)[:, None]
  elif attention_mask is not None:
    if tuple(np.shape(attention_mask)) != (batch, length):
      raise ValueError(
          f"attention_mask must have the shape of input_ids {(batch, length)}, "
          f"got {np.shape(attention_mask)}")
    valid = jnp.asarray(attention_mask).astype(bool)
  else:
    return jnp.ones(shape, bool)
  try:
    has_tokens = np.asarray(jnp.any(valid, axis=1))
  except jax.errors.TracerArrayConversionError:
    return valid  # Traced (generate called under jit): the values cannot be checked here.
  if not has_tokens.all():
    empty = np.flatnonzero(~has_tokens).tolist()
    raise ValueError(f"every prompt needs at least one real token; rows {empty} have none")
  return valid


def _options(vocab_size: int, **kwargs) -> _Options:
  """Checks the generation settings against each other and the vocabulary."""
  options = _Options(**kwargs)
  if options.method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {options.method!r}")
  if not isinstance(options.max_new_tokens, (int, np.integer)) or options.max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {options.max_new_tokens!r}")
  if options.method != "sample" and (
      options.temperature != 1.0 or options.top_k is not None or options.top_p is not None):
    raise ValueError(
        f"temperature, top_k and top_p apply to method='sample', got method={options.method!r} with "
        f"temperature={options.temperature}, top_k={options.top_k}, top_p={options.top_p}")
  if not options.temperature > 0:
    raise ValueError(f"temperature must be positive, got {options.temperature!r}")
  if options.top_k is not None and not (
      isinstance(options.top_k, (int, np.integer)) and 1 <= options.top_k <= vocab_size):
    raise ValueError(f"top_k must be an int in [1, vocab_size={vocab_size}], got {options.top_k!r}")
  if options.top_p is not None and not 0.0 < options.top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {options.top_p!r}")
  if not isinstance(options.num_beams, (int, np.integer)) or options.num_beams < 1:
    raise ValueError(f"num_beams must be a positive int, got {options.num_beams!r}")
  if options.method != "beam" and options.num_beams != 1:
    raise ValueError(
        f"num_beams applies to method='beam', got method={options.method!r} with "
        f"num_beams={options.num_beams}")
  for name in ("eos_id", "pad_id", "decoder_start_id"):
    value = getattr(options, name)
    if value is not None and not (isinstance(value, (int, np.integer)) and 0 <= value < vocab_size):
      raise ValueError(f"{name} must be a token id in [0, vocab_size={vocab_size}), got {value!r}")
  return options


def _length_penalty(length, alpha: float):
  """GNMT length penalty `((5 + length) / 6) ** alpha` (Wu et al. 2016); `length` counts new tokens."""
  return ((5.0 + length) / 6.0) ** alpha


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Sampling logits `[..., vocab]` (float32): divided by `temperature`, tokens outside the top-k and
  outside the top-p nucleus (in that order, as Hugging Face) set to -inf.
  """
  logits = logits.astype(jnp.float32) / temperature
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays; a token stays while the mass before it is below top_p.
    threshold = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


# Beam search moves the cache's written slots to their new beams this many slots at a time.
REORDER_CHUNK = 64


def _cache_axes(init_cache, max_length: int):
  """`(batch_axes, length_axes)`: for each cache leaf its batch axis and its slot axis, found by
  comparing abstract caches of batch 1 vs 2 and of `max_length` slots vs one fewer (not one more:
  learned positions may cap the length); None where a leaf has no such axis (the write index; a
  cross-attention or recurrent state has no slot axis)."""
  base = jax.eval_shape(lambda: init_cache(1, max_length))
  wider = jax.eval_shape(lambda: init_cache(2, max_length))
  other = jax.eval_shape(lambda: init_cache(1, max_length - 1 if max_length > 1 else 2))

  def axis(a, b):
    differ = [i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    return differ[0] if differ else None

  return jax.tree.map(axis, base, wider), jax.tree.map(axis, base, other)


def _take_rows(tree, rows: jax.Array, axes):
  """Gathers `rows` (int `[new_batch]`) along each leaf's batch axis (`axes`: a tree of ints / None)."""
  return jax.tree.map(lambda a, axis: a if axis is None else jnp.take(a, rows, axis=axis), tree, axes)


def _reorder_rows(cache, rows: jax.Array, axes, filled):
  """`_take_rows` for a permutation `rows` `[batch]`, moving only the `filled` (traced) written slots.

  Leaves with a slot axis are moved `REORDER_CHUNK` slots at a time, in place, so a beam-search step
  costs what its tokens cost, not what the cache could hold (the slots past `filled` are empty in
  every row; they stay as they are). The last chunk is clamped to the end of the cache; slots it
  shares with the chunk before are kept as already moved. `axes`: `(batch_axes, length_axes)` from
  `_cache_axes`.
  """
  batch_axes, length_axes = axes
  leaves, treedef = jax.tree.flatten(cache)
  batch_axes = treedef.flatten_up_to(batch_axes)
  length_axes = treedef.flatten_up_to(length_axes)
  sliced = [i for i, axis in enumerate(length_axes) if axis is not None]
  leaves = [leaf if axis is None or i in sliced else jnp.take(leaf, rows, axis=axis)
            for i, (leaf, axis) in enumerate(zip(leaves, batch_axes))]
  if sliced:
    max_length = leaves[sliced[0]].shape[length_axes[sliced[0]]]
    chunk = min(REORDER_CHUNK, max_length)

    def move(index, leaves):
      wanted = index * chunk
      start = jnp.minimum(wanted, max_length - chunk)
      leaves = list(leaves)
      for i in sliced:
        leaf, length_axis = leaves[i], length_axes[i]
        piece = jax.lax.dynamic_slice_in_dim(leaf, start, chunk, axis=length_axis)
        slot = start + jnp.arange(chunk)
        fresh = ((slot >= wanted) & (slot < filled)).reshape(
            (-1,) + (1,) * (leaf.ndim - 1 - length_axis))
        piece = jnp.where(fresh, jnp.take(piece, rows, axis=batch_axes[i]), piece)
        leaves[i] = jax.lax.dynamic_update_slice_in_dim(leaf, piece, start, axis=length_axis)
      return leaves

    leaves = jax.lax.fori_loop(0, (filled + chunk - 1) // chunk, move, leaves)
  return jax.tree.unflatten(treedef, leaves)


@functools.partial(jax.jit, static_argnames=("graphdef", "options"))
def _generate(graphdef, state, input_ids, valid, rng, *, options: _Options):
  model = nnx.merge(graphdef, state)
  batch = input_ids.shape[0]
  if isinstance(model, EncoderDecoder):
    context = (model.encode(input_ids, valid), valid)
    prompt = jnp.full((batch, 1), options.decoder_start_id, jnp.int32)
    prompt_valid = jnp.ones((batch, 1), bool)

    def call(ids, mask, cache, context):
      return model.decode(ids, context[0], context[1], mask, cache=cache)
  else:
    context, prompt, prompt_valid = None, input_ids, valid

    def call(ids, mask, cache, context):
      del context  # A decoder-only model has none.
      return model(ids, mask, cache=cache)

  max_length = options.max_length or prompt.shape[1] + options.max_new_tokens
  cache = model.init_cache(batch, max_length)
  # Each row continues from its last real token (right padding: not the last column).
  last = prompt.shape[1] - 1 - jnp.argmax(prompt_valid[:, ::-1], axis=1)
  if isinstance(model, EncoderDecoder):
    logits, cache = call(prompt, prompt_valid, cache, context)
    logits = logits[jnp.arange(batch), last]
  else:  # Only the last real token's logits: no vocabulary projection of the rest of the prompt.
    logits, cache = model(prompt, prompt_valid, cache=cache, logits_at=last)
    logits = logits[:, 0]

  def step(tokens, cache, context):
    logits, cache = call(tokens[:, None], None, cache, context)
    return logits[:, 0], cache

  if options.method == "beam":
    cache_axes = _cache_axes(model.init_cache, max_length)
    rows = jnp.repeat(jnp.arange(batch), options.num_beams)
    cache = _take_rows(cache, rows, cache_axes[0])
    context = None if context is None else jax.tree.map(lambda a: a[rows], context)
    return _beam_search(step, prompt, jnp.repeat(logits, options.num_beams, axis=0), cache,
                        context, cache_axes, options)
  return _sample(step, prompt, logits, cache, context, rng, options)


def _write_column(tokens: jax.Array, column: jax.Array, index) -> jax.Array:
  """`tokens [..., length]` with `column [...]` written at `index` (traced) of the last axis."""
  start = (0,) * (tokens.ndim - 1) + (index,)
  return jax.lax.dynamic_update_slice(tokens, column[..., None], start)


def _sample(step, prompt, logits, cache, context, rng, options: _Options):
  """Greedy or sampled decoding; returns tokens `[batch, prompt_len + new]` and scores `[batch]`."""
  batch, prompt_len = prompt.shape
  tokens = jnp.full((batch, prompt_len + options.max_new_tokens), options.pad_id, jnp.int32)
  tokens = tokens.at[:, :prompt_len].set(prompt)

  def choose(carry, logits):
    index, tokens, finished, scores = carry
    if options.method == "greedy":
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      filtered = filter_logits(logits, temperature=options.temperature, top_k=options.top_k,
                               top_p=options.top_p)
      token = jax.random.categorical(jax.random.fold_in(rng, index), filtered).astype(jnp.int32)
    token = jnp.where(finished, options.pad_id, token)
    if options.return_scores:
      log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
      scores = scores + jnp.where(finished, 0.0, log_prob)
    tokens = _write_column(tokens, token, prompt_len + index)
    if options.eos_id is not None:
      finished = finished | (token == options.eos_id)
    return (index + 1, tokens, finished, scores), token

  start = (jnp.int32(0), tokens, jnp.zeros(batch, bool), jnp.zeros(batch, jnp.float32))
  carry, token = choose(start, logits)

  def cond(loop):
    (index, _, finished, _), _, _ = loop
    return (index < options.max_new_tokens) & ~jnp.all(finished)

  def body(loop):
    carry, token, cache = loop
    logits, cache = step(token, cache, context)
    carry, token = choose(carry, logits)
    return carry, token, cache

  (_, tokens, _, scores), _, _ = jax.lax.while_loop(cond, body, (carry, token, cache))
  return tokens, scores


def _beam_search(step, prompt, logits, cache, context, cache_axes, options: _Options):
  """Beam search over `num_beams` hypotheses per row.

  `logits` `[batch * beams, vocab]` and `cache` already hold each prompt repeated `beams` times;
  `cache_axes` as `_cache_axes` gives them.
  Returns tokens `[batch, beams, prompt_len + new]` and scores `[batch, beams]`, best first.
  """
  beams, alpha, eos_id = options.num_beams, options.length_penalty, options.eos_id
  batch, prompt_len = prompt.shape
  vocab = logits.shape[-1]
  total = prompt_len + options.max_new_tokens
  tokens = jnp.full((batch, beams, total), options.pad_id, jnp.int32)
  tokens = tokens.at[:, :, :prompt_len].set(prompt[:, None, :])
  # All beams start as the same prompt: only beam 0 is live, so the first step does not pick
  # duplicates.
  live_log_probs = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (beams - 1), jnp.float32), (batch, 1))
  finished_scores = jnp.full((batch, beams), -jnp.inf, jnp.float32)
  finished_tokens = tokens

  def select(carry, cache, logits):
    index, tokens, live_log_probs, finished_tokens, finished_scores = carry
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, beams, vocab)
    candidates = live_log_probs[:, :, None] + log_probs  # [batch, beams, vocab]
    if eos_id is not None:
      # A live beam ending here in eos is a finished hypothesis of index + 1 new tokens when it ranks
      # among the best `beams` candidates (as fairseq and Hugging Face: one beam is then greedy).
      kth_best = jax.lax.top_k(candidates.reshape(batch, beams * vocab), beams)[0][:, -1:]
      ended = _write_column(tokens, jnp.full((batch, beams), eos_id, jnp.int32), prompt_len + index)
      ended_scores = jnp.where(candidates[:, :, eos_id] >= kth_best,
                               candidates[:, :, eos_id] / _length_penalty(index + 1, alpha),
                               -jnp.inf)
      finished_tokens, finished_scores = _best(
          jnp.concatenate([finished_tokens, ended], axis=1),
          jnp.concatenate([finished_scores, ended_scores], axis=1), beams)
      candidates = candidates.at[:, :, eos_id].set(-jnp.inf)
    live_log_probs, flat = jax.lax.top_k(candidates.reshape(batch, beams * vocab), beams)
    parent, token = flat // vocab, (flat % vocab).astype(jnp.int32)
    tokens = jnp.take_along_axis(tokens, parent[:, :, None], axis=1)
    tokens = _write_column(tokens, token, prompt_len + index)
    rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
    # The prefill wrote the prompt, each step since one token.
    cache = _reorder_rows(cache, rows, cache_axes, prompt_len + index)
    carry = (index + 1, tokens, live_log_probs, finished_tokens, finished_scores)
    return carry, token.reshape(-1), cache

  def cond(loop):
    (index, _, live_log_probs, _, finished_scores), _, _ = loop
    # The best score a live beam can still reach: its log-probability only falls, so the bound is
    # its current value over the largest penalty among the lengths still possible.
    best_length = options.max_new_tokens if alpha >= 0 else index + 1
    best_live = jnp.max(live_log_probs, axis=1) / _length_penalty(best_length, alpha)
    settled = jnp.all(best_live < finished_scores[:, -1])
    return (index < options.max_new_tokens) & ~settled

  def body(loop):
    carry, token, cache = loop
    logits, cache = step(token, cache, context)
    return select(carry, cache, logits)

  start = (jnp.int32(0), tokens, live_log_probs, finished_tokens, finished_scores)
  loop = jax.lax.while_loop(cond, body, select(start, cache, logits))
  index, tokens, live_log_probs, finished_tokens, finished_scores = loop[0]
  # Live beams that reached max_new_tokens are hypotheses too; after an early stop none can win.
  live_scores = jnp.where(index == options.max_new_tokens,
                          live_log_probs / _length_penalty(options.max_new_tokens, alpha),
                          -jnp.inf)
  tokens, scores = _best(jnp.concatenate([finished_tokens, tokens], axis=1),
                         jnp.concatenate([finished_scores, live_scores], axis=1), beams)
  tokens = jnp.where(jnp.isneginf(scores)[:, :, None], options.pad_id, tokens)
  return tokens, scores


def _best(tokens: jax.Array, scores: jax.Array, count: int):
  """The `count` best hypotheses per row: tokens `[batch, n, length]`, scores `[batch, n]`."""
  scores, order = jax.lax.top_k(scores, count)
  return jnp.take_along_axis(tokens, order[:, :, None], axis=1), scores
