"""Looking inside the models' attention: per-layer weights, attention rollout, labelled heatmaps.

`attention_weights(model, **inputs)` runs one example through a `DecoderLM`, `EncoderModel`,
`EncoderClassifier` or `EncoderDecoder` and returns its attention weights per layer, padding
removed, recomputed from the log-sum-exp of the kernel the model's config names (`AttentionProbe`:
no kernel is swapped for the dense one); `attention_summary` does the same in O(length) memory for
long inputs (a pooled map, per-query statistics, the last query's exact row);
`rollout` combines a stack of self-attention layers into one token-to-input attribution (Abnar &
Zuidema 2020, "Quantifying Attention Flow in Transformers"); `plot_attention` / `plot_alignment`
draw them as heatmaps with the tokens on both axes; `attention_report` does all of it for a text and
a tokenizer, writing PNG files (`flaxattn.train.report` sends them to TensorBoard).

Long inputs. Up to `FULL_MAP_TOKENS` tokens the report draws every weight (one heatmap cell per
query and key) and the rollout. Beyond, a `[q_len, kv_len]` map neither fits a picture (a 16k map
is 256M cells for ~900 pixels) nor sensible memory, so each layer gets instead: the map pooled into
`SUMMARY_BINS` x `SUMMARY_BINS` bins (cell = mean over a query bin of its weight on a key bin, rows
sum to 1), and a curves figure with per-query entropy, mass on the first token (the sink), largest
weight, and the last query's exact weights over every key (`attention_summary`). Rollout is not
drawn for long inputs: it multiplies whole `[T, T]` matrices, O(T^2) memory and O(T^3) time.

Plots use matplotlib's object API on an Agg canvas (no pyplot), so importing this module never
changes the process-wide matplotlib backend.
"""

from __future__ import annotations

import functools
import math
import os
import textwrap
import unicodedata
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flaxattn.files import write_atomically
from flaxattn.models.decoder import DecoderLM
from flaxattn.models.decoding import generate
from flaxattn.models.encoder import EncoderClassifier, EncoderModel
from flaxattn.models.seq2seq import EncoderDecoder
from flaxattn.nn.intermediates import capture_attention_probes, capture_attention_weights

# Keyword inputs `attention_weights` accepts per model type; the first is the required token ids.
_INPUTS = {
    DecoderLM: ("input_ids", "attention_mask"),
    EncoderModel: ("input_ids", "attention_mask", "token_type_ids"),
    EncoderClassifier: ("input_ids", "attention_mask", "token_type_ids"),
    EncoderDecoder: ("source_ids", "target_ids", "source_mask", "target_mask"),
}
# Beyond this many tokens on an axis only every k-th is labelled (each label then names its index).
MAX_TICK_LABELS = 60
_DPI = 100
# Inputs up to this many tokens get full heatmaps and the rollout; longer ones `attention_summary`.
FULL_MAP_TOKENS = 256
# Bins per axis of a long input's pooled map (each labelled up to MAX_TICK_LABELS).
SUMMARY_BINS = 64


def _model_type(model) -> type:
  for kind in _INPUTS:
    if isinstance(model, kind):
      return kind
  raise ValueError(
      f"model must be one of {[kind.__name__ for kind in _INPUTS]}, got {type(model).__name__}")


def _model_config(model):
  return model.encoder.encoder.config if isinstance(model, EncoderClassifier) else model.config


def _one_example(name: str, value) -> np.ndarray:
  """`value` as an int `[1, length]` array (a 1-D `[length]` gains the batch axis)."""
  array = np.asarray(value)
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or array.shape[0] != 1 or array.shape[1] == 0:
    raise ValueError(f"{name} must be one example, [length] or [1, length] with length >= 1, got "
                     f"shape {np.shape(value)}")
  if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
    raise ValueError(f"{name} must hold integers (or bools for a mask), got dtype {array.dtype}")
  return array.astype(np.int32)


# Where each kind of weights sits in each model (the paths `capture_attention_weights` reports).
_WEIGHT_PATHS = {
    DecoderLM: {"self": "decoder/layers/attention"},
    EncoderModel: {"self": "encoder/layers/attention"},
    EncoderClassifier: {"self": "encoder/encoder/layers/attention"},
    EncoderDecoder: {"encoder": "encoder/layers/attention", "decoder": "decoder/layers/attention",
                     "cross": "decoder/layers/cross_attention"},
}


def _capture(model, inputs: dict[str, jax.Array], probes: bool):
  """`{kind: per-layer values}` of one call: `AttentionProbe`s (`probes`), else sown weights."""
  capture = (capture_attention_probes if probes else
             functools.partial(capture_attention_weights, attention_impl=None))
  if isinstance(model, EncoderDecoder):
    _, values = capture(model, inputs["source_ids"], inputs["target_ids"],
                        inputs.get("source_mask"), inputs.get("target_mask"))
  else:
    _, values = capture(model, **inputs)
  return {key: values[path] for key, path in _WEIGHT_PATHS[_model_type(model)].items()}


def _probed(model) -> bool:
  """Whether the model's attention is softmax (probed from the lse); the kernelized kinds
  ('linear', 'performer') sow their own weights instead."""
  return _model_config(model).attention_kind == "softmax"


@functools.partial(jax.jit, static_argnums=0)
def _forward_weights(graphdef, state, inputs: dict[str, jax.Array]) -> dict[str, list]:
  model = nnx.merge(graphdef, state)
  if not _probed(model):
    return _capture(model, inputs, probes=False)
  return {key: [probe.weights() for probe in layers]
          for key, layers in _capture(model, inputs, probes=True).items()}


def _checked_inputs(model, inputs: dict) -> tuple[type, dict[str, np.ndarray]]:
  """`(model type, {name: int32 [1, length]})` of `attention_weights`' inputs, checked."""
  kind = _model_type(model)
  names = _INPUTS[kind]
  unexpected = sorted(set(inputs) - set(names))
  if unexpected:
    raise ValueError(f"{kind.__name__} takes inputs {names}, got unexpected {unexpected}")
  required = names[:2] if kind is EncoderDecoder else names[:1]
  missing = [name for name in required if inputs.get(name) is None]
  if missing:
    raise ValueError(f"{kind.__name__} needs {missing}")
  arrays = {name: _one_example(name, value) for name, value in inputs.items() if value is not None}
  ids_of = ({"source_mask": "source_ids", "target_mask": "target_ids"} if kind is EncoderDecoder
            else {"attention_mask": "input_ids", "token_type_ids": "input_ids"})
  for name, ids_name in ids_of.items():
    if name in arrays and arrays[name].shape != arrays[ids_name].shape:
      raise ValueError(f"{name} must match {ids_name}'s shape {arrays[ids_name].shape}, got "
                       f"{arrays[name].shape}")
  for name in ("attention_mask", "source_mask", "target_mask"):
    if name in arrays and not np.isin(arrays[name], (0, 1)).all():
      raise ValueError(f"{name} must hold 1 (real token) and 0 (padding), got values "
                       f"{np.unique(arrays[name])[:5].tolist()}")
    if name in arrays and not arrays[name].any():
      raise ValueError(f"{name} marks no real token: there is nothing to attend")
  config = _model_config(model)
  # Under jax.jit an out-of-range id would embed as NaN rather than raise: check here.
  for name in required:
    vocab = (model.source_embedder.token.num_embeddings
             if name == "source_ids" and model.source_embedder is not None else config.vocab_size)
    if arrays[name].min() < 0 or arrays[name].max() >= vocab:
      raise ValueError(f"{name} must be in [0, {vocab}), got values in [{arrays[name].min()}, "
                       f"{arrays[name].max()}]")
    if config.positions == "learned" and arrays[name].shape[1] > config.max_length:
      raise ValueError(
          f"{name} has {arrays[name].shape[1]} tokens, more than config.max_length="
          f"{config.max_length} learned positions")

  return kind, arrays


def attention_weights(model, **inputs) -> dict[str, list[np.ndarray]]:
  """Per-layer attention weights of one example, padding removed.

  Runs the model (deterministic, under `jax.jit`) with the kernel its config names, through
  `flaxattn.nn.capture_attention_probes`: each layer's weights are recomputed from that kernel's
  log-sum-exp (`AttentionProbe.weights`; equal to the dense reference kernel's to float32
  rounding). The kernelized kinds sow their own weights (`capture_attention_weights`). Memory is
  O(layers * heads * q_len * kv_len): for long inputs use `attention_summary`.

  Args:
    model: a `DecoderLM`, `EncoderModel`, `EncoderClassifier` or `EncoderDecoder`.
    **inputs: one example, each `[length]` or `[1, length]` int: `input_ids` (required),
      `attention_mask` (1 = real token, 0 = padding, anywhere) and, for the encoders,
      `token_type_ids`; for an `EncoderDecoder`, `source_ids` and `target_ids` (required, the
      decoder's input tokens), `source_mask`, `target_mask`.

  Returns:
    `{'self': [...]}` (decoder LM and encoders) or `{'encoder': [...], 'decoder': [...], 'cross':
    [...]}` (encoder-decoder): a list with one float32 array `[heads, q_len, kv_len]` per layer,
    rows and columns of padding tokens removed (so each row sums to 1). Cross-attention arrays are
    `[heads, target_len, source_len]`.
  """
  kind, arrays = _checked_inputs(model, inputs)
  graphdef, state = nnx.split(model)
  weights = jax.device_get(_forward_weights(graphdef, state, arrays))

  def real(name):
    mask = arrays.get(name)
    return slice(None) if mask is None else mask[0].astype(bool)

  if kind is EncoderDecoder:
    source, target = real("source_mask"), real("target_mask")
    axes = {"encoder": (source, source), "decoder": (target, target), "cross": (target, source)}
  else:
    tokens = real("attention_mask")
    axes = {"self": (tokens, tokens)}
  return {key: [np.asarray(layer[0], np.float32)[:, rows][:, :, columns] for layer in weights[key]]
          for key, (rows, columns) in axes.items()}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_summary(graphdef, state, inputs: dict[str, jax.Array], bins: int) -> list[dict]:
  model = nnx.merge(graphdef, state)
  summaries = []
  for probe in _capture(model, inputs, probes=True)["self"]:
    statistics = probe.statistics(sink_keys=1)
    summaries.append(dict(
        pooled=probe.pooled(bins, bins)[0],
        last_row=probe.rows([probe.q_len - 1])[0, :, 0],
        learned_sink=1.0 - statistics["total_weight"][0],
        **{name: statistics[name][0] for name in ("entropy", "sink_mass", "max_weight")}))
  return summaries


def attention_summary(model, *, bins: int = SUMMARY_BINS, **inputs) -> list[dict[str, np.ndarray]]:
  """Per-layer self-attention of one long example in O(length) memory, from each layer's
  `AttentionProbe` (the kernel the config names; no `[q_len, kv_len]` array is formed).

  Args:
    model: a `DecoderLM`, `EncoderModel` or `EncoderClassifier` (self-attention).
    bins: bins per axis of the pooled map (fewer when the input is shorter; see
      `AttentionProbe.pooled`).
    **inputs: one example without padding: `input_ids` (`[length]` or `[1, length]`) and, for the
      encoders, `token_type_ids`.

  Returns:
    One dict per layer, first layer first, of float32 arrays: `pooled` `[heads, q_bins, kv_bins]`
    (mean over a query bin of its weight on a key bin), `entropy`, `sink_mass` (weight on the first
    token), `max_weight` and `learned_sink` (1 - the total weight on the keys: the mass on the
    learned attention sinks, 0 up to rounding without them) `[heads, length]` per query, and
    `last_row` `[heads, length]` (the last query's exact weights).
  """
  kind = _model_type(model)
  if kind is EncoderDecoder:
    raise ValueError("attention_summary is for self-attention models (DecoderLM, encoders); for an "
                     "EncoderDecoder use attention_weights")
  if inputs.get("attention_mask") is not None:
    raise ValueError("attention_summary takes one example without padding: pass only its real "
                     "tokens, no attention_mask")
  if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
    raise ValueError(f"bins must be a positive int, got {bins!r}")
  _, arrays = _checked_inputs(model, inputs)
  if not _probed(model):
    raise ValueError(f"attention_summary needs softmax attention, got attention_kind="
                     f"{_model_config(model).attention_kind!r}: use attention_weights")
  graphdef, state = nnx.split(model)
  return [{name: np.asarray(value, np.float32) for name, value in layer.items()}
          for layer in jax.device_get(_forward_summary(graphdef, state, arrays, bins))]


def rollout(layers: Sequence[np.ndarray], *, residual: bool = True) -> np.ndarray:
  """Attention rollout across self-attention layers (Abnar & Zuidema 2020).

  Each layer's weights are averaged over heads; with `residual`, the identity is added (the skip
  connection carries each token's own state forward); rows are renormalised to sum to 1; the layers
  are multiplied from the first up: `R = A_L ... A_2 A_1`. A row that attends nowhere (all zeros,
  e.g. a fully masked query) stays zero without `residual`.

  Args:
    layers: per-layer weights, each `[heads, T, T]` (the same `T`), first layer first, as returned
      by `attention_weights`.
    residual: account for the residual connection (the paper's `0.5 W + 0.5 I`, renormalised).

  Returns:
    float32 `[T, T]`: row `i` distributes output token `i` of the last layer over the input tokens.
    Computed in float64.
  """
  if isinstance(layers, np.ndarray) or not len(layers):
    raise ValueError(f"layers must be a non-empty list of [heads, T, T] arrays, got "
                     f"{type(layers).__name__} of length {len(layers)}")
  length = np.shape(layers[0])[-1]
  result = np.eye(length)
  for index, layer in enumerate(layers):
    weights = np.asarray(layer, np.float64)
    if weights.ndim != 3 or weights.shape[1:] != (length, length):
      raise ValueError(f"layers[{index}] must be [heads, {length}, {length}] like layers[0], got "
                       f"shape {weights.shape}")
    if not np.isfinite(weights).all():
      raise ValueError(f"layers[{index}] holds non-finite weights")
    mixed = weights.mean(axis=0) + (np.eye(length) if residual else 0.0)
    totals = mixed.sum(axis=-1, keepdims=True)
    mixed = mixed / np.where(totals == 0.0, 1.0, totals)
    result = mixed @ result
  return result.astype(np.float32)


def _printable(label: str) -> str:
  """A token as tick text: control and other invisible characters escaped (`'\\n'` -> `\\n`)."""
  text = "".join(char if unicodedata.category(char)[0] not in "CZ" or char == " " else
                 repr(char)[1:-1] for char in str(label))
  return text if text.strip() else repr(text)


def _set_ticks(axis, labels: Sequence[str], *, vertical: bool) -> int:
  """Labels every token, or every k-th beyond `MAX_TICK_LABELS` (prefixed with its index);
  returns k."""
  count = len(labels)
  step = max(1, math.ceil(count / MAX_TICK_LABELS))
  positions = list(range(0, count, step))
  texts = [_printable(labels[i]) if step == 1 else f"{i}:{_printable(labels[i])}"
           for i in positions]
  size = 9 if count <= 20 else 7 if count <= 40 else 6
  # parse_math=False: token text such as "$" must not start a mathtext expression.
  text_options = dict(fontsize=size, parse_math=False)
  if vertical:
    axis.set_xticks(positions, texts, rotation=90, **text_options)
  else:
    axis.set_yticks(positions, texts, **text_options)
  return step


def _panel_inches(count: int) -> float:
  # ~0.16 inch per labelled token keeps 6-9 pt labels apart; bounded for tiny and huge sequences.
  return float(np.clip(0.16 * min(count, MAX_TICK_LABELS) + 1.4, 2.5, 9.0))


def _save(figure: Figure, path: str) -> str:
  """Writes `figure` to `path` as PNG, atomically; returns `path`."""
  write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=_DPI), binary=True)
  return path


def _heatmaps(matrices: Sequence[np.ndarray], panel_titles: Sequence[str], row_labels, col_labels,
              *, title: str, row_name: str, col_name: str) -> Figure:
  """A figure with one labelled heatmap per `[rows, cols]` matrix, on one colour scale."""
  rows, cols = matrices[0].shape
  if len(row_labels) != rows or len(col_labels) != cols:
    raise ValueError(f"row_labels and col_labels must have {rows} and {cols} entries (the weights' "
                     f"query and key lengths), got {len(row_labels)} and {len(col_labels)}")
  # A near-square grid: 8 heads + their mean fill 3 x 3.
  grid_columns = math.ceil(math.sqrt(len(matrices)))
  grid_rows = math.ceil(len(matrices) / grid_columns)
  width, height = _panel_inches(cols), _panel_inches(rows)
  figure = Figure(figsize=(grid_columns * width + 1.2, grid_rows * height + 0.8), dpi=_DPI,
                  layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(grid_rows, grid_columns, squeeze=False)
  top = max(float(np.max(matrix)) for matrix in matrices)
  image = None
  for index, ax in enumerate(axes.flat):
    if index >= len(matrices):
      ax.set_axis_off()
      continue
    image = ax.imshow(matrices[index], cmap="viridis", vmin=0.0, vmax=top if top > 0 else 1.0,
                      aspect="auto", interpolation="nearest")
    ax.set_title(_wrapped(panel_titles[index], width, 10), fontsize=10)
    # Token labels on the outer panels only (the grid shares its axes): laying out every panel's
    # labels made one figure take seconds.
    row, column = divmod(index, grid_columns)
    if row == grid_rows - 1 or index + grid_columns >= len(matrices):
      col_step = _set_ticks(ax, col_labels, vertical=True)
      ax.set_xlabel(col_name + (f" (1 in {col_step} labelled)" if col_step > 1 else ""),
                    fontsize=8)
    else:
      ax.set_xticks([])
    if column == 0:
      row_step = _set_ticks(ax, row_labels, vertical=False)
      ax.set_ylabel(row_name + (f" (1 in {row_step} labelled)" if row_step > 1 else ""),
                    fontsize=8)
    else:
      ax.set_yticks([])
  figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="weight")
  figure.suptitle(_wrapped(title, figure.get_figwidth(), 12), fontsize=12)
  return figure


def _wrapped(text: str, inches: float, points: float) -> str:
  """`text` broken into lines that fit `inches` at `points` (an average glyph is ~0.6 em wide), so
  a long title on a narrow figure wraps instead of being cut at the edges."""
  return textwrap.fill(text, width=max(12, int(inches * 72 / (0.6 * points))))


def plot_attention(weights: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
                   path: str, *, title: str, heads: Sequence[int] | None = None, max_heads: int = 8,
                   include_mean: bool = True, row_name: str = "query token",
                   col_name: str = "key token") -> str:
  """Labelled heatmaps of one layer's attention, one panel per head (plus the head mean), as PNG.

  Args:
    weights: `[heads, q_len, kv_len]` (or `[q_len, kv_len]`, one panel), e.g. one entry of
      `attention_weights(...)['self']`.
    row_labels: `q_len` query tokens (y axis); col_labels: `kv_len` key tokens (x axis). Beyond
      `MAX_TICK_LABELS` tokens every k-th is labelled, with its index.
    path: the PNG file to write (parent directories are created).
    title: the figure title.
    heads: head indices to draw; None = the first `max_heads` (the title says when not all are
      shown).
    max_heads: the most heads drawn by default.
    include_mean: add a panel with the mean over all heads (not only the drawn ones), when there
      is more than one.
    row_name: the row axis title.
    col_name: the column axis title.

  Returns:
    `path`.
  """
  weights = np.asarray(weights, np.float32)
  if weights.ndim == 2:
    weights, include_mean = weights[None], False
  if weights.ndim != 3 or 0 in weights.shape:
    raise ValueError(f"weights must be [heads, q_len, kv_len] or [q_len, kv_len], got shape "
                     f"{weights.shape}")
  if not np.isfinite(weights).all():
    raise ValueError("weights hold non-finite values")
  count = weights.shape[0]
  if heads is None:
    if max_heads < 1:
      raise ValueError(f"max_heads must be >= 1, got {max_heads!r}")
    heads = list(range(min(count, max_heads)))
  heads = [int(head) for head in heads]
  if not heads or any(not 0 <= head < count for head in heads):
    raise ValueError(f"heads must be a non-empty list of indices in [0, {count}), got {heads}")
  matrices = [weights[head] for head in heads]
  panel_titles = [f"head {head}" for head in heads] if count > 1 else [""]
  if include_mean and count > 1:
    matrices.append(weights.mean(axis=0))
    panel_titles.append(f"mean of {count} heads")
  if len(heads) < count:
    title = f"{title} ({len(heads)} of {count} heads shown)"
  figure = _heatmaps(matrices, panel_titles, row_labels, col_labels, title=title,
                     row_name=row_name, col_name=col_name)
  return _save(figure, path)


def plot_alignment(cross_weights: Sequence[np.ndarray] | np.ndarray, source_labels: Sequence[str],
                   target_labels: Sequence[str], path: str, *,
                   title: str = "source-target alignment") -> str:
  """Source-target alignment of a translation: cross-attention averaged over heads and layers.

  Args:
    cross_weights: per-layer `[heads, target_len, source_len]` arrays (`attention_weights(...)
      ['cross']`), or one such array.
    source_labels: `source_len` source tokens (x axis); target_labels: `target_len` decoder input
      tokens (y axis).
    path: the PNG file to write; title: the figure title.

  Returns:
    `path`.
  """
  layers = ([np.asarray(cross_weights)] if isinstance(cross_weights, np.ndarray)
            else list(cross_weights))
  if not layers or any(np.ndim(layer) != 3 or np.shape(layer) != np.shape(layers[0])
                       for layer in layers):
    raise ValueError("cross_weights must be one or more [heads, target_len, source_len] arrays of "
                     f"one shape, got shapes {[np.shape(layer) for layer in layers]}")
  mean = np.mean([np.asarray(layer, np.float64).mean(axis=0) for layer in layers], axis=0)
  figure = _heatmaps([mean.astype(np.float32)], [f"mean over {len(layers)} layers and "
                                                 f"{layers[0].shape[0]} heads"],
                     target_labels, source_labels, title=title, row_name="target token",
                     col_name="source token")
  return _save(figure, path)


def _bin_labels(length: int, count: int) -> list[str]:
  """`'start-end'` token ranges of `count` equal bins (the last shorter) over `length` tokens."""
  size = -(-length // count)
  return [f"{start}-{min(start + size, length) - 1}" for start in range(0, length, size)]


# The curves `plot_summary` draws: (key in an `attention_summary` layer, y axis title).
_CURVES = (("entropy", "entropy (nats)"), ("sink_mass", "weight on token 0"),
           ("learned_sink", "weight on the learned sink"), ("max_weight", "largest weight"),
           ("last_row", "last query's weights"))
_NO_SINK = 1e-4  # Below this everywhere, the learned-sink panel is left out (a model without one).


def plot_summary(summaries: Sequence[dict], path: str, *, title: str) -> str:
  """Per-query curves of a long input's attention (`attention_summary`), head means, one line per
  layer: entropy, mass on the first token, mass on the learned sink (when there is one), largest
  weight (x: query position), and the last query's exact weights (x: key position). Writes a PNG;
  returns `path`."""
  if not summaries:
    raise ValueError("summaries must hold one attention_summary dict per layer, got none")
  curves = [(name, label) for name, label in _CURVES if name != "learned_sink" or max(
      float(np.max(np.abs(layer[name]))) for layer in summaries) > _NO_SINK]
  figure = Figure(figsize=(10, 2.2 * len(curves) + 0.8), dpi=_DPI, layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(len(curves), 1, squeeze=False)[:, 0]
  for ax, (name, label) in zip(axes, curves):
    for index, layer in enumerate(summaries):
      curve = np.asarray(layer[name], np.float64).mean(axis=0)
      ax.plot(np.arange(curve.size), curve, linewidth=0.8, label=f"layer {index}")
    ax.set_ylabel(label, fontsize=8)
    ax.set_xlabel("key position" if name == "last_row" else "query position", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_xlim(0, curve.size - 1)
  axes[0].legend(fontsize=7, ncol=min(len(summaries), 6), loc="upper right")
  figure.suptitle(_wrapped(title + " (mean over heads)", 10, 12), fontsize=12)
  return _save(figure, path)


# What `attention_report` reads of a tokenizer (`flaxattn.data.tokenizers.Tokenizer`).
_TOKENIZER_NEEDS = ("encode", "pieces", "pad_id", "bos_id", "eos_id")


def _check_tokenizer(tokenizer) -> None:
  missing = [name for name in _TOKENIZER_NEEDS if not hasattr(tokenizer, name)]
  if missing:
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} lacks {missing}: attention_report takes a "
        f"flaxattn.data.tokenizers.Tokenizer (a task's, or load_pretrained's)")


def _tokenize(tokenizer, text: str, name: str, encode=None) -> tuple[list[int], list[str]]:
  """`encode(text)` (default `tokenizer.encode(text, add_special_tokens=True)`: the tokenizer's
  own framing) and a label per token."""
  if not isinstance(text, str):
    raise ValueError(f"{name} must be a str, got {type(text).__name__}")
  if encode is None:
    ids = list(tokenizer.encode(text, add_special_tokens=True))
  else:
    ids = list(encode(text))
  if not ids:
    raise ValueError(f"{name} {text!r} encodes to no tokens")
  return ids, _labels(tokenizer, ids)


def _labels(tokenizer, ids: list[int]) -> list[str]:
  labels = list(tokenizer.pieces(ids))
  if len(labels) != len(ids):
    raise ValueError(f"tokenizer.pieces gave {len(labels)} pieces for {len(ids)} ids")
  return labels


def _greedy_target(model: EncoderDecoder, tokenizer, source_ids: list[int], start_id: int,
                   max_new_tokens: int | None) -> list[int]:
  """`[start_id]` and the greedy translation of `source_ids`, up to and including its eos."""
  config = model.config
  if max_new_tokens is None:
    max_new_tokens = 2 * len(source_ids) + 10
    if config.positions == "learned":
      max_new_tokens = min(max_new_tokens, config.max_length - 1)
  tokens = generate(model, np.asarray([source_ids], np.int32), max_new_tokens=max_new_tokens,
                    eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, decoder_start_id=start_id)
  generated = np.asarray(tokens)[0, 1:].tolist()
  if tokenizer.eos_id in generated:
    generated = generated[:generated.index(tokenizer.eos_id) + 1]
  return [start_id] + generated


def attention_report(model, tokenizer, text_or_pair: str | tuple[str, str | None], directory: str,
                     *, prefix: str = "attention", max_heads: int = 8,
                     decoder_start_id: int | None = None,
                     max_new_tokens: int | None = None, encode=None) -> list[str]:
  """Writes per-layer attention heatmaps and the rollout (and the alignment) of one input as PNGs.

  The input is `encode(text)`, by default `tokenizer.encode(text, add_special_tokens=True)` (the
  tokenizer's framing: `[bos] text [eos]` for a task's tokenizer, `[CLS] text [SEP]` for BERT's, the
  GGUF's own for a llama file). For an `EncoderDecoder`, `text_or_pair` is
  the source text, or `(source, target)`: the decoder input is `[decoder_start_id] +
  tokenizer.encode(target) + [eos]`, or, when the target is missing or None, the greedy
  translation (up to its eos) that `flaxattn.models.generate` produces.

  Files, in this order (`P` = `directory/prefix`): `P_self_layer{i}.png` and `P_self_rollout.png`;
  beyond `FULL_MAP_TOKENS` tokens (softmax attention) `P_self_layer{i}.png` holds the pooled map
  and `P_self_curves.png` the per-query curves (`plot_summary`) instead of the rollout; for an
  `EncoderDecoder` (full maps at any length) instead `P_encoder_layer{i}.png`,
  `P_decoder_layer{i}.png`, `P_cross_layer{i}.png`, `P_encoder_rollout.png`,
  `P_decoder_rollout.png` and `P_alignment.png`.

  Args:
    model: a `DecoderLM`, `EncoderModel`, `EncoderClassifier` or `EncoderDecoder`.
    tokenizer: a `flaxattn.data.tokenizers.Tokenizer` (a task's, or the one `load_pretrained`
      returns): `encode(text, add_special_tokens=...)`, `pieces(ids)`, `pad_id`, `bos_id`, `eos_id`
      (None when absent).
    text_or_pair: the text; for an `EncoderDecoder` a source or a `(source, target)` pair.
    directory: where the PNGs go (created if missing).
    prefix: file name prefix and title tag.
    max_heads: heads drawn per layer (`plot_attention`).
    decoder_start_id: first decoder input token (default `tokenizer.bos_id`; needed when that is
      None).
    max_new_tokens: the greedy translation's length limit (default twice the source length plus
      10, within `config.max_length` for learned positions).
    encode: text -> the model's input ids, where the model saw texts framed otherwise (for example
      `Task.encode`, which frames a stream LM's text with eos only); not for an `EncoderDecoder`.

  Returns:
    The paths written.
  """
  kind = _model_type(model)
  _check_tokenizer(tokenizer)
  paths = []

  def layer_maps(name: str, layers, row_labels, col_labels, what: str):
    for index, layer in enumerate(layers):
      path = os.path.join(directory, f"{prefix}_{name}_layer{index}.png")
      paths.append(plot_attention(layer, row_labels, col_labels, path, max_heads=max_heads,
                                  title=f"{prefix}: {what}, layer {index}"))

  def rollout_map(name: str, layers, labels, what: str):
    path = os.path.join(directory, f"{prefix}_{name}_rollout.png")
    paths.append(plot_attention(rollout(layers), labels, labels, path,
                                title=f"{prefix}: {what} rollout over {len(layers)} "
                                f"layer{'s' if len(layers) > 1 else ''}",
                                row_name="output token (last layer)", col_name="input token"))

  if kind is not EncoderDecoder:
    ids, labels = _tokenize(tokenizer, text_or_pair, "text_or_pair", encode)
    if len(ids) > FULL_MAP_TOKENS and _probed(model):
      summaries = attention_summary(model, input_ids=ids, bins=SUMMARY_BINS)
      bins = _bin_labels(len(ids), summaries[0]["pooled"].shape[-1])
      size = -(-len(ids) // len(bins))
      for index, layer in enumerate(summaries):
        path = os.path.join(directory, f"{prefix}_self_layer{index}.png")
        paths.append(plot_attention(
            layer["pooled"], bins, bins, path, max_heads=max_heads,
            title=f"{prefix}: self-attention, layer {index}, {len(ids)} tokens pooled into bins of "
            f"{size} (rollout skipped: it needs whole [T, T] matrices)",
            row_name="query bin (tokens)", col_name="key bin (tokens)"))
      paths.append(plot_summary(summaries, os.path.join(directory, f"{prefix}_self_curves.png"),
                                title=f"{prefix}: self-attention of {len(ids)} tokens"))
      return paths
    layers = attention_weights(model, input_ids=ids)["self"]
    layer_maps("self", layers, labels, labels, "self-attention")
    rollout_map("self", layers, labels, "self-attention")
    return paths

  source, target = ((text_or_pair, None) if isinstance(text_or_pair, str) else
                    tuple(text_or_pair) if isinstance(text_or_pair, (tuple, list))
                    and len(text_or_pair) == 2 else (None, None))
  if source is None:
    raise ValueError(f"text_or_pair must be a source str or a (source, target) pair, got "
                     f"{text_or_pair!r}")
  source_ids, source_labels = _tokenize(tokenizer, source, "the source")
  start_id = tokenizer.bos_id if decoder_start_id is None else decoder_start_id
  if start_id is None:
    raise ValueError("attention_report: the tokenizer has no bos_id to start the decoder; pass "
                     "decoder_start_id")
  if target is None:
    target_ids = _greedy_target(model, tokenizer, source_ids, start_id, max_new_tokens)
  else:
    if not isinstance(target, str):
      raise ValueError(f"the target must be a str or None, got {type(target).__name__}")
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    target_ids = [start_id] + list(tokenizer.encode(target)) + eos
  target_labels = _labels(tokenizer, target_ids)
  weights = attention_weights(model, source_ids=source_ids, target_ids=target_ids)
  layer_maps("encoder", weights["encoder"], source_labels, source_labels, "encoder self-attention")
  layer_maps("decoder", weights["decoder"], target_labels, target_labels, "decoder self-attention")
  layer_maps("cross", weights["cross"], target_labels, source_labels, "cross-attention")
  rollout_map("encoder", weights["encoder"], source_labels, "encoder self-attention")
  rollout_map("decoder", weights["decoder"], target_labels, "decoder self-attention")
  paths.append(plot_alignment(weights["cross"], source_labels, target_labels,
                              os.path.join(directory, f"{prefix}_alignment.png"),
                              title=f"{prefix}: source-target alignment"))
  return paths
