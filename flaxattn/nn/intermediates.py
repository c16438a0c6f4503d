"""Intermediates out of the modules through `nnx.sow` and `nnx.capture`; `capture_attention_weights`
and `capture_attention_probes`.

Modules never return their intermediates: they `sow` them into the `nnx.Intermediate` collection,
and a caller that wants them wraps the call in `nnx.capture(model, nnx.Intermediate)`. Values that
cost real work (attention weights are O(q_len * kv_len)) are computed only when a static flag on
the module asks for them (`MultiHeadAttention.sow_weights`; `sow_probes` for the O(length)
`AttentionProbe` that any kernel's weights are recomputed from), so a call that wants none
(training, decoding) traces exactly what it did before.

A stack runs its blocks as pure functions of split state (`jax.lax.scan`, `jax.checkpoint`), so the
blocks that sow are copies: `resow` hands what a copy sowed to the stack's own submodule, where an
outer `nnx.capture` finds it. A scanned stack's values therefore come out stacked on a leading
`[layers]` axis at `.../layers/<name>`, an unrolled stack's one per layer at `.../layers/<i>/<name>`.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flaxattn.nn.attention import MultiHeadAttention
from flaxattn.nn.probing import AttentionProbe

SOWN_WEIGHTS = "attention_weights"
SOWN_PROBES = "attention_probe"


def resow(module: nnx.Module, sown: nnx.State) -> None:
  """Sows into `module` (and its submodules, by path) the values `sown` that `nnx.capture` took
  from a copy of it (e.g. a block merged from split state inside `jax.lax.scan`)."""
  for path, variable in nnx.to_flat_state(sown):
    target = module
    for key in path[:-1]:
      target = target[key] if isinstance(key, int) else getattr(target, key)
    target.sow(type(variable), path[-1], variable.get_value(), reduce_fn=lambda old, new: old + new)


def capture_attention_weights(model: nnx.Module, *args, attention_impl: str | None = "reference",
                      **kwargs) -> tuple[Any, dict[str, list]]:
  """Calls `model(*args, **kwargs)` with every `MultiHeadAttention` sowing its weights.

  The model itself is not changed: a copy (sharing its arrays) with `sow_weights=True` (and, unless
  `attention_impl` is None, that kernel: 'reference' returns weights whatever the config names) is
  called inside `nnx.capture`. Works eagerly, under `jax.jit` (merge the split state inside the
  jitted function and call this there), with scanned or unrolled stacks and with remat.

  Returns:
    `(outputs, weights)`: the model's own outputs, and for each attention layer, keyed by its path
    with the layer index left out (e.g. 'decoder/layers/attention', 'decoder/layers/cross_attention',
    '' for a bare `MultiHeadAttention`), a list of float32 `[batch, heads, q_len, kv_len]` arrays,
    one per layer, first layer first. Each layer must run once in the call.
  """
  attributes = dict(sow_weights=True)
  if attention_impl is not None:
    attributes["attention_impl"] = attention_impl
  return _capture(model, attributes, SOWN_WEIGHTS, "capture_attention_weights", args, kwargs)


def capture_attention_probes(model: nnx.Module, *args, **kwargs
                             ) -> tuple[Any, dict[str, list[AttentionProbe]]]:
  """Calls `model(*args, **kwargs)` with every softmax `MultiHeadAttention` sowing an
  `AttentionProbe` (query, key, lse and mods of its call), under the kernel its config names.

  As `capture_attention_weights` (a copy with `sow_probes=True`, eager or under `jax.jit`, scanned
  or unrolled stacks), but O(length) per layer, so it serves inputs of any length: recompute weights,
  statistics or a pooled map from each probe (`AttentionProbe.rows`, `.statistics`, `.pooled`).

  Returns:
    `(outputs, probes)`: the model's outputs, and per attention layer path (as
    `capture_attention_weights`) a list of `AttentionProbe`, one per layer, first layer first.
  """
  return _capture(model, dict(sow_probes=True), SOWN_PROBES, "capture_attention_probes", args,
                  kwargs)


def _capture(model, attributes: dict, sown_name: str, caller: str, args, kwargs):
  """`(outputs, {layer path: [value per layer]})` of `model(*args, **kwargs)` run as a copy with
  `attributes` on its `MultiHeadAttention`s, collecting what they sow as `sown_name`."""
  view = nnx.with_attributes(model, only=MultiHeadAttention, **attributes)
  outputs, sown = nnx.capture(view, nnx.Intermediate)(*args, **kwargs)
  layers: dict[str, dict[int, Any]] = {}
  for path, variable in nnx.to_flat_state(sown):
    if path[-1] != sown_name:
      continue
    calls = variable.get_value()
    name = "/".join(str(key) for key in path[:-1])
    if len(calls) != 1:
      raise ValueError(f"{caller} takes one call of each attention layer; {name!r} ran "
                       f"{len(calls)} times")
    index = next((i for i, key in enumerate(path[:-1]) if isinstance(key, int)), None)
    if index is not None:  # An unrolled stack: one path per layer.
      key = "/".join(str(k) for i, k in enumerate(path[:-1]) if i != index)
      layers.setdefault(key, {})[path[index]] = calls[0]
    elif "layers" in path[:-1]:  # A scanned stack: stacked on a leading [layers] axis.
      count = jax.tree.leaves(calls[0])[0].shape[0]
      layers[name] = {i: jax.tree.map(lambda x, i=i: x[i], calls[0]) for i in range(count)}
    else:
      layers[name] = {0: calls[0]}
  return outputs, {key: [per_layer[i] for i in sorted(per_layer)]
                   for key, per_layer in sorted(layers.items())}
