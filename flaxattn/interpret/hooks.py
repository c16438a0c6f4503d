"""Canonical hook names of a model and `run_with_cache`: the activations at named points of one call.

The modules mark their hook points with one-line `flaxattn.nn.hooks.hook` calls. Here each point
gets its canonical name from where its module sits in the model (see `hook_names`), a copy of the
model is marked with the points a call needs (static attributes: a new trace, the model itself is
untouched), and a handler set while that copy traces caches (`nnx.sow`) and intervenes
(`flaxattn.interpret.interventions`). Points nobody asked for add nothing to the trace, and the
attention pattern, O(q_len * kv_len), is computed only where a call names it.

Scanned stacks run one block body for every layer: a requested per-layer point is sown at every
layer (stacked on the scan's `[layers]` axis) and the layers asked for are then picked from it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flaxattn.models import DecoderLM, EncoderClassifier, EncoderDecoder
from flaxattn.nn.attention import MultiHeadAttention
from flaxattn.nn.hooks import HOOK_HANDLER, HookPoints
from flaxattn.nn.layers import MLP
from flaxattn.nn.transformer import TransformerBlock, TransformerStack

LAYER = "{layer}"
_SOWN = "hook_"  # prefix of the sown variables' names
_WEIGHTS = "attention_weights"  # what `MultiHeadAttention.sow_weights` sows: the 'pattern' point
_ATTENTION_POINTS = ("q", "k", "v", "pattern", "z", "out")
_BLOCK_POINTS = ("resid_pre", "resid_mid", "resid_post")
_MLP_POINTS = ("hidden", "out")
_LOGITS_MODELS = (DecoderLM, EncoderClassifier, EncoderDecoder)
_BLOCK_CHILDREN = {"attention": "attn", "cross_attention": "cross_attn", "mlp": "mlp"}


@dataclasses.dataclass(frozen=True)
class _Marks(HookPoints):
  """`HookPoints` plus the local names whose values this call caches."""

  cached: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Site:
  """The hook points of one module of a model.

  Attributes:
    path: the module's path in the model (an unrolled block's layer index included).
    prefix: the canonical prefix, with a `{layer}` field inside blocks ('blocks.{layer}.attn').
    points: the local names the module has ('q', 'k', ...).
    layers: the layer indices the module runs (a scanned block: all; unrolled: its own); () outside
      blocks.
    scanned: whether its values come stacked on a leading `[layers]` axis.
  """

  path: tuple
  prefix: str
  points: tuple[str, ...]
  layers: tuple[int, ...] = ()
  scanned: bool = False

  def template(self, point: str) -> str:
    """The canonical name of `point` with its `{layer}` field ('blocks.{layer}.attn.q')."""
    return f"{self.prefix}.{point}" if self.prefix else point

  def names(self, point: str) -> list[str]:
    """The canonical names of `point`, one per layer the module runs."""
    template = self.template(point)
    return [template.format(layer=i) for i in self.layers] if self.layers else [template]


def sites(model: nnx.Module) -> list[Site]:
  """The hook sites of `model`, in the order its call runs them."""
  modules = list(nnx.iter_modules(model))
  stacks = {path: module for path, module in modules if isinstance(module, TransformerStack)}
  found = [_site(path, module, stacks) for path, module in modules]
  return [site for site in found if site is not None]


# Where each point comes in a block's call, for `hook_names`' order.
_IN_BLOCK = {"resid_pre": 0, "attn": 1, "resid_mid": 2, "cross_attn": 3, "mlp": 4, "resid_post": 5}


def _call_order(name: str) -> tuple:
  """A sort key putting canonical names in the order a call reaches them."""
  scope = 0 if name.startswith("encoder.") else 1 if name.startswith("decoder.") else 0
  if name == "logits":
    return (2,)
  template, layer = split_layer(name)
  if layer is None:
    return (scope, 0 if name.endswith("embed") else 10**9)
  part = template.split(LAYER + ".")[1].split(".")[0]
  point = template.rsplit(".", 1)[1]
  inner = _ATTENTION_POINTS.index(point) if part in ("attn", "cross_attn") else (
      _MLP_POINTS.index(point) if part == "mlp" else 0)
  return (scope, 1 + layer, _IN_BLOCK[part if part in _IN_BLOCK else point], inner)


def _site(path: tuple, module: nnx.Module, stacks: dict[tuple, TransformerStack]) -> Site | None:
  """The `Site` of one module (`stacks`: the model's stacks by path), or None when it has none."""
  if isinstance(module, _LOGITS_MODELS) and path == ():
    return Site(path, "", ("logits",))
  stack = next((s for s in stacks if path[:len(s)] == s), None)
  if stack is None:
    if isinstance(module, MultiHeadAttention) and path == ():
      return Site(path, "attn", _ATTENTION_POINTS)
    return None
  scope = "" if len(stacks) == 1 else f"{stack[-1]}."
  rest = path[len(stack):]
  if rest == ():
    points = ("embed", "final_norm") if module.final_norm is not None else ("embed",)
    return Site(path, scope.rstrip("."), points)
  if not rest or rest[0] != "layers":
    return None
  scanned = len(rest) == 1 or not isinstance(rest[1], int)
  layers = tuple(range(stacks[stack].num_layers)) if scanned else (rest[1],)
  inner = rest[1:] if scanned else rest[2:]
  block = f"{scope}blocks.{LAYER}"
  if inner == () and isinstance(module, TransformerBlock):
    return Site(path, block, _BLOCK_POINTS, layers, scanned)
  if len(inner) == 1 and inner[0] in _BLOCK_CHILDREN:
    points = _ATTENTION_POINTS if isinstance(module, MultiHeadAttention) else (
        _MLP_POINTS if isinstance(module, MLP) else ())
    if points:
      return Site(path, f"{block}.{_BLOCK_CHILDREN[inner[0]]}", points, layers, scanned)
  return None


def hook_names(model: nnx.Module) -> list[str]:
  """Every canonical hook name of `model`, in the order a call reaches them.

  Single-stack models (`DecoderLM`, `EncoderModel`, `EncoderClassifier`):

  | name                        | shape                                   | what                          |
  |-----------------------------|-----------------------------------------|-------------------------------|
  | `embed`                     | `[batch, len, d_model]`                 | the stack's input (embeddings)|
  | `blocks.{i}.resid_pre`      | `[batch, len, d_model]`                 | block input                   |
  | `blocks.{i}.attn.q`         | `[batch, len, heads, head_dim]`         | queries (after QK norm, RoPE) |
  | `blocks.{i}.attn.k`, `.v`   | `[batch, kv_len, kv_heads, head_dim]`   | this call's keys (RoPE'd), values |
  | `blocks.{i}.attn.pattern`   | `[batch, heads, len, kv_len]` float32   | attention weights             |
  | `blocks.{i}.attn.z`         | `[batch, len, heads, value_dim]`        | per-head output, before `out` |
  | `blocks.{i}.attn.out`       | `[batch, len, d_model]`                 | attention sub-layer output    |
  | `blocks.{i}.resid_mid`      | `[batch, len, d_model]`                 | after the attention residual  |
  | `blocks.{i}.mlp.hidden`     | `[batch, len, mlp_dim]`                 | MLP activations               |
  | `blocks.{i}.mlp.out`        | `[batch, len, d_model]`                 | MLP sub-layer output          |
  | `blocks.{i}.resid_post`     | `[batch, len, d_model]`                 | block output                  |
  | `final_norm`                | `[batch, len, d_model]`                 | after the final norm (if any) |
  | `logits`                    | `[batch, len, vocab]` / `[batch, classes]` | model output (LM, classifier) |

  Post-LN blocks (BERT) normalise after each residual add, so `resid_mid`/`resid_post` are the
  normalised sums. `EncoderDecoder` prefixes each stack's names with `encoder.` or `decoder.`, and its
  decoder blocks have `decoder.blocks.{i}.cross_attn.*` too (kv_len = the source length); `logits`
  stays unprefixed. With a `KVCache`, `k`/`v` are the new tokens' and `pattern` spans the cache.
  """
  names = [name for site in sites(model) for point in site.points for name in site.names(point)]
  return sorted(names, key=_call_order)


def select_names(model_names: Sequence[str], names: str | Iterable[str] | None) -> list[str]:
  """The canonical names matching `names` (names or `fnmatch` patterns: 'blocks.*.attn.z'; None:
  all), in model order. A pattern that matches nothing raises ValueError."""
  if names is None:
    return list(model_names)
  patterns = [names] if isinstance(names, str) else list(names)
  chosen = set()
  for pattern in patterns:
    hits = fnmatch.filter(model_names, pattern)
    if not hits:
      raise ValueError(f"hook name {pattern!r} matches none of this model's names; they are "
                       f"{_summary(model_names)} (see flaxattn.interpret.hook_names)")
    chosen.update(hits)
  return [name for name in model_names if name in chosen]


def _summary(names: Sequence[str]) -> str:
  templates = list(dict.fromkeys(re.sub(r"blocks\.\d+\.", "blocks.{i}.", n) for n in names))
  return str(templates)


def split_layer(name: str) -> tuple[str, int | None]:
  """'decoder.blocks.3.attn.z' -> ('decoder.blocks.{layer}.attn.z', 3); 'embed' -> ('embed', None)."""
  match = re.fullmatch(r"(.*?blocks\.)(\d+)(\..+)", name)
  if match is None:
    return name, None
  return f"{match.group(1)}{LAYER}{match.group(3)}", int(match.group(2))


def marked_view(model: nnx.Module, cached: Iterable[str], intervened: Iterable[str]) -> tuple[
    nnx.Module, list[Site]]:
  """A copy of `model` (sharing its arrays) whose modules carry the `HookPoints` a call needs.

  `cached`: canonical names to sow; `intervened`: templates ('blocks.{layer}.attn.z', 'embed') that
  interventions act at. Returns `(view, sites)`.
  """
  all_sites = sites(model)
  cached, intervened = set(cached), set(intervened)
  templates = {site.template(p) for site in all_sites for p in site.points}
  unknown = sorted(intervened - templates)
  if unknown:
    raise ValueError(f"interventions act at {unknown}, which this model does not have; its points "
                     f"are {sorted(templates)}")
  modules = dict(nnx.iter_modules(model))
  by_path = {}
  for site in all_sites:
    cache_points = frozenset(p for p in site.points if set(site.names(p)) & cached)
    act_points = frozenset(p for p in site.points if site.template(p) in intervened)
    kind = getattr(modules[site.path], "attention_kind", "softmax")
    if "pattern" in act_points and kind != "softmax":
      raise ValueError(f"{site.template('pattern')!r} has attention_kind={kind!r}: pattern "
                       "interventions (knockout, patching) need softmax attention")
    if cache_points or act_points:
      by_path[site.path] = _Marks(site.prefix, cache_points | act_points, cache_points)

  def mark(path, node):
    marks = by_path.get(tuple(path))
    if marks is None or not isinstance(node, nnx.Module):
      return node
    node.hook_points = marks
    if "pattern" in marks.names:  # The weights are computed only where a call names the pattern.
      node.sow_weights = True
      if node.attention_impl is not None:
        node.attention_impl = "reference"  # Named kernels may not return weights; this one does.
    return node

  return nnx.recursive_map(mark, model), all_sites


class Handler:
  """What marked hook points do while a view traces: apply the interventions that act there (in
  order), then sow the value when it is cached."""

  def __init__(self, interventions: Sequence[Any] = ()):
    self.interventions = list(interventions)

  def __call__(self, module, name, value, layer):
    marks = module.hook_points
    template = f"{marks.prefix}.{name}" if marks.prefix else name
    for intervention in self.interventions:
      if intervention.site == template:
        value = intervention.apply(value, layer)
    if name in marks.cached and name != "pattern":  # 'pattern' is sown as the attention weights.
      module.sow(nnx.Intermediate, _SOWN + name, value)
    return value


def call_marked(view: nnx.Module, handler: Handler, inputs: tuple, kwargs: dict,
                method: str | None = None):
  """`view(*inputs, **kwargs)` (or `view.<method>(...)`) with `handler` on its marked points:
  `(outputs, sown)`."""
  token = HOOK_HANDLER.set(handler)
  try:
    fn = view if method is None else getattr(view, method)
    return nnx.capture(fn, nnx.Intermediate)(*inputs, **kwargs)
  finally:
    HOOK_HANDLER.reset(token)


def collect(sown: nnx.State, all_sites: list[Site], names: Sequence[str]) -> dict[str, jax.Array]:
  """The values of `names` from what a marked call sowed, as `{name: array}` in model order."""
  by_path = {site.path: site for site in all_sites}
  wanted, values = set(names), {}
  for path, variable in nnx.to_flat_state(sown):
    site = by_path.get(tuple(path[:-1]))
    var = path[-1]
    if site is None or not (var.startswith(_SOWN) or var == _WEIGHTS):
      continue
    point = "pattern" if var == _WEIGHTS else var[len(_SOWN):]
    calls = variable.get_value()
    if len(calls) != 1:
      raise ValueError(f"run_with_cache takes one call of each module; {site.template(point)!r} "
                       f"ran {len(calls)} times")
    value = calls[0]
    for index, name in zip(site.layers or (None,), site.names(point)):
      if name in wanted:
        values[name] = value[index] if site.scanned else value
  missing = [name for name in names if name not in values]
  if missing:
    raise ValueError(f"the call did not reach hook points {missing[:5]} (e.g. a method that skips "
                     "them); name only points the call runs")
  return {name: values[name] for name in names}


def run_with_cache(model: nnx.Module, *inputs, names: str | Iterable[str] | None = None,
                   interventions: Sequence[Any] = (), method: str | None = None,
                   **kwargs) -> tuple[Any, dict[str, jax.Array]]:
  """Calls `model(*inputs, **kwargs)` and returns `(outputs, {name: array})` for `names`.

  Args:
    model: a flaxattn model (`DecoderLM`, `EncoderModel`, `EncoderClassifier`, `EncoderDecoder`), a
      stack or a bare `MultiHeadAttention`. Not changed: a marked copy sharing its arrays runs.
    *inputs: the model's positional call arguments (`**kwargs`: its keyword arguments).
    names: canonical names or `fnmatch` patterns (`'blocks.*.attn.pattern'`), None for every name
      (`hook_names(model)`); only these are computed and kept.
    interventions: `flaxattn.interpret.Intervention`s applied during the call (the cache then
      holds the intervened values).
    method: call `model.<method>` instead (e.g. 'encode', 'decode' of an `EncoderDecoder`).

  Works eagerly and under `jax.jit` (merge the split state inside the jitted function and call this
  there), with scanned or unrolled stacks, remat, and sharded state on a mesh. Each hooked module
  must run once in the call. The dict is in model order (under `jax.jit`, in sorted key order:
  jax rebuilds dicts sorted).
  """
  all_names = hook_names(model)
  chosen = select_names(all_names, names)
  view, all_sites = marked_view(model, chosen, [i.site for i in interventions])
  outputs, sown = call_marked(view, Handler(interventions), inputs, kwargs, method)
  return outputs, collect(sown, all_sites, chosen)


def stack_layers(cache: dict[str, jax.Array], template: str) -> jax.Array:
  """The cached values of a per-layer point, `[layers, ...]`: `template` 'blocks.{layer}.attn.z'
  (or 'blocks.*.attn.z'), every layer from 0 present in `cache`."""
  template = template.replace("*", LAYER)
  values, layer = [], 0
  while template.format(layer=layer) in cache:
    values.append(cache[template.format(layer=layer)])
    layer += 1
  if not values:
    raise ValueError(f"the cache holds no {template.format(layer=0)!r}; cache names like "
                     f"{template.replace(LAYER, '*')!r} first")
  return jnp.stack(values)
