"""A tiny DecoderLM with random (not init-valued) weights, and its forward pass in float64 NumPy,
written from the architecture, not from flaxattn's code: the reference of the interpret tests. The
NumPy pass returns every canonical activation and can change any of them (`edit`) or knock out
attention edges, so interventions are checked against it."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.models import DecoderLM
from flaxattn.nn import TransformerConfig

CONFIG = TransformerConfig(vocab_size=23, d_model=16, num_heads=4, kv_heads=2, mlp_dim=32,
                           num_layers=2, positions="learned", max_length=8, tie_embeddings=True,
                           activation="relu", norm_eps=1e-5)
IDS = jnp.asarray([[3, 5, 7, 9, 11, 2], [4, 6, 8, 10, 12, 1]], jnp.int32)


@functools.lru_cache(maxsize=4)  # Built once per process for every test file.
def tiny_models(**overrides):
  """`(unrolled, scanned)` DecoderLMs with the same random weights (biases and norm scales too),
  filled into abstract models (eager initialisation is slow); shared, so callers must not change
  them."""
  config = dataclasses.replace(CONFIG, **overrides)
  rng = np.random.default_rng(7)
  unrolled = random_model(lambda: DecoderLM(config, rngs=nnx.Rngs(0)), rng)
  values = nnx.to_pure_dict(nnx.state(unrolled))
  values["decoder"]["layers"] = jax.tree.map(lambda *a: np.stack(a),
                                             *[values["decoder"]["layers"][i]
                                               for i in range(config.num_layers)])
  flat = dict(nnx.to_flat_state(nnx.state(values)))
  scanned = filled(lambda: DecoderLM(dataclasses.replace(config, scan_layers=True),
                                     rngs=nnx.Rngs(0)), lambda path, shape: flat[path])
  return unrolled, scanned


def random_model(build, rng):
  """The model `build()` makes, with random weights: norm scales about 1, the rest about 0."""
  return filled(build, lambda path, shape: (path[-1] == "scale") + 0.3 * rng.standard_normal(shape))


def filled(build, value_of):
  """The model `build()` makes (traced abstractly, not run) with every variable `value_of(path,
  shape)` (float32)."""
  graphdef, state = nnx.split(nnx.eval_shape(build))
  pure = nnx.to_pure_dict(state)
  for path, variable in nnx.to_flat_state(state):
    target = pure
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = jnp.asarray(np.asarray(value_of(path, variable.shape)), jnp.float32)
  nnx.replace_by_pure_dict(state, pure)
  return nnx.merge(graphdef, state)


def _layernorm(x, norm, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * norm["scale"] + norm["bias"]


def numpy_forward(model: DecoderLM, ids, *, edit=None, knockout=None):
  """Every canonical activation of `model(ids)` (unrolled, pre-LN, learned positions, ReLU, tied),
  float64. `edit`: {name: function of the activation -> its replacement}; `knockout=(layer, edges
  [q, kv])`: those logits -inf in every head of that layer."""
  edit = edit or {}
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
  eps, heads, kv_heads = model.config.norm_eps, model.config.num_heads, model.config.kv_heads
  ids = np.asarray(ids)
  length = ids.shape[1]
  acts = {}

  def put(name, value):
    if name in edit:
      value = edit[name](np.array(value))
    acts[name] = value
    return value

  table = params["embedder"]["token"]["embedding"]
  x = put("embed", table[ids] + params["embedder"]["position"]["embedding"][np.arange(length)])
  causal = np.tril(np.ones((length, length), bool))
  for i in range(model.config.num_layers):
    block = params["decoder"]["layers"][i]
    att = block["attention"]
    x = put(f"blocks.{i}.resid_pre", x)
    h = _layernorm(x, block["attention_norm"], eps)
    q = np.einsum("btd,dhk->bthk", h, att["query"]["kernel"]) + att["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", h, att["key"]["kernel"]) + att["key"]["bias"]
    v = np.einsum("btd,dhk->bthk", h, att["value"]["kernel"]) + att["value"]["bias"]
    q, k, v = (put(f"blocks.{i}.attn.{n}", a) for n, a in (("q", q), ("k", k), ("v", v)))
    k_full, v_full = (np.repeat(a, heads // kv_heads, axis=2) for a in (k, v))
    logits = np.einsum("bqhk,bshk->bhqs", q, k_full) / np.sqrt(q.shape[-1])
    visible = causal.copy()
    if knockout is not None and knockout[0] == i:
      visible &= ~np.asarray(knockout[1], bool)
    logits = np.where(visible, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    weights = put(f"blocks.{i}.attn.pattern", weights)
    z = put(f"blocks.{i}.attn.z", np.einsum("bhqs,bshk->bqhk", weights, v_full))
    out = put(f"blocks.{i}.attn.out",
              np.einsum("bqhk,hkd->bqd", z, att["out"]["kernel"]) + att["out"]["bias"])
    x = put(f"blocks.{i}.resid_mid", x + out)
    mlp = block["mlp"]
    hidden = put(f"blocks.{i}.mlp.hidden", np.maximum(
        _layernorm(x, block["mlp_norm"], eps) @ mlp["up"]["kernel"] + mlp["up"]["bias"], 0.0))
    x = put(f"blocks.{i}.resid_post", x + put(
        f"blocks.{i}.mlp.out", hidden @ mlp["down"]["kernel"] + mlp["down"]["bias"]))
  final = put("final_norm", _layernorm(x, params["decoder"]["final_norm"], eps))
  put("logits", final @ table.T)
  return acts
