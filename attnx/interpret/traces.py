"""Attention traces: every attention map of a model as typed records.

One form for teacher forcing and for the searches of `attnx.decoding`:

  trace_teacher_forced(model, src, tgt_in)          -> [Trace per example]
  trace_beam_search(model, src, beam_size=4, ...)   -> [[TracedHypothesis per hypothesis]]
  traces_from_search(model, src, result, selection) -> the same for any DecodeResult
                                                       (greedy, sampling, beam) with traces

An `AttentionRecord` is one map of one example or hypothesis: one layer of one
kind, every query at once, `weights [heads, queries, keys]` (`[queries, keys]`
for single-head mechanisms), with the positions of its queries and keys and
the boolean mask the model used over them. A `Trace` holds the records of one
example (or hypothesis), looked up by kind and layer.

Kinds (from the keys of the models' weights dicts; `attnx.decoding_traces.attention_kind`):

  'encoder/layer_{i}/self_attention'   'encoder-self'  layer i  (Transformer)
  'decoder/layer_{i}/self_attention'   'decoder-self'  layer i  (Transformer)
  'decoder/layer_{i}/cross_attention'  'cross'         layer i  (Transformer)
  'decoder/layer_{i}/attention'        'multi-step'    layer i  (ConvS2S)
  'decoder/spatial_attention'          'spatial'       layer 0  (captioner)
  'decoder/attention'                  'global'        layer 0  (RNN: Bahdanau, Luong global),
                                       'cross'                  with Luong local-m / local-p

Luong's local attention is a decoder-to-source map like any cross-attention,
restricted by a window that its mask records; 'global' is kept for the RNN's
attention over every source state (Luong's term). 'alignment' (an average of
the maps above) is no record; other entries that are no map (the captioner's
'gate' beta_t, hard attention's 'location') are a Trace's `extras`, `[queries, ...]`.

Positions and masks. Queries of decoder maps are target positions 0..n-1
(n = the hypothesis's length with its eos, or the non-pad tokens of a
teacher-forced row); keys are the real (non-pad) source positions, or target
positions 0..n-1 for decoder self-attention (at decode step k the cache
buffer's keys 0..k). Padding is never recorded: it is the key positions left
out. The mask is the rest of what the model masked, over the recorded
positions: causal for decoder self-attention, the local window (the
Transformer's `local_m` self-attention: |i - j| <= D in the encoder, the D
positions before in the decoder; Luong's local-m: |s - t| <= D; local-p:
|s - p_t| <= D around the predicted centre p_t, which the model returns as
'decoder/attention_center' and a trace keeps among its extras).

Selection and memory (`TraceSelection(layers, kinds, heads, top_k)`). The
selection is applied inside the compiled function: unselected maps never
leave the device and, on the layers that have the switch (`MultiHeadAttention.
skip_weights`), are never computed: an unselected layer keeps its kernel
('chunked', 'splash', 'cudnn'), a selected one computes its weights with the
reference kernel. With `top_k=k` only the k largest weights of each query
(and head) and their key indices (int32) leave the device. Bytes, float32, for
a Transformer with h heads (in "out": the selected ones), a source of s tokens
and t target tokens, per example and selected layer:

  teacher forcing, out:  encoder-self h*s*s*4, cross h*t*s*4, decoder-self h*t*t*4;
                         with top_k: h*s*k*8, h*t*k*8, h*t*k*8.
  teacher forcing, on device: a selected layer's scores and weights, 2*h*q*s*4
                         (q = s for encoder-self, t for cross) while it is computed;
                         they are dead once the layer's output and top-k exist.
  beam search (B beams, L the output buffer), out: h*L*s*4 per returned
                         hypothesis (cross; decoder-self h*L*L*4), top_k: h*L*k*8;
                         encoder maps once per source, as in teacher forcing.
  beam search, on device: each step's map is only B*h*s*4; the carried records
                         (alive and finished pools) 2*B*h*L*s*4, and 5*B*h*L*s*4
                         more while a step ranks candidates; top_k: s*4 -> k*8.

For s = 4,096, h = 8, k = 8, one selected encoder layer: 512 MiB per example
leave the device without top_k, 2 MiB with it; the on-device working set is
that layer's scores and weights, 2*8*4096*4096*4 bytes = 1 GiB per example
(every head: the layer's output needs them; `heads` shrinks only what leaves
the device), while the other layers keep their kernel ('chunked', or the
automatic choice: O(s) memory at this length).
Measured with `memory_analysis()` on the tiny Transformer (h = 2), s = 4,096,
t = 8: one encoder layer, top_k = 8: 256 MiB of temporaries (= 2*h*s*s*4),
0.5 MiB out; one cross layer: 10 MiB temporaries, 1 KiB out; beam search
(B = 4, L = 64) of one cross layer: top_k = 8: 10 MiB temporaries, 32 KiB
out; whole maps: 36 MiB temporaries, 8 MiB out.
"""

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from attnx import decoding
from attnx.decoding import (
    ATTENTION_KINDS,
    TraceSelection,
    attention_kind,
    select_weights,
    skip_unselected_layers,
    traced_encode,
)

__all__ = [
    "ATTENTION_KINDS",
    "AttentionRecord",
    "Trace",
    "TraceSelection",
    "TracedHypothesis",
    "trace_beam_search",
    "trace_teacher_forced",
    "traces_from_search",
]


@dataclasses.dataclass(frozen=True, eq=False)
class AttentionRecord:
    """One attention map of one example or hypothesis.

    Attributes:
      name: the weights-dict key it came from, e.g. 'decoder/layer_1/cross_attention'.
      kind: one of `ATTENTION_KINDS` (see the module docstring).
      layer: the layer index (0 for single-layer mechanisms).
      heads: the head indices of the weights' first axis; () for single-head maps.
      weights: float32 `[heads, queries, keys]`, or `[queries, keys]` when `heads`
        is (); with `key_indices`, the last axis holds the top-k weights of each
        query instead, largest first.
      query_positions: int `[queries]` positions of the queries (target positions,
        or source positions for encoder self-attention).
      key_positions: int `[keys]` positions of the keys the model could see
        (padding left out).
      mask: bool `[queries, keys]`, True where the model allowed the query to
        attend the key (causal, local windows), over `key_positions`.
      step: None when the record holds every query; k for a one-query view of
        decode step k (`at_step`).
      key_indices: with top-k traces, int `[..., queries, k]` the key position of
        each weight, -1 where fewer than k keys were allowed; else None.
    """

    name: str
    kind: str
    layer: int
    heads: tuple[int, ...]
    weights: np.ndarray
    query_positions: np.ndarray
    key_positions: np.ndarray
    mask: np.ndarray
    step: int | None = None
    key_indices: np.ndarray | None = None

    def at_step(self, step: int) -> "AttentionRecord":
        """The record of the query at target position `step` alone (queries axis of 1)."""
        (row,) = np.flatnonzero(self.query_positions == step)
        rows = slice(row, row + 1)
        indices = None if self.key_indices is None else self.key_indices[..., rows, :]
        return dataclasses.replace(
            self,
            weights=self.weights[..., rows, :],
            query_positions=self.query_positions[rows],
            mask=self.mask[rows],
            step=step,
            key_indices=indices,
        )

    def dense(self) -> np.ndarray:
        """The weights over every key position, `[heads, queries, keys]` (zero
        where a top-k trace kept nothing)."""
        if self.key_indices is None:
            return self.weights
        full = np.zeros((*self.weights.shape[:-1], len(self.key_positions)), np.float32)
        kept = self.key_indices >= 0
        where = np.nonzero(kept)  # leading indices, then the top-k slot (replaced by the column)
        column = np.searchsorted(self.key_positions, self.key_indices[kept])
        full[(*where[:-1], column)] = self.weights[kept]
        return full


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
    """The attention records of one example or hypothesis.

    Attributes:
      records: ordered by kind (`ATTENTION_KINDS`), then layer.
      extras: the weights-dict entries that are no map, `[queries, ...]`.
    """

    records: tuple[AttentionRecord, ...]
    extras: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, name: str) -> AttentionRecord:
        """The record of a weights-dict key, e.g. trace['decoder/layer_0/cross_attention']."""
        for record in self.records:
            if record.name == name:
                return record
        raise KeyError(f"Trace: no record {name!r}; have {[r.name for r in self.records]}")

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds present, in `ATTENTION_KINDS` order."""
        return tuple(k for k in ATTENTION_KINDS if any(r.kind == k for r in self.records))

    def by_kind(self, kind: str) -> tuple[AttentionRecord, ...]:
        """The records of one kind, by layer."""
        return tuple(r for r in self.records if r.kind == kind)

    def layers(self, kind: str) -> tuple[int, ...]:
        """The layers recorded for `kind`."""
        return tuple(r.layer for r in self.by_kind(kind))

    def get(self, kind: str, layer: int = 0) -> AttentionRecord | None:
        """The record of `kind` at `layer`, or None."""
        return next((r for r in self.records if r.kind == kind and r.layer == layer), None)

    def record(self, kind: str, layer: int = 0) -> AttentionRecord:
        """The record of `kind` at `layer`; KeyError naming what is there if absent."""
        found = self.get(kind, layer)
        if found is None:
            have = [(r.kind, r.layer) for r in self.records]
            raise KeyError(f"Trace: no {kind!r} record at layer {layer}; have {have}")
        return found


@dataclasses.dataclass(frozen=True, eq=False)
class TracedHypothesis:
    """One output of a search with its trace.

    Attributes:
      tokens: int `[n]` the generated tokens, eos included when `finished`.
      score: the search's ranking score (length-normalised for beam search).
      log_prob: the sum of the model's log-probs of the tokens.
      finished: True if it ended with eos.
      trace: its records; queries are its n steps.
    """

    tokens: np.ndarray
    score: float
    log_prob: float
    finished: bool
    trace: Trace


# -- device side ----------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "selection"))
def _teacher_forced(graphdef, state, src, tgt_in, selection: TraceSelection):
    """One forward pass; returns the selected encoder and decoder weights."""
    model = nnx.merge(graphdef, state)  # a copy: the switches below stay inside the trace
    model.eval()
    skip_unselected_layers(model, selection)
    encoded, source = traced_encode(model, src, selection)
    _, weights = model.decode(tgt_in, encoded, train=False, return_weights=True)
    return source, select_weights(weights, selection, model, step=False)


# -- host side: arrays -> records -------------------------------------------------


def _mask(
    model: Any,
    name: str,
    kind: str,
    queries: np.ndarray,
    keys: np.ndarray,
    centers: np.ndarray | None = None,
) -> np.ndarray:
    """What the model allowed, over recorded positions `[queries, keys]` (padding left out).

    `centers`: local-p's predicted window centres p_t, one per query position.
    """
    offset = keys[None, :] - queries[:, None]
    allowed = np.ones(offset.shape, bool)
    if kind == "decoder-self":
        allowed &= offset <= 0
    mechanism = getattr(getattr(model, "config", None), "mechanism", None)
    if mechanism is None or not mechanism.is_local:
        return allowed
    window = mechanism.window
    if kind == "encoder-self":
        allowed &= np.abs(offset) <= window
    elif kind == "decoder-self":
        allowed &= offset >= -window
    elif name == "decoder/attention" and mechanism.local == "local_m":
        allowed &= np.abs(offset) <= window  # p_t = t
    elif name == "decoder/attention" and mechanism.local == "local_p" and centers is not None:
        # The layer's own test, in float32: |s - p_t| <= D.
        distance = keys[None, :].astype(np.float32) - centers[queries][:, None].astype(np.float32)
        allowed &= np.abs(distance) <= window
    return allowed


def _source_positions(src: np.ndarray, keys: int) -> np.ndarray:
    """Real source positions of one example: non-pad tokens, or every location of an image."""
    if np.issubdtype(src.dtype, np.integer) and src.ndim == 1:
        return np.flatnonzero(src != decoding.PAD_ID)
    return np.arange(keys)


def _record(
    model: Any,
    selection: TraceSelection,
    name: str,
    entry: Mapping[str, np.ndarray],
    source_positions: np.ndarray,
    length: int,
    queries_first: bool,
    centers: np.ndarray | None = None,
) -> AttentionRecord:
    """A record from one example's (or hypothesis's) selected arrays.

    `entry['weights']` is `[heads, queries, keys]` / `[queries, keys]`, or with
    `queries_first` (a search's steps) `[queries, heads, keys]` for decoder maps.
    """
    kind, layer = attention_kind(name, model)
    weights = entry["weights"]
    indices = entry.get("indices")
    multi_head = weights.ndim == 3
    if queries_first and multi_head and kind != "encoder-self":  # encoder maps: once per source
        weights = np.moveaxis(weights, 0, 1)
        indices = None if indices is None else np.moveaxis(indices, 0, 1)
    if kind == "encoder-self":
        queries = keys = source_positions
    elif kind == "decoder-self":
        queries = keys = np.arange(length)
    else:
        queries, keys = np.arange(length), source_positions
    mask = _mask(model, name, kind, queries, keys, centers)
    weights = weights[..., queries, :]
    if indices is None:
        weights = weights[..., keys]
    else:
        indices = indices[..., queries, :]
        # Top-k entries on keys the model did not allow (padding, later steps) weigh 0: drop them.
        column = np.full(max(keys.max(initial=-1), indices.max(initial=-1)) + 1, -1)
        column[keys] = np.arange(len(keys))
        columns = column[indices]
        rows = np.arange(len(queries))[:, None]
        kept = (columns >= 0) & mask[rows, np.maximum(columns, 0)]
        count = min(weights.shape[-1], len(keys))
        weights = np.where(kept, weights, 0.0)[..., :count]
        indices = np.where(kept, indices, -1)[..., :count]
    if multi_head:
        heads = selection.heads or tuple(range(weights.shape[0]))
    else:
        heads = ()
    return AttentionRecord(
        name=name,
        kind=kind,
        layer=layer,
        heads=tuple(heads),
        weights=np.asarray(weights, np.float32),
        query_positions=queries,
        key_positions=keys,
        mask=mask,
        key_indices=indices,
    )


def _trace(
    model: Any,
    selection: TraceSelection,
    maps: Mapping[str, Mapping[str, np.ndarray]],
    src: np.ndarray,
    length: int,
    queries_first: bool,
) -> Trace:
    """A Trace from one example's arrays: `maps` by weights-dict key (encoder ones included)."""
    extras = {
        name: np.asarray(entry["weights"][:length])
        for name, entry in maps.items()
        if attention_kind(name, model) is None
    }
    centers = extras.get("decoder/attention_center")
    records = []
    for name, entry in maps.items():
        if name in extras:
            continue
        keys = entry["weights"].shape[-1]
        positions = _source_positions(src, keys)
        records.append(
            _record(model, selection, name, entry, positions, length, queries_first, centers)
        )
    records.sort(key=lambda r: (ATTENTION_KINDS.index(r.kind), r.layer, r.name))
    return Trace(tuple(records), extras)


def _example(tree: Mapping[str, Mapping[str, np.ndarray]], *index: int) -> dict:
    return {name: {k: v[index] for k, v in entry.items()} for name, entry in tree.items()}


# -- public API -------------------------------------------------------------------


def trace_teacher_forced(
    model: nnx.Module,
    src: jax.Array | np.ndarray,
    tgt_in: jax.Array | np.ndarray,
    *,
    selection: TraceSelection | None = None,
    lengths: Sequence[int] | None = None,
) -> list[Trace]:
    """Every (selected) attention map of one teacher-forced forward pass, per example.

    Args:
      model: an attnx seq2seq model (`encode` / `decode(..., return_weights=True)`).
      src: the source batch, tokens `[b, s]` (0 = padding) or images.
      tgt_in: int `[b, t]`, the targets shifted right (bos first), 0 = padding.
      selection: which maps, heads and how much of each (default: everything).
      lengths: the number of target positions to record per example; default
        the non-pad tokens of each `tgt_in` row.

    Returns:
      One `Trace` per example (queries 0..n-1; see the module docstring).
      Compiled once per shapes and selection; the caller's model is not changed.
    """
    selection = TraceSelection() if selection is None else selection
    src, tgt_in = np.asarray(src), np.asarray(tgt_in)
    graphdef, state = nnx.split(model)
    source, decoded = jax.device_get(_teacher_forced(graphdef, state, src, tgt_in, selection))
    if lengths is None:
        lengths = np.sum(tgt_in != decoding.PAD_ID, axis=1)
    traces = []
    for i, length in enumerate(lengths):
        maps = {**_example(source, i), **_example(decoded, i)}
        traces.append(_trace(model, selection, maps, src[i], int(length), queries_first=False))
    return traces


def traces_from_search(
    model: nnx.Module,
    src: jax.Array | np.ndarray,
    result: decoding.DecodeResult,
    selection: TraceSelection | None = None,
) -> list[list[TracedHypothesis]]:
    """The hypotheses of a search run with `trace=selection`, each with its `Trace`.

    Args:
      model: the searched model (for kinds and masks).
      src: the searched source batch.
      result: from `attnx.decoding` (greedy, sampling: one hypothesis per
        example; beam search: `num_return`) with `result.traces` set.
      selection: the search's `trace` selection (default: everything).

    Returns:
      Per example, per hypothesis (best first) a `TracedHypothesis`; the
      encoder's records (once per source on the device) are shared by them.
    """
    if result.traces is None:
        raise ValueError("traces_from_search: the search ran without trace=TraceSelection(...)")
    selection = TraceSelection() if selection is None else selection
    result = jax.device_get(result)
    src = np.asarray(src)
    beam = result.sequences.ndim == 3

    def per_hypothesis(x):  # greedy / sampling: a hypothesis axis of 1
        return x if beam else x[:, None]

    sequences, scores = per_hypothesis(result.sequences), per_hypothesis(result.scores)
    log_probs, lengths = per_hypothesis(result.log_probs), per_hypothesis(result.lengths)
    finished = per_hypothesis(result.finished)
    steps = jax.tree.map(per_hypothesis, result.traces.steps)
    out = []
    for i in range(sequences.shape[0]):
        source = _example(result.traces.source, i)
        hypotheses = []
        for j in range(sequences.shape[1]):
            n = int(lengths[i, j])
            maps = {**source, **_example(steps, i, j)}
            hypotheses.append(
                TracedHypothesis(
                    tokens=sequences[i, j, :n],
                    score=float(scores[i, j]),
                    log_prob=float(log_probs[i, j]),
                    finished=bool(finished[i, j]),
                    trace=_trace(model, selection, maps, src[i], n, queries_first=True),
                )
            )
        out.append(hypotheses)
    return out


def trace_beam_search(
    model: nnx.Module,
    src: jax.Array | np.ndarray,
    *,
    beam_size: int,
    num_return: int = 1,
    selection: TraceSelection | None = None,
    **search_options: Any,
) -> list[list[TracedHypothesis]]:
    """Beam search carrying every (selected) attention map of every step, per hypothesis.

    The maps are carried inside the compiled search and reordered with the
    beams (`attnx.decoding.beam_search(trace=...)`); a hypothesis's trace
    equals that of `trace_teacher_forced` on its tokens.

    Args:
      model, src: as for `attnx.decoding.beam_search`.
      beam_size, num_return: hypotheses kept, and returned per example.
      selection: which maps, heads and how much of each (default: everything).
      **search_options: the other arguments of `beam_search` (max_length,
        alpha, length_penalty, min_length, eos_id, bos_id, ...).

    Returns:
      Per example, `num_return` `TracedHypothesis`, best first.
    """
    selection = TraceSelection() if selection is None else selection
    result = decoding.beam_search(
        model, src, beam_size=beam_size, num_return=num_return, trace=selection, **search_options
    )
    return traces_from_search(model, src, result, selection)
