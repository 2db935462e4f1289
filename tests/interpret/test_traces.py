"""Tests for attnx.interpret.traces: attention records from teacher forcing and beam search.

The reference for a searched hypothesis's trace is an independent forward pass:
the teacher-forced `decode(return_weights=True)` of the same tokens, whose maps
must match the ones carried and reordered inside the compiled beam search,
record by record. Top-k traces are checked against the top-k of the full maps,
and traces of a 'chunked' model against those of the default implementation.
"""

import importlib

import numpy as np
import pytest
from flax import nnx

from attnx import decoding
from attnx.interpret import traces
from attnx.interpret.traces import TraceSelection
from attnx.models import build_model, make_model_config

# The module, not the function `attnx.layers.attention` that the package exports.
attention_module = importlib.import_module("attnx.layers.attention")

VOCAB = 13
BOS, EOS = 1, 2
MAX_LENGTH = 5
# Two sources, the second padded.
SRC = np.array([[5, 6, 7, 8, 9, 2], [4, 11, 2, 0, 0, 0]], np.int32)
IMAGES = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype(np.float32)

SECTIONS = {
    "transformer": dict(name="transformer", preset="tiny"),
    "rnn-bahdanau": dict(name="rnn", preset="tiny"),
    "rnn-luong-general": dict(name="rnn", preset="tiny", variant="luong"),
    "rnn-luong-local_p": dict(
        name="rnn", preset="tiny", variant="luong", attention=dict(local="local_p", window=1)
    ),
    "convs2s": dict(name="convs2s", preset="tiny"),
    "captioner-soft": dict(name="captioner", preset="tiny"),
}


def _build(section: dict) -> nnx.Module:
    config = make_model_config(section, source_vocab_size=VOCAB, target_vocab_size=VOCAB)
    return build_model(section["name"], config, rngs=nnx.Rngs(params=0, dropout=1))


@pytest.fixture(scope="module")
def models():
    built = {}

    def get(name):
        if name not in built:
            built[name] = _build(SECTIONS[name])
        return built[name]

    return get


def _source(name: str) -> np.ndarray:
    return IMAGES if name.startswith("captioner") else SRC


def _rerun(model, src, hypotheses) -> list[list[traces.Trace]]:
    """Teacher-forced traces of every hypothesis, from one batch of its tokens."""
    rows, lengths = [], []
    for example in hypotheses:
        for hypothesis in example:
            n = len(hypothesis.tokens)
            row = np.zeros(MAX_LENGTH, np.int32)
            row[0], row[1:n] = BOS, hypothesis.tokens[: n - 1]
            rows.append(row)
            lengths.append(n)
    per_example = len(hypotheses[0])
    tiled = np.repeat(src, per_example, axis=0)
    flat = traces.trace_teacher_forced(model, tiled, np.stack(rows), lengths=lengths)
    return [flat[i : i + per_example] for i in range(0, len(flat), per_example)]


def _assert_same(got: traces.Trace, want: traces.Trace, atol: float = 1e-5) -> None:
    assert [(r.name, r.kind, r.layer, r.heads) for r in got] == [
        (r.name, r.kind, r.layer, r.heads) for r in want
    ]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g.query_positions, w.query_positions, err_msg=g.name)
        np.testing.assert_array_equal(g.key_positions, w.key_positions, err_msg=g.name)
        np.testing.assert_array_equal(g.mask, w.mask, err_msg=g.name)
        np.testing.assert_allclose(g.weights, w.weights, atol=atol, rtol=0, err_msg=g.name)
        if w.key_indices is None:
            assert g.key_indices is None
        else:
            np.testing.assert_array_equal(g.key_indices, w.key_indices, err_msg=g.name)
    assert sorted(got.extras) == sorted(want.extras)
    for key, value in want.extras.items():
        np.testing.assert_allclose(got.extras[key], value, atol=atol, err_msg=key)


@pytest.mark.parametrize("name", list(SECTIONS))
def test_beam_search_traces_equal_teacher_forced_reruns_of_each_hypothesis(models, name):
    model = models(name)
    src = _source(name)
    hypotheses = traces.trace_beam_search(
        model, src, beam_size=3, num_return=2, max_length=MAX_LENGTH, min_length=1
    )
    assert [len(example) for example in hypotheses] == [2, 2]
    reruns = _rerun(model, src, hypotheses)
    for example, reference in zip(hypotheses, reruns, strict=True):
        for hypothesis, want in zip(example, reference, strict=True):
            assert len(hypothesis.trace) > 0
            _assert_same(hypothesis.trace, want)
    # Every step of every hypothesis is a query of its decoder maps; masked keys weigh 0.
    for example in hypotheses:
        for hypothesis in example:
            for record in hypothesis.trace:
                if record.kind != "encoder-self":
                    assert len(record.query_positions) == len(hypothesis.tokens)
                assert np.all(record.weights[..., ~record.mask] == 0)


@pytest.mark.parametrize(
    "section, windowed",
    [
        (
            dict(
                name="rnn",
                preset="tiny",
                variant="luong",
                attention=dict(local="local_m", window=1),
            ),
            ("cross",),
        ),
        (
            dict(name="transformer", preset="tiny", attention=dict(local="local_m", window=1)),
            ("encoder-self", "decoder-self"),  # its cross-attention sees the whole source
        ),
    ],
    ids=["rnn-luong-local_m", "transformer-local_m"],
)
def test_local_windows_are_the_recorded_masks(section, windowed):
    model = _build(section)
    tgt_in = np.array([[BOS, 4, 5, 6, 7], [BOS, 7, 8, 0, 0]], np.int32)
    for trace in traces.trace_teacher_forced(model, SRC, tgt_in):
        assert set(windowed) <= set(trace.kinds)
        for record in trace:
            offset = record.key_positions[None, :] - record.query_positions[:, None]
            window = np.abs(offset) <= 1  # Luong's local-m: p_t = t; the Transformer's encoder
            if record.kind == "decoder-self":
                window = (offset <= 0) & (offset >= -1)  # causal: the token and the one before
            elif record.kind not in windowed:
                window = np.ones_like(window)
            np.testing.assert_array_equal(record.mask, window, err_msg=record.name)
            # The mask is exactly where the softmax put weight.
            np.testing.assert_array_equal(
                record.weights > 0,
                np.broadcast_to(record.mask, record.weights.shape),
                err_msg=record.name,
            )


def test_local_p_records_the_window_around_its_predicted_centre(models):
    model = models("rnn-luong-local_p")
    tgt_in = np.array([[BOS, 4, 5, 6, 7], [BOS, 7, 8, 0, 0]], np.int32)
    for row, trace in enumerate(traces.trace_teacher_forced(model, SRC, tgt_in)):
        record = trace["decoder/attention"]
        centers = trace.extras["decoder/attention_center"]
        real = int(np.sum(SRC[row] != 0))
        assert centers.shape == (len(record.query_positions),)
        assert np.all((centers >= 0) & (centers <= real))  # p_t = S sigmoid(...), eq. 9
        distance = np.abs(record.key_positions[None, :] - centers[:, None])
        np.testing.assert_array_equal(record.mask, distance <= 1)  # window D = 1
        # A window of 2D + 1 = 3 at most: the mask is not the whole source...
        assert record.mask.sum(axis=1).max() <= 3 < len(record.key_positions) or real <= 3
        # ...and it is exactly where the (softmax x Gaussian) weights are non-zero.
        np.testing.assert_array_equal(record.weights > 0, record.mask)


def test_transformer_records_have_kinds_positions_and_masks(models):
    model = models("transformer")
    # Shaped as the reruns of the beam search test ([4, MAX_LENGTH]): compiled once.
    tgt_in = np.zeros((4, MAX_LENGTH), np.int32)
    tgt_in[0, :4], tgt_in[2, :2] = [BOS, 4, 5, 6], [BOS, 7]
    first, _, second, _ = traces.trace_teacher_forced(model, np.repeat(SRC, 2, axis=0), tgt_in)
    assert first.kinds == ("encoder-self", "decoder-self", "cross")
    assert first.layers("cross") == (0, 1) and second.layers("encoder-self") == (0, 1)
    cross = second.record("cross", 1)
    assert cross.heads == (0, 1) and cross.weights.shape == (2, 2, 3)
    np.testing.assert_array_equal(cross.key_positions, [0, 1, 2])  # padding left out
    np.testing.assert_allclose(cross.weights.sum(-1), 1.0, atol=1e-5)
    self_attention = first.record("decoder-self", 0)
    np.testing.assert_array_equal(self_attention.mask, np.tril(np.ones((4, 4), bool)))
    assert np.all(self_attention.weights[:, ~self_attention.mask] == 0)
    assert first["encoder/layer_1/self_attention"].weights.shape == (2, 6, 6)
    step = cross.at_step(1)
    assert step.step == 1 and step.weights.shape == (2, 1, 3)
    with pytest.raises(KeyError, match="no 'multi-step'"):
        first.record("multi-step")


def test_greedy_search_traces_with_the_alignment(models):
    model = models("transformer")
    result = decoding.greedy_search(
        model, SRC, max_length=MAX_LENGTH, return_weights=True, trace=TraceSelection()
    )
    # 'alignment' is still the last layer's cross-attention averaged over heads.
    cross = result.traces.steps["decoder/layer_1/cross_attention"]["weights"]
    np.testing.assert_allclose(result.alignments, cross.mean(axis=2), atol=1e-6)
    assert sorted(result.traces.source) == [
        "encoder/layer_0/self_attention",
        "encoder/layer_1/self_attention",
    ]
    greedy = traces.traces_from_search(model, SRC, result)
    assert [len(example) for example in greedy] == [1, 1]
    # Each hypothesis twice: the reruns of the beam search test's shapes, compiled once.
    reruns = _rerun(model, SRC, [example * 2 for example in greedy])
    for (hypothesis,), (want, _) in zip(greedy, reruns, strict=True):
        _assert_same(hypothesis.trace, want)


def test_trace_selection_is_checked():
    assert TraceSelection(layers=[0, 1], kinds="cross").kinds == ("cross",)
    with pytest.raises(ValueError, match="top_k"):
        TraceSelection(top_k=0)
    with pytest.raises(ValueError, match="unknown kinds"):
        TraceSelection(kinds=("decoder",))
    with pytest.raises(ValueError, match="ints >= 0"):
        TraceSelection(heads=(-1,))


def test_top_k_of_a_long_source_equals_the_top_k_of_the_full_map(models):
    model = models("transformer")  # sinusoidal positions: any source length
    rng = np.random.default_rng(1)
    src = rng.integers(3, VOCAB, (1, 1024)).astype(np.int32)
    src[0, 1000:] = 0  # padding: never among the top-k
    selection = TraceSelection(layers=(1,), top_k=8)
    # In the compiled beam search the top-k are chosen per step, before the search keeps them.
    ((hypothesis, _),) = traces.trace_beam_search(
        model, src, beam_size=2, num_return=2, max_length=3, selection=selection
    )
    n = len(hypothesis.tokens)
    tgt_in = np.array([[BOS, *hypothesis.tokens[: n - 1]]], np.int32)
    (top,) = traces.trace_teacher_forced(model, src, tgt_in, selection=selection)
    _assert_same(hypothesis.trace, top)
    (full,) = traces.trace_teacher_forced(model, src, tgt_in, selection=TraceSelection(layers=(1,)))
    assert [r.name for r in top] == [
        "encoder/layer_1/self_attention",
        "decoder/layer_1/self_attention",
        "decoder/layer_1/cross_attention",
    ]
    assert top.record("encoder-self", 1).weights.shape == (2, 1000, 8)
    assert top.record("cross", 1).key_indices.shape == (2, n, 8)
    # Decoder self-attention has n <= 3 keys: all of them, -1 where the step cannot see.
    self_attention = top.record("decoder-self", 1)
    assert self_attention.weights.shape == (2, n, n)
    assert np.all(self_attention.key_indices[:, 0, 1:] == -1)
    for got, want in zip(top, full, strict=True):
        np.testing.assert_allclose(got.dense(), np.where(got.dense() > 0, want.weights, 0))
        np.testing.assert_allclose(
            np.sort(got.dense(), -1)[..., -8:], np.sort(want.weights, -1)[..., -8:], atol=1e-6
        )
        if got.kind != "decoder-self":
            order = np.argsort(-want.weights, axis=-1, kind="stable")[..., :8]
            np.testing.assert_array_equal(got.key_indices, want.key_positions[order])


def test_chunked_layers_keep_their_kernel_and_the_traced_layer_matches(models, monkeypatch):
    reference = models("transformer")
    chunked = _build(
        dict(name="transformer", preset="tiny", attention=dict(implementation="chunked"))
    )
    nnx.update(chunked, nnx.state(reference))  # the same parameters
    calls = []
    original = attention_module.chunked_attention

    def counting(*args, **kwargs):
        calls.append(kwargs["spec"])
        return original(*args, **kwargs)

    monkeypatch.setattr(attention_module, "chunked_attention", counting)
    kinds = ("encoder-self", "cross")
    tgt_in = np.array([[BOS, 4, 5, 6], [BOS, 7, 8, 0]], np.int32)
    got = traces.trace_teacher_forced(
        chunked, SRC, tgt_in, selection=TraceSelection(layers=(1,), kinds=kinds, heads=(1,))
    )
    # Two encoder layers, two decoder self- and two cross-attentions; two are traced.
    assert len(calls) == 4
    want = traces.trace_teacher_forced(
        reference, SRC, tgt_in, selection=TraceSelection(layers=(1,), kinds=kinds)
    )
    for g, w in zip(got, want, strict=True):
        assert [r.name for r in g] == [
            "encoder/layer_1/self_attention",
            "decoder/layer_1/cross_attention",
        ]
        for got_record, want_record in zip(g, w, strict=True):
            assert got_record.heads == (1,) and want_record.heads == (0, 1)
            np.testing.assert_array_equal(got_record.mask, want_record.mask)
            np.testing.assert_array_equal(got_record.key_positions, want_record.key_positions)
            np.testing.assert_allclose(got_record.weights, want_record.weights[1:], atol=1e-5)
