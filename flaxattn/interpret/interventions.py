"""Interventions as data: head ablation, activation and path patching, attention knockout, steering.

An `Intervention` is a pytree (arrays as leaves, where it acts and how as static fields), so a list
of them is an argument of one jitted call (`run_with_interventions`), and a batch of them, made
by `jax.vmap` over a constructor, is a whole sweep over (layer, head) or (layer, position) in one
compiled program (`sweep`). The layer an intervention acts at is a traced value compared with the
running layer (a scanned stack's index is traced too); positions and heads are index arrays.

`attribution_patching` is the linear approximation of activation patching (Nanda 2023): the
metric's linearization at the clean run (`jax.linearize`), applied to `corrupt - clean` at every
element of a point at once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.interpret.hooks import (LAYER, Handler, call_marked, marked_view, run_with_cache,
                                      split_layer, stack_layers)

OPS = ("set", "add", "knockout")
# The axes that `positions` and `heads` index, by local point name; others take positions on 1.
_HEAD_AXIS = {"q": 2, "k": 2, "v": 2, "z": 2, "pattern": 1}
_POSITION_AXIS = {"pattern": 2}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Intervention:
  """One change to one hook point of a call.

  Attributes:
    site: the point with a `{layer}` field inside blocks ('blocks.{layer}.attn.z',
      'decoder.blocks.{layer}.cross_attn.pattern', 'embed'), static.
    op: static: 'set' (replace by `value`), 'add' (add `value`), or 'knockout' (a 'pattern' point:
      the `edges` are removed and each touched row renormalised: attention with those logits -inf).
    value: broadcastable to the point's activation (`[layers, ...]` with `per_layer`), or None.
    layer: int32 scalar, the layer it acts at (block points), or None: every layer.
    positions: int `[n]`, the positions it acts at (query positions of 'pattern'), or None: all.
    heads: int `[n]`, the heads it acts at (q/k/v/z/pattern; kv heads for k/v), or None: all.
    edges: 'knockout': bool broadcastable to `[batch, heads, q_len, kv_len]`, True = removed.
    per_layer: static: `value` carries a leading `[layers]` axis, picked by the running layer.
  """

  site: str = dataclasses.field(metadata=dict(static=True))
  op: str = dataclasses.field(metadata=dict(static=True))
  value: Any = None
  layer: Any = None
  positions: Any = None
  heads: Any = None
  edges: Any = None
  per_layer: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def __post_init__(self):
    if self.op not in OPS:
      raise ValueError(f"Intervention op must be one of {OPS}, got {self.op!r}")
    if self.op == "knockout" and not self.site.endswith(".pattern"):
      raise ValueError(f"a knockout acts at an attention 'pattern' point, got site {self.site!r}")
    if self.op != "knockout" and self.value is None:
      raise ValueError(f"an Intervention with op={self.op!r} needs a value")

  def apply(self, x: jax.Array, layer: Any) -> jax.Array:
    """`x` (the activation at `site` in the running `layer`, None outside blocks) intervened."""
    if (isinstance(self.layer, int) and isinstance(layer, int) and self.layer != layer):
      return x  # Both known while tracing (an unrolled stack): nothing to add to the trace.
    hit = self._where(x.shape)
    if self.layer is not None and layer is not None:
      at_layer = jnp.asarray(layer) == jnp.asarray(self.layer)
      hit = at_layer if hit is None else hit & at_layer
    if self.op == "knockout":
      return _knock_out(x, self.edges, hit)
    value = self.value
    if self.per_layer:
      value = jnp.asarray(value)[layer]
    new = value if self.op == "set" else x + value
    new = jnp.broadcast_to(jnp.asarray(new, x.dtype), x.shape)
    return new if hit is None else jnp.where(hit, new, x)

  def _where(self, shape: tuple[int, ...]) -> jax.Array | None:
    """Bool broadcastable to `shape`: the positions and heads acted at (None: everywhere)."""
    point = self.site.rsplit(".", 1)[-1]
    hit = None
    for indices, axis in ((self.positions, _POSITION_AXIS.get(point, 1)),
                          (self.heads, _HEAD_AXIS.get(point))):
      if indices is None:
        continue
      if axis is None or axis >= len(shape):
        raise ValueError(f"{self.site!r} has no {'heads' if indices is self.heads else 'positions'}"
                         f" axis (activation shape {shape}); leave that argument None")
      chosen = jnp.any(jnp.arange(shape[axis])[:, None] == jnp.atleast_1d(indices)[None], axis=1)
      chosen = chosen.reshape([shape[axis] if a == axis else 1 for a in range(len(shape))])
      hit = chosen if hit is None else hit & chosen
    return hit


def _knock_out(weights, edges, hit):
  """`weights` `[batch, heads, q, kv]` with `edges & hit` removed and the rows they touch
  renormalised over what is left (all-removed rows: zeros); other rows unchanged."""
  removed = jnp.broadcast_to(jnp.asarray(edges, bool), weights.shape)
  if hit is not None:
    removed = removed & hit
  kept = jnp.where(removed, 0.0, weights)
  total = jnp.sum(kept, axis=-1, keepdims=True)
  renormalised = kept / jnp.where(total > 0, total, 1.0)
  return jnp.where(jnp.any(removed, axis=-1, keepdims=True), renormalised, weights).astype(
      weights.dtype)


def _site(name: str, layer: Any) -> tuple[str, Any]:
  """(template, layer) from 'blocks.3.attn.z', or 'blocks.{layer}.attn.z' / 'blocks.*.attn.z'
  with `layer`."""
  name = name.replace("*", LAYER)
  template, index = split_layer(name)
  if index is not None:
    if layer is not None:
      raise ValueError(f"{name!r} names its layer; pass layer=None (or a template with {LAYER})")
    return template, index
  return template, layer


def patch(name: str, value: Any, *, layer: Any = None, positions: Any = None,
          heads: Any = None) -> Intervention:
  """Activation patching: `name`'s activation replaced by `value` (e.g. from another run's cache),
  at `positions` and `heads` (None: all).

  `name`: 'blocks.3.resid_pre', or a template 'blocks.{layer}.resid_pre' with `layer` (an int or a
  traced int32 scalar, for sweeps). `value` broadcastable to the activation.
  """
  site, layer = _site(name, layer)
  return Intervention(site, "set", value, layer, positions, heads)


def patch_every_layer(name: str, values: jax.Array, *, positions: Any = None,
                      heads: Any = None) -> Intervention:
  """`name` ('blocks.{layer}.attn.z') at every layer replaced by `values[layer]` (`[layers, ...]`,
  e.g. `stack_layers(cache, name)`)."""
  site, layer = _site(name, None)
  if layer is not None or LAYER not in site:
    raise ValueError(f"patch_every_layer takes a per-layer template like 'blocks.{{layer}}.attn.z', "
                     f"got {name!r}")
  return Intervention(site, "set", values, None, positions, heads, per_layer=True)


def steer(name: str, vector: jax.Array, *, scale: Any = 1.0, layer: Any = None,
          positions: Any = None) -> Intervention:
  """A steering vector: `scale * vector` (`[d_model]`, or broadcastable) added at `name` (e.g.
  'blocks.3.resid_post'; a template with `layer=None` acts at every layer)."""
  site, layer = _site(name, layer)
  return Intervention(site, "add", jnp.asarray(scale) * jnp.asarray(vector), layer, positions)


def ablate_head(layer: Any, head: Any, *, kind: str = "zero", reference: jax.Array | None = None,
                key: jax.Array | None = None, positions: Any = None,
                attention: str = "blocks.{layer}.attn") -> Intervention:
  """Head ablation: head `head` of layer `layer` outputs (its `z`, before the output projection)
  zero, its mean, or another input's value.

  Args:
    layer: an int or a traced int32 scalar.
    head: the same (or an int array: several heads).
    kind: 'zero'; 'mean' (the head's `z` averaged over `reference`'s batch and positions); or
      'resample' (the head's `z` on `reference`'s inputs, rows drawn with `key`).
    reference: 'mean'/'resample': `z` of reference inputs at every layer, `[layers, batch, len,
      heads, value_dim]` (`stack_layers(cache, 'blocks.{layer}.attn.z')`); for 'resample' of the
      same batch and length as the run.
    key: 'resample': the PRNG key of the row permutation.
    positions: the positions ablated (None: all).
    attention: the attention's prefix ('decoder.blocks.{layer}.cross_attn', ...).
  """
  site = f"{attention}.z"
  if kind == "zero":
    value = jnp.zeros(())
  elif kind in ("mean", "resample"):
    if reference is None or jnp.ndim(reference) != 5:
      raise ValueError(f"kind={kind!r} needs reference z [layers, batch, len, heads, value_dim], got "
                       f"{None if reference is None else jnp.shape(reference)}")
    at_layer = jnp.asarray(reference)[layer]
    if kind == "mean":
      value = jnp.mean(at_layer, axis=(0, 1))
    else:
      if key is None:
        raise ValueError("kind='resample' needs a PRNG key for the row permutation, got key=None")
      value = at_layer[jax.random.permutation(key, at_layer.shape[0])]
  else:
    raise ValueError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
  return Intervention(site, "set", value, layer, positions, jnp.atleast_1d(head))


def knock_out(layer: Any, edges: jax.Array, *, heads: Any = None,
              attention: str = "blocks.{layer}.attn") -> Intervention:
  """Attention knockout: the attention edges `edges` (bool, broadcastable to `[batch, heads,
  q_len, kv_len]`, True = removed, e.g. `[q_len, kv_len]`) of layer `layer` (None: every layer)
  blocked, as if their logits were -inf; `heads` restricts it (None: all heads)."""
  return Intervention(f"{attention}.pattern", "knockout", None, layer, None, heads,
                      jnp.asarray(edges, bool))


def run_with_interventions(model: nnx.Module, *inputs, interventions: Sequence[Intervention] = (),
                           method: str | None = None, **kwargs) -> Any:
  """`model(*inputs, **kwargs)` (or `model.<method>`) with `interventions` applied, in order, at
  their points. Call it eagerly or inside `jax.jit`/`jax.vmap` (interventions are pytrees);
  `run_with_cache(..., interventions=...)` also returns activations."""
  view, _ = marked_view(model, (), [i.site for i in interventions])
  outputs, _ = call_marked(view, Handler(interventions), inputs, kwargs, method)
  return outputs


def sweep(model: nnx.Module, *inputs, make: Callable[..., Intervention | Sequence[Intervention]],
          grid: Sequence[jax.Array], metric: Callable[[Any], Any] = lambda out: out,
          batch_size: int | None = None, method: str | None = None, **kwargs) -> Any:
  """`metric` of the model's outputs under `make(*point)` for every point of `grid`, as one
  `jax.vmap`: a whole (layer, head) or (layer, position) sweep is one program under `jax.jit`.

  `grid`: arrays of the same leading length (e.g. `head_grid(layers, heads)`); `make` builds the
  interventions of one point from scalars. `batch_size`: vmap that many points at a time, in a
  loop inside the program (`jax.lax.map`; on CPU a batch that stays in cache is faster than all at
  once); None: all at once. Returns `metric` outputs stacked on that leading axis.
  """
  def one(*point):
    made = make(*point)
    made = [made] if isinstance(made, Intervention) else list(made)
    return metric(run_with_interventions(model, *inputs, interventions=made, method=method,
                                         **kwargs))

  return _mapped(one, grid, batch_size)


def _mapped(fn, grid, batch_size):
  """`fn` over the points of `grid`: one vmap, or `batch_size` points at a time."""
  if batch_size is None:
    return jax.vmap(fn)(*grid)
  return jax.lax.map(lambda point: fn(*point), tuple(grid), batch_size=batch_size)


def sweep_by_layer(model: nnx.Module, *inputs, make: Callable[..., Any], grid: Sequence[jax.Array],
                   metric: Callable[[Any], Any] = lambda out: out, stack: str = "blocks",
                   batch_size: int | None = None, method: str | None = None, **kwargs) -> Any:
  """`sweep` over `(layer, *point)` for every layer of `stack` and point of `grid`, sharing the
  clean run below each layer: `[layers, points, ...]` of `metric`.

  For each layer `l` (a Python int), `make(l, *point)` is vmapped over `grid` with the block's
  input `{stack}.{l}.resid_pre` set to the clean run's, so in an unrolled stack the layers below `l`
  are dead code (computed once, by the clean run) and only what the interventions reach is batched:
  a head ablation at layer `l` batches from that head's `z` on. `make` must act at layer `l` or
  above. Scanned stacks give the same numbers without the saving (their scan runs every layer).
  `batch_size` as in `sweep`.
  """
  template = f"{stack}.{LAYER}.resid_pre"
  _, clean = run_with_cache(model, *inputs, names=template.replace(LAYER, "*"), method=method,
                            **kwargs)
  resid = stack_layers(clean, template)

  def at_layer(layer, *point):
    made = make(layer, *point)
    made = [made] if isinstance(made, Intervention) else list(made)
    start = Intervention(template, "set", resid[layer], layer)
    return metric(run_with_interventions(model, *inputs, interventions=[start] + made,
                                         method=method, **kwargs))

  return jnp.stack([_mapped(functools.partial(at_layer, layer), grid, batch_size)
                    for layer in range(resid.shape[0])])


def head_grid(num_layers: int, num_heads: int) -> tuple[jax.Array, jax.Array]:
  """int32 `(layers, heads)` `[num_layers * num_heads]`: every (layer, head), layer-major."""
  layers, heads = jnp.meshgrid(jnp.arange(num_layers), jnp.arange(num_heads), indexing="ij")
  return layers.reshape(-1).astype(jnp.int32), heads.reshape(-1).astype(jnp.int32)


def path_patch(model: nnx.Module, clean: tuple, clean_z: jax.Array, corrupt_z: jax.Array, *,
               sender: tuple[Any, Any], receiver: tuple[Any, Any], receiver_input: str = "q",
               attention: str = "blocks.{layer}.attn", method: str | None = None,
               **kwargs) -> Any:
  """Path patching (Wang et al. 2022): the outputs of the `clean` run when only the path from
  `sender` head to `receiver` head's `receiver_input` ('q', 'k' or 'v') carries the corrupt run.

  Two runs: every head's `z` frozen to the clean run's, the sender's set to the corrupt run's (MLPs
  and norms recompute), recording the receiver's input; then the clean run with only that input
  of the receiver patched. `clean_z`, `corrupt_z`: `[layers, batch, len, heads, value_dim]` (the
  clean and corrupt inputs' `stack_layers(cache, 'blocks.{layer}.attn.z')`). `sender`, `receiver`:
  (layer, head), ints or traced (vmap them for a sweep); a 'k'/'v' receiver head is a kv head.
  """
  if receiver_input not in ("q", "k", "v"):
    raise ValueError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
  z_site, input_site = f"{attention}.z", f"{attention}.{receiver_input}"
  freeze = [patch_every_layer(z_site, clean_z),
            patch(z_site, corrupt_z[sender[0]], layer=sender[0], heads=sender[1])]
  _, recorded = run_with_cache(model, *clean, names=input_site.replace(LAYER, "*"),
                               interventions=freeze, method=method, **kwargs)
  received = stack_layers(recorded, input_site)[receiver[0]]
  return run_with_interventions(
      model, *clean, interventions=[patch(input_site, received, layer=receiver[0],
                                          heads=receiver[1])], method=method, **kwargs)


def attribution_patching(model: nnx.Module, clean: tuple, corrupt: tuple, metric: Callable,
                         name: str = "blocks.{layer}.attn.z", *, method: str | None = None,
                         **kwargs) -> tuple[jax.Array, jax.Array]:
  """Attribution patching: the first-order estimate of patching each element of `name` from the
  `corrupt` run into the `clean` one, `grad metric . (corrupt - clean)`, from `jax.linearize`.

  `metric`: the model's outputs -> a scalar. `name`: a per-layer template ('blocks.{layer}.attn.z')
  or a point outside blocks ('embed'). Returns `(metric(clean outputs), attributions)`:
  attributions shaped like the point's activations (`[layers, ...]` for per-layer points), whose
  sum over a region estimates the metric's change when that region is patched (e.g. summed over
  batch, positions and value_dim: per (layer, head)).
  """
  site, _ = _site(name, None)
  pattern = site.replace(LAYER, "*")
  _, clean_cache = run_with_cache(model, *clean, names=pattern, method=method, **kwargs)
  _, corrupt_cache = run_with_cache(model, *corrupt, names=pattern, method=method, **kwargs)
  per_layer = LAYER in site
  pick = (lambda cache: stack_layers(cache, site)) if per_layer else (lambda cache: cache[site])
  clean_values, corrupt_values = pick(clean_cache), pick(corrupt_cache)

  def measured(delta):
    shift = Intervention(site, "add", delta, None, per_layer=per_layer)
    return metric(run_with_interventions(model, *clean, interventions=[shift], method=method,
                                         **kwargs))

  value, linear = jax.linearize(measured, jnp.zeros_like(clean_values))
  (gradient,) = jax.linear_transpose(linear, jnp.zeros_like(clean_values))(jnp.ones_like(value))
  return value, gradient * (corrupt_values - clean_values)
