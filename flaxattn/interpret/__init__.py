"""Interpretability on flaxattn models: hooks and caches, interventions as data (and, built on them,
lenses and attribution).

API contract (stable; lenses and attribution build on it):

- `hook_names(model) -> list[str]`: every canonical hook name of a model, in call order. Single-
  stack models: `embed`, `blocks.{i}.resid_pre`, `blocks.{i}.attn.{q,k,v,pattern,z,out}`,
  `blocks.{i}.resid_mid`, `blocks.{i}.mlp.{hidden,out}`, `blocks.{i}.resid_post`, `final_norm`
  (stacks with a final norm), `logits` (`DecoderLM`, `EncoderClassifier`, `EncoderDecoder`).
  `EncoderDecoder`: `encoder.`/`decoder.` prefixes, `decoder.blocks.{i}.cross_attn.*`, `logits`.
  Shapes in `flaxattn.interpret.hooks.hook_names`' docstring (`z` is `[batch, len, heads,
  value_dim]`, `pattern` `[batch, heads, q_len, kv_len]` float32, the rest `[batch, len, width]`).
- `run_with_cache(model, *inputs, names=None, interventions=(), method=None, **kwargs) ->
  (outputs, {name: array})`: `outputs` are exactly what `model(*inputs, **kwargs)` returns
  (`model.<method>(...)` with `method`); `names` are names or fnmatch patterns ('blocks.*.attn.z'),
  None = all; only those are computed and kept (the O(q*kv) pattern only when named). Call it
  eagerly or inside `jax.jit` (merge split state inside), scanned or unrolled, on a mesh.
- `run_with_interventions(model, *inputs, interventions=[...], method=None, **kwargs) -> outputs`.
- `Intervention(site, op, value, layer, positions, heads, edges, per_layer)`: a pytree; `site` a
  template such as 'blocks.{layer}.attn.z' or 'embed'; `op` 'set' | 'add' | 'knockout'.
  Constructors: `patch(name, value, layer=, positions=, heads=)`, `patch_every_layer(name, values)`,
  `steer(name, vector, scale=, layer=, positions=)`, `ablate_head(layer, head, kind='zero'|'mean'|
  'resample', reference=, key=)`, `knock_out(layer, edges, heads=)`. Layers, heads and positions
  may be traced (vmap a constructor for a sweep).
- `sweep(model, *inputs, make=fn(*point) -> interventions, grid=(arrays...), metric=fn(outputs))`:
  one `jax.vmap` over the grid; `head_grid(layers, heads)` gives every (layer, head).
  `sweep_by_layer(model, *inputs, make=fn(layer, *point), grid=...)`: the same per layer, the
  clean run below each layer shared (`[layers, points, ...]`).
- `path_patch(model, clean_inputs, clean_z, corrupt_z, sender=(l, h), receiver=(l, h),
  receiver_input='q')`, `attribution_patching(model, clean_inputs, corrupt_inputs, metric, name)`.
- `stack_layers(cache, 'blocks.{layer}.attn.z') -> [layers, ...]`.
"""

from flaxattn.interpret.hooks import hook_names, run_with_cache, select_names, split_layer, stack_layers
from flaxattn.interpret.interventions import (Intervention, ablate_head, attribution_patching,
                                              head_grid, knock_out, patch, patch_every_layer,
                                              path_patch, run_with_interventions, steer, sweep,
                                              sweep_by_layer)

__all__ = [
    "Intervention", "ablate_head", "attribution_patching", "head_grid", "hook_names", "knock_out",
    "patch", "patch_every_layer", "path_patch", "run_with_cache", "run_with_interventions",
    "select_names", "split_layer", "stack_layers", "steer", "sweep", "sweep_by_layer",
]
