"""Basic layers with logical axis names: Dense, Embed, LayerNorm, RMSNorm, MLP, and dropout.

Parameters are stored in `param_dtype` and cast to the compute `dtype` when used; norms compute in
float32 whatever the compute dtype, and cast back.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxattn.nn.hooks import hook
from flaxattn.nn.sharding import param

default_kernel_init = nnx.initializers.lecun_normal()


def concrete(x) -> np.ndarray | None:
  """`x`'s values when known now (not traced under `jit`), for checks that need them; else None."""
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    return None


def _tuple(x) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


def activation_fn(name: str):
  """The function for a `TransformerConfig.activation` name."""
  functions = {
      "gelu": lambda x: jax.nn.gelu(x, approximate=False),
      "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
      "relu": jax.nn.relu,
      "silu": jax.nn.silu,
  }
  if name not in functions:
    raise ValueError(f"activation must be one of {sorted(functions)}, got {name!r}")
  return functions[name]


def dropout(x: jax.Array, rate: float, rng: jax.Array | None, deterministic: bool) -> jax.Array:
  """Inverted dropout of `x` at `rate`; identity when `deterministic` or `rate == 0`."""
  if deterministic or rate == 0.0:
    return x
  if rng is None:
    raise ValueError(f"dropout with rate {rate} and deterministic=False needs a dropout_rng, got None")
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Dense(nnx.Module):
  """A linear map from the last `len(in_features)` dims of `x` to `out_features` dims.

  `kernel` is `[*in_features, *out_features]` (e.g. `[embed, heads, head_dim]` for a query projection),
  `bias` is `[*out_features]`; `in_axes`/`out_axes` are their logical names.
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int], *,
               in_axes: Sequence[str | None], out_axes: Sequence[str | None], use_bias: bool = True,
               kernel_init=default_kernel_init, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.in_features, self.out_features = _tuple(in_features), _tuple(out_features)
    self.dtype = dtype
    # Fan-in is the product of the contracted dims, so lecun init scales as for a flat matrix.
    flat_init = lambda key, shape, dtype: kernel_init(
        key, (math.prod(self.in_features), math.prod(self.out_features)), dtype).reshape(shape)
    self.kernel = param(rngs, flat_init, self.in_features + self.out_features,
                        tuple(in_axes) + tuple(out_axes), param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, self.out_features, out_axes, param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x`: `[..., *in_features]` -> `[..., *out_features]` in the compute dtype."""
    n_in = len(self.in_features)
    if tuple(x.shape[x.ndim - n_in:]) != self.in_features:
      raise ValueError(f"Dense expects input [..., {self.in_features}], got shape {x.shape}")
    kernel = self.kernel[...].astype(self.dtype)
    y = jax.lax.dot_general(
        x.astype(self.dtype), kernel,
        ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `embedding [vocab, embed]`; `attend` gives tied output logits."""

  def __init__(self, num_embeddings: int, features: int, *, vocab_axis: str = "vocab",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.num_embeddings, self.features, self.dtype = num_embeddings, features, dtype
    self.embedding = param(rngs, nnx.initializers.normal(stddev=1.0 / math.sqrt(features)),
                           (num_embeddings, features), (vocab_axis, "embed"), param_dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """`ids`: int `[...]` in `[0, num_embeddings)` -> `[..., features]` in the compute dtype.

    Ids outside the table raise ValueError when their values are known (eager calls); under `jit`
    they give NaN rows rather than another token's embedding (a negative id would otherwise wrap
    around to the end of the table).
    """
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
      raise ValueError(f"Embed expects integer ids, got dtype {jnp.result_type(ids)}")
    values = concrete(ids)
    if values is not None and values.size and (
        values.min() < 0 or values.max() >= self.num_embeddings):
      raise ValueError(
          f"ids must be in [0, {self.num_embeddings}), got values in [{values.min()}, {values.max()}]")
    ids = jnp.where(ids < 0, self.num_embeddings, ids)
    return jnp.take(self.embedding[...], ids, axis=0, mode="fill").astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`x`: `[..., features]` -> logits `[..., num_embeddings]` against the table (tied output)."""
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class LayerNorm(nnx.Module):
  """`(x - mean) / sqrt(var + eps) * scale + bias` over the last axis, computed in float32."""

  def __init__(self, features: int, *, eps: float = 1e-6, use_bias: bool = True,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), ("embed",), param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (features,), ("embed",), param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x`: `[..., features]` -> same shape, compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """`x / sqrt(mean(x^2) + eps) * scale` over the last axis, computed in float32 (Llama's RMSNorm)."""

  def __init__(self, features: int, *, eps: float = 1e-6, axis_name: str | None = "embed",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    self.eps, self.dtype = eps, dtype
    self.scale = param(rngs, nnx.initializers.ones, (features,), (axis_name,), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x`: `[..., features]` -> same shape, compute dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, features: int, *, eps: float, use_bias: bool = True, dtype: Any,
              param_dtype: Any, rngs: nnx.Rngs) -> LayerNorm | RMSNorm:
  """A `LayerNorm` or `RMSNorm` by `TransformerConfig.norm` name."""
  if kind == "layernorm":
    return LayerNorm(features, eps=eps, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)
  if kind == "rmsnorm":
    return RMSNorm(features, eps=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class MLP(nnx.Module):
  """Position-wise feed-forward: `down(act(up(x)))`, or gated `down(act(gate(x)) * up(x))`.

  Gated with 'silu' is SwiGLU (Llama), with 'gelu' GeGLU. Kernels: `up`/`gate` `[embed, mlp]`,
  `down` `[mlp, embed]`.
  """

  def __init__(self, features: int, hidden: int, *, activation: str = "gelu", gated: bool = False,
               use_bias: bool = True, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    activation_fn(activation)  # Validates the name now; called by name so the module stays hashable.
    self.activation = activation
    dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.up = Dense(features, hidden, in_axes=("embed",), out_axes=("mlp",), **dense)
    self.gate = (Dense(features, hidden, in_axes=("embed",), out_axes=("mlp",), **dense)
                 if gated else None)
    self.down = Dense(hidden, features, in_axes=("mlp",), out_axes=("embed",), **dense)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x`: `[..., embed]` -> same shape, compute dtype."""
    act = activation_fn(self.activation)
    hidden = act(self.up(x)) if self.gate is None else act(self.gate(x)) * self.up(x)
    return hook(self, "out", self.down(hook(self, "hidden", hidden)))
