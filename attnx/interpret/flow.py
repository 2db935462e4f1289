"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", sec. 3).

Rollout (`attnx.interpret.rollout`) multiplies the layers' mixing matrices, so a
token's relevance is the sum over all paths of the product of their weights.
Attention flow treats the same graph as a flow network and asks how much can
pass at once: the weights are capacities, and a token's relevance is a max-flow.

The graph. Nodes are (l, p): layer l = 0..L (0 = the input tokens, L = the top
layer's outputs), position p = 0..n-1. With A'_l the residual-augmented,
head-reduced attention of layer l (`rollout.residual_attention`: A'_l =
normalize_rows(0.5 A_l + 0.5 I)), there is a directed edge

  (l, i) -> (l - 1, j)   with capacity   A'_l[i, j],    l = 1..L,

from a query position down to the key position it reads (the reference code's
directed graph; flow goes from outputs to inputs). Then

  flow[i, j] = max-flow from (L, i) to (0, j),

at most 1, since the out-capacity of every node is its row sum, 1. The paper's
code divides each row of flow values by its sum (`normalize=True` here).

The max-flow is Edmonds-Karp (shortest augmenting paths, found by BFS in the
residual graph; Edmonds & Karp 1972), written for this layered graph in
NumPy: the flow on the edges between layers l and l-1 is an `[n, n]` block,
so the residual graph is `C - F` (downwards) and `F` (back upwards, the
graph has no antiparallel edges), with no adjacency lists. Each (i, j) pair
is its own max-flow problem (a directed graph has no Gomory-Hu tree to share
cuts between sinks); what is shared is the work: all pairs advance together,
one BFS level of all problems being one vectorised pass over `[pairs, L, n, n]`
arrays, and pairs with no path at all (zero rollout) are skipped.

Complexity: with V = (L + 1) n nodes and E = L n^2 edges, Edmonds-Karp needs
O(V E) augmentations of O(E) each per pair, O(V E^2) = O(L^3 n^5) worst case,
for n^2 pairs; float capacities are fine (the bound does not depend on them).
In practice the number of augmentations is far below the bound, but flow is
still much dearer than rollout's L matrix products (n = 20, L = 6: all 400 pairs
in a few seconds on one CPU core): use it on short inputs. Encoder-decoder flow
runs on t + s nodes per stage and L_enc + 2 L_dec stages.
Memory: `max_elements` bounds the `[pairs, L, n, n]` arrays; pairs are run in
chunks that fit.
"""

from collections.abc import Mapping, Sequence

import numpy as np

from attnx.interpret.rollout import (
    Array,
    EncoderDecoderRelevance,
    HeadReduction,
    attention_stacks,
    encoder_decoder_stages,
    reduce_heads,
    residual_attention,
)

__all__ = [
    "attention_flow",
    "encoder_decoder_flow",
    "max_flow_layered",
    "source_flow",
]

# Residual capacities below this are treated as saturated (float dust from augmenting).
TOLERANCE = 1e-12


def _bfs(
    capacities: np.ndarray, flows: np.ndarray, sources: np.ndarray, sinks: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Breadth-first search of every problem's residual graph, all problems at once.

    Args:
      capacities: `[L, n, n]`, capacities[k, a, b] on the edge (k+1, a) -> (k, b).
      flows: `[P, L, n, n]` the current flow of each problem on those edges.
      sources / sinks: int `[P]`, positions in layer L / layer 0.

    Returns:
      found `[P]` bool (the sink was reached), and the BFS tree as parent_layer,
      parent_pos `[P, L + 1, n]` (-1 where not reached).
    """
    problems, layers, n, _ = flows.shape
    rows = np.arange(problems)
    down_open = (capacities - flows) > tol  # residual of (k+1, a) -> (k, b)
    up_open = flows > tol  # residual of the reverse edge (k, b) -> (k+1, a)
    parent_layer = np.full((problems, layers + 1, n), -1, np.int32)
    parent_pos = np.full((problems, layers + 1, n), -1, np.int32)
    visited = np.zeros((problems, layers + 1, n), bool)
    visited[rows, layers, sources] = True
    frontier = visited.copy()
    found = np.zeros(problems, bool)
    # (from layer, to layer): down every stage, then back up every stage.
    moves = [(k + 1, k) for k in range(layers)] + [(k, k + 1) for k in range(layers)]
    while True:
        # Only the problems and layers that have a frontier do any work this level.
        live = np.flatnonzero(frontier.any(axis=(1, 2)))
        if live.size == 0:
            return found, parent_layer, parent_pos
        front = frontier[live]
        seen = visited[live]
        new = np.zeros_like(front)
        for origin, target in moves:
            if not front[:, origin].any():
                continue
            if target < origin:  # down, stage `target`: (origin, a) -> (target, b)
                reach = front[:, origin, :, None] & down_open[live, target]  # [live, a, b]
                axis = 1
            else:  # up, stage `origin`: (origin, b) -> (target, a)
                reach = front[:, origin, None, :] & up_open[live, origin]  # [live, a, b]
                axis = 2
            # argmax finds a parent; the entry there says whether there is one.
            parent = reach.argmax(axis=axis)
            hit = np.take_along_axis(reach, np.expand_dims(parent, axis), axis).squeeze(axis)
            hit &= ~seen[:, target] & ~new[:, target]
            who, where = np.nonzero(hit)
            parent_layer[live[who], target, where] = origin
            parent_pos[live[who], target, where] = parent[who, where]
            new[:, target] |= hit
        visited[live] = seen | new
        found = visited[rows, 0, sinks]
        frontier = np.zeros_like(visited)
        frontier[live] = new
        frontier[found] = False  # a problem whose sink is reached stops searching


def _augment(
    capacities: np.ndarray,
    flows: np.ndarray,
    problems: np.ndarray,
    sources: np.ndarray,
    sinks: np.ndarray,
    parent_layer: np.ndarray,
    parent_pos: np.ndarray,
) -> np.ndarray:
    """Pushes the bottleneck along each problem's BFS path (sink back to source), in place.

    `problems` index `flows`; parent arrays, `sources` and `sinks` are per problem, in
    the same order. Returns the amount pushed, `[len(problems)]`.
    """
    layers = capacities.shape[0]
    count = len(problems)
    layer = np.zeros(count, np.int32)
    pos = sinks.astype(np.int32)
    bottleneck = np.full(count, np.inf)
    walking = np.ones(count, bool)
    path = []
    while walking.any():
        w = np.flatnonzero(walking)
        up_layer = parent_layer[w, layer[w], pos[w]]
        up_pos = parent_pos[w, layer[w], pos[w]]
        downward = up_layer == layer[w] + 1  # a forward edge (else a reverse one)
        stage = np.where(downward, layer[w], up_layer)
        top = np.where(downward, up_pos, pos[w])
        bottom = np.where(downward, pos[w], up_pos)
        current = flows[problems[w], stage, top, bottom]
        residual = np.where(downward, capacities[stage, top, bottom] - current, current)
        bottleneck[w] = np.minimum(bottleneck[w], residual)
        path.append((w, stage, top, bottom, np.where(downward, 1.0, -1.0)))
        layer[w], pos[w] = up_layer, up_pos
        walking[w] = ~((up_layer == layers) & (up_pos == sources[w]))
    for w, stage, top, bottom, sign in path:
        flows[problems[w], stage, top, bottom] += sign * bottleneck[w]
    return bottleneck


def _max_flow_chunk(
    capacities: np.ndarray, sources: np.ndarray, sinks: np.ndarray, tol: float
) -> np.ndarray:
    layers, n, _ = capacities.shape
    flows = np.zeros((len(sources), layers, n, n))
    values = np.zeros(len(sources))
    active = np.ones(len(sources), bool)
    # Edmonds-Karp makes at most V E / 2 augmentations; more would be a bug.
    limit = (layers + 1) * n * layers * n * n + 1
    for _ in range(limit):
        ids = np.flatnonzero(active)
        if ids.size == 0:
            return values
        found, parent_layer, parent_pos = _bfs(
            capacities, flows[ids], sources[ids], sinks[ids], tol
        )
        active[ids[~found]] = False  # no augmenting path: the flow is maximal
        if found.any():
            values[ids[found]] += _augment(
                capacities,
                flows,
                ids[found],
                sources[ids[found]],
                sinks[ids[found]],
                parent_layer[found],
                parent_pos[found],
            )
    raise RuntimeError("max_flow_layered: Edmonds-Karp did not terminate")


def max_flow_layered(
    capacities: np.ndarray,
    sources: np.ndarray,
    sinks: np.ndarray,
    *,
    tolerance: float = TOLERANCE,
    max_elements: int = 1 << 22,
) -> np.ndarray:
    """Max-flow values of many (source, sink) pairs in one layered graph (Edmonds-Karp).

    Args:
      capacities: `[L, n, n]` non-negative; capacities[l - 1, i, j] is the capacity of
        the edge (l, i) -> (l - 1, j), l = 1..L (layer 0 = inputs).
      sources: int `[P]`, source positions in the top layer L.
      sinks: int `[P]`, sink positions in layer 0.
      tolerance: residual capacities at or below it count as zero.
      max_elements: bound on P' L n^2 for the pairs run together (memory).

    Returns:
      `[P]` float64 max-flow values.
    """
    capacities = np.asarray(capacities, np.float64)
    if capacities.ndim != 3 or capacities.shape[1] != capacities.shape[2]:
        raise ValueError(f"max_flow_layered: capacities must be [L, n, n], got {capacities.shape}")
    if np.any(capacities < 0):
        raise ValueError("max_flow_layered: capacities must be non-negative")
    sources = np.asarray(sources, np.int64).reshape(-1)
    sinks = np.asarray(sinks, np.int64).reshape(-1)
    if sources.shape != sinks.shape:
        raise ValueError(f"max_flow_layered: {sources.size} sources for {sinks.size} sinks")
    layers, n, _ = capacities.shape
    chunk = max(1, max_elements // (layers * n * n))
    values = np.zeros(len(sources))
    for start in range(0, len(sources), chunk):
        part = slice(start, start + chunk)
        values[part] = _max_flow_chunk(capacities, sources[part], sinks[part], tolerance)
    return values


def _flow_from_top(capacities: np.ndarray, top: int, normalize: bool) -> np.ndarray:
    """flow[..., i, j] from (L, i), i < top, to (0, j), for stacked `[L, ..., n, n]` capacities."""
    capacities = np.moveaxis(np.asarray(capacities, np.float64), 0, -3)  # [..., L, n, n]
    n = capacities.shape[-1]
    out = np.zeros(capacities.shape[:-3] + (top, n))
    for index in np.ndindex(capacities.shape[:-3]):
        stack = capacities[index]
        # Pairs with no path at all (zero rollout) have zero flow: only the rest are solved.
        reach = np.eye(n, dtype=bool)
        for layer in stack:
            reach = ((layer > TOLERANCE).astype(np.int64) @ reach.astype(np.int64)) > 0
        sources, sinks = np.nonzero(reach[:top])
        out[index][sources, sinks] = max_flow_layered(stack, sources, sinks)
    if normalize:
        total = out.sum(axis=-1, keepdims=True)
        out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return out


def attention_flow(
    layers: Sequence[Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    mask: Array | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Attention flow of a self-attention stack: flow[i, j] = max-flow (L, i) -> (0, j).

    Args:
      layers: self-attention weights per layer, first first, each `[..., heads, n, n]`
        (`[..., n, n]` with `head_reduction=None`), as `rollout.rollout` takes them.
      head_reduction: see `rollout.reduce_heads`.
      residual: capacities A' = normalize_rows(0.5 A + 0.5 I) (else A, rows renormalised).
      mask: optional bool `[..., n]`, True at real tokens (padding gets no capacity).
      normalize: divide each row by its sum, as the paper's code does.

    Returns:
      `[..., n, n]` float64 NumPy; any leading (batch) axes are solved one example at a
      time. Raw values lie in [0, 1].
    """
    if len(layers) == 0:
        raise ValueError("attention_flow: no layers")
    maps = [
        np.asarray(
            residual_attention(reduce_heads(w, head_reduction), residual=residual, mask=mask)
        )
        for w in layers
    ]
    if len({m.shape for m in maps}) != 1:
        raise ValueError(f"attention_flow: layers of different shapes {[m.shape for m in maps]}")
    return _flow_from_top(np.stack(maps), maps[0].shape[-1], normalize)


def encoder_decoder_flow(
    encoder_self: Sequence[Array],
    decoder_self: Sequence[Array],
    cross: Sequence[Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    source_mask: Array | None = None,
    target_mask: Array | None = None,
) -> EncoderDecoderRelevance:
    """Attention flow through an encoder-decoder, on the graph rollout uses.

    The layers are `rollout.encoder_decoder_stages`: t + s nodes per stage (target
    positions, then encoder positions), one stage per encoder layer, decoder
    self-attention and cross-attention. An encoder position's identity edges carry it,
    with capacity 1, up to every cross-attention that reads it. flow[i, j] is the max-flow
    from target position i at the top to input node j (a target token or a source
    token). Arguments as `rollout.encoder_decoder_rollout`.

    Returns:
      `EncoderDecoderRelevance(source=[..., t, s], target=[..., t, t])`, float64 NumPy
      max-flow values (not normalised).
    """
    stages = encoder_decoder_stages(
        encoder_self,
        decoder_self,
        cross,
        head_reduction=head_reduction,
        residual=residual,
        source_mask=source_mask,
        target_mask=target_mask,
    )
    t = reduce_heads(cross[0], head_reduction).shape[-2]
    flow = _flow_from_top(np.stack([np.asarray(m) for m in stages]), t, normalize=False)
    return EncoderDecoderRelevance(source=flow[..., t:], target=flow[..., :t])


def source_flow(
    weights: Mapping[str, Array],
    *,
    head_reduction: HeadReduction = "mean",
    residual: bool = True,
    normalize: bool = True,
) -> np.ndarray:
    """Attention flow of every target position to every source token, from a weights dict.

    As `rollout.source_relevance` (same keys, see `rollout.attention_stacks`), with
    `encoder_decoder_flow` in place of rollout. `normalize` divides each row by its sum
    (a distribution over the source tokens).

    Returns:
      `[b, t, s]` float64 NumPy.
    """
    stacks = attention_stacks(weights)
    if stacks.has_heads and head_reduction is None:
        raise ValueError("source_flow: the Transformer's maps have heads: pick a reduction")
    flow = encoder_decoder_flow(
        stacks.encoder_self,
        stacks.decoder_self,
        stacks.cross,
        head_reduction=head_reduction if stacks.has_heads else None,
        residual=residual,
    ).source
    if normalize:
        total = flow.sum(axis=-1, keepdims=True)
        flow = np.divide(flow, total, out=np.zeros_like(flow), where=total > 0)
    return flow
