"""Attention flow against max-flows computed here, independently of attnx.interpret.flow.

Two references: networkx's `maximum_flow_value` when networkx is installed, and
always a plain Edmonds-Karp written below (BFS augmenting paths over one dense
capacity matrix of all (layer, position) nodes). The capacities are built here
from the paper's definition, A' = (A + I) / row sums, with NumPy.
"""

import collections

import numpy as np
import pytest

from attnx.interpret import flow as fl
from attnx.interpret import rollout as ro


def _dense_edmonds_karp(capacity: np.ndarray, source: int, sink: int) -> float:
    """Max-flow value in the graph with capacity[u, v] on edge u -> v (float64, dense)."""
    residual = capacity.astype(np.float64).copy()
    size = len(residual)
    total = 0.0
    while True:
        parent = [-1] * size
        parent[source] = source
        queue = collections.deque([source])
        while queue and parent[sink] == -1:
            u = queue.popleft()
            for v in range(size):
                if parent[v] == -1 and residual[u, v] > 1e-12:
                    parent[v] = u
                    queue.append(v)
        if parent[sink] == -1:
            return total
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u, v] for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        total += push


def _graph(maps: np.ndarray) -> np.ndarray:
    """Dense capacities of the layered graph: node l * n + p; edge (l, i) -> (l - 1, j)."""
    depth, n, _ = maps.shape
    capacity = np.zeros(((depth + 1) * n, (depth + 1) * n))
    for layer in range(1, depth + 1):
        capacity[layer * n : (layer + 1) * n, (layer - 1) * n : layer * n] = maps[layer - 1]
    return capacity


def _reference_flow(maps: np.ndarray, use_networkx: bool = False) -> np.ndarray:
    """flow[i, j] from top node i to input node j, for capacities `[layers, n, n]`."""
    depth, n, _ = maps.shape
    capacity = _graph(maps)
    if use_networkx:
        nx = pytest.importorskip("networkx")
        graph = nx.DiGraph()
        for u, v in zip(*np.nonzero(capacity), strict=True):
            graph.add_edge(int(u), int(v), capacity=float(capacity[u, v]))
        graph.add_nodes_from(range(len(capacity)))
        return np.array(
            [[nx.maximum_flow_value(graph, depth * n + i, j) for j in range(n)] for i in range(n)]
        )
    return np.array(
        [[_dense_edmonds_karp(capacity, depth * n + i, j) for j in range(n)] for i in range(n)]
    )


def _random_attention(rng, shape, concentration=0.5):
    """Random rows on the simplex, `[..., n, n]`; small concentrations give near-zeros."""
    return rng.dirichlet(np.full(shape[-1], concentration), size=shape[:-1]).astype(np.float32)


def _with_residual(maps: np.ndarray) -> np.ndarray:
    """The paper's A' = (A + I) / row sums, `[layers, n, n]`, float64."""
    maps = maps.astype(np.float64) + np.eye(maps.shape[-1])
    return maps / maps.sum(-1, keepdims=True)


@pytest.mark.parametrize("n", [4, 5, 6])
@pytest.mark.parametrize("use_networkx", [False, True])
def test_attention_flow_equals_a_reference_max_flow(n, use_networkx):
    rng = np.random.default_rng(n)
    layers = _random_attention(rng, (3, 2, n, n))  # 3 layers of [heads, n, n]
    expected = _reference_flow(_with_residual(layers.mean(axis=1)), use_networkx)
    got = fl.attention_flow(list(layers))
    assert got.shape == (n, n)
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(4))
def test_max_flow_layered_on_sparse_unnormalised_capacities(seed):
    # Integer-free, unbalanced capacities with many zeros: paths that must use reverse
    # edges (take back flow) are common here, unlike in residual attention.
    rng = np.random.default_rng(10 + seed)
    depth, n = 3, 5
    capacities = rng.uniform(size=(depth, n, n)) * (rng.uniform(size=(depth, n, n)) < 0.5)
    expected = _reference_flow(capacities)
    sources, sinks = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    got = fl.max_flow_layered(capacities, sources.ravel(), sinks.ravel()).reshape(n, n)
    np.testing.assert_allclose(got, expected, atol=1e-9, rtol=0)
    # The same values when the pairs are solved a few at a time.
    chunked = fl.max_flow_layered(
        capacities, sources.ravel(), sinks.ravel(), max_elements=3 * depth * n * n
    )
    np.testing.assert_allclose(chunked.reshape(n, n), expected, atol=1e-9, rtol=0)


def test_flow_without_residual_and_with_max_heads():
    rng = np.random.default_rng(7)
    layers = _random_attention(rng, (3, 3, 5, 5), concentration=0.3)
    expected = _reference_flow(layers.mean(axis=1).astype(np.float64))
    np.testing.assert_allclose(fl.attention_flow(list(layers), residual=False), expected, atol=1e-6)
    maxed = layers.max(axis=1).astype(np.float64)
    maxed /= maxed.sum(-1, keepdims=True)
    expected = _reference_flow(_with_residual(maxed))
    got = fl.attention_flow(list(layers), head_reduction="max")
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_one_layer_flow_is_its_capacities_and_identity_flows_through():
    rng = np.random.default_rng(8)
    a = _random_attention(rng, (4, 4))
    got = fl.attention_flow([a], head_reduction=None)
    np.testing.assert_allclose(got, _with_residual(a[None])[0], atol=1e-6)
    eye = np.eye(4, dtype=np.float32)
    np.testing.assert_allclose(fl.attention_flow([eye] * 3, head_reduction=None), np.eye(4))


def test_batch_padding_and_normalised_rows():
    rng = np.random.default_rng(9)
    layers = _random_attention(rng, (3, 2, 2, 5, 5))  # [layers, batch, heads, n, n]
    mask = np.array([[True] * 5, [True] * 3 + [False] * 2])
    got = fl.attention_flow(list(layers), mask=mask)
    assert got.shape == (2, 5, 5)
    for b in range(2):
        valid = mask[b]
        maps = layers[:, b].mean(axis=1)[:, valid][:, :, valid]
        maps = maps / maps.sum(-1, keepdims=True)  # renormalised over the real tokens
        expected = np.zeros((5, 5))
        expected[np.ix_(valid, valid)] = _reference_flow(_with_residual(maps))
        np.testing.assert_allclose(got[b], expected, atol=1e-6)
    assert np.all(got <= 1 + 1e-6)  # float32 rows sum to 1 within rounding
    normalised = fl.attention_flow(list(layers), mask=mask, normalize=True)
    np.testing.assert_allclose(normalised.sum(-1)[mask], 1.0, atol=1e-9)
    assert np.all(normalised.sum(-1)[~mask] == 0)


def test_encoder_decoder_flow_by_hand_and_against_the_reference():
    # One cross-attention layer and nothing else: a one-stage graph, so the flow of
    # target i is its row [0.5 I | 0.5 C].
    c = np.array([[0.25, 0.75, 0.0], [0.5, 0.25, 0.25]], np.float32)
    result = fl.encoder_decoder_flow([], [], [c], head_reduction=None)
    np.testing.assert_allclose(result.target, 0.5 * np.eye(2), atol=1e-7)
    np.testing.assert_allclose(result.source, 0.5 * c, atol=1e-7)
    # A Transformer-like stack: the max-flow on the stages' graph, by the reference.
    rng = np.random.default_rng(11)
    t, s = 3, 4
    encoder = list(_random_attention(rng, (2, 2, s, s)))
    decoder = [
        np.tril(m) / np.tril(m).sum(-1, keepdims=True) for m in _random_attention(rng, (2, 2, t, t))
    ]
    cross = list(_random_attention(rng, (2, 2, t, s)))
    result = fl.encoder_decoder_flow(encoder, decoder, cross)
    stages = np.stack(
        [np.asarray(m, np.float64) for m in ro.encoder_decoder_stages(encoder, decoder, cross)]
    )
    expected = _reference_flow(stages)[:t]
    np.testing.assert_allclose(result.target, expected[:, :t], atol=1e-6)
    np.testing.assert_allclose(result.source, expected[:, t:], atol=1e-6)
    assert np.all(np.triu(result.target, 1) == 0)  # causal: no flow to later target tokens


def test_source_flow_of_weights_dicts():
    rng = np.random.default_rng(12)
    b, h, s, t = 2, 2, 4, 3
    transformer = {
        "encoder/layer_0/self_attention": _random_attention(rng, (b, h, s, s)),
        "decoder/layer_0/self_attention": np.tril(np.ones((b, h, t, t), np.float32))
        / np.arange(1, t + 1, dtype=np.float32)[:, None],
        "decoder/layer_0/cross_attention": _random_attention(rng, (b, h, t, s)),
        "alignment": np.zeros((b, t, s), np.float32),
    }
    convs2s = {f"decoder/layer_{i}/attention": _random_attention(rng, (b, t, s)) for i in (0, 2)}
    rnn = {"decoder/attention": _random_attention(rng, (b, t, s))}
    for weights in (transformer, convs2s, rnn):
        got = fl.source_flow(weights)
        assert got.shape == (b, t, s)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(fl.source_flow(rnn), rnn["decoder/attention"], atol=1e-6)
    with pytest.raises(ValueError, match="keys present"):
        fl.source_flow({"gate": np.zeros((b, t))})
