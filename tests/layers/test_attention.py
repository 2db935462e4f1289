"""Tests of `attnx.layers.attention.attention` over every implementation.

Each implementation is compared with `einsum_attention` below, attention written
out from its definition (softmax(q k^T * scale + bias) v with masked entries
removed, Vaswani et al. 2017 eq. 1) and independent of attnx, and with
`jax.nn.dot_product_attention` where the two define the same thing.

The chunked implementation runs with tiny chunks (8 queries x 16 keys) on
lengths that are not multiples of them (37, 21), so the blocking, the online
softmax across blocks, the skipped blocks and the padded tails are all exercised.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnx.layers import chunked
from attnx.layers.attention import IMPLEMENTATIONS, attention, make_mask_spec, select_implementation

BATCH, LENGTH, HEADS, HEAD_DIM = 2, 37, 4, 8
CROSS_Q_LENGTH, VALUE_DIM = 21, 6
SCALE = 1.0 / math.sqrt(HEAD_DIM)
TOL = dict(atol=1e-5, rtol=1e-5)
# Splash runs in Pallas interpret mode on CPU: seconds per call, so fewer cases.
SPLASH_CASES = ("causal_segments_local", "none")


@pytest.fixture(scope="module", autouse=True)
def small_chunks():
    """`attention(implementation='chunked')` uses its default chunk sizes: make them tiny."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked, "DEFAULT_QUERY_CHUNK_SIZE", 8)
        patch.setattr(chunked, "DEFAULT_KEY_CHUNK_SIZE", 16)
        yield


def einsum_attention(query, key, value, mask=None, bias=None, scale=SCALE, keep=None):
    """softmax(q k^T * scale + bias) v, written out; rows with no allowed key give 0.

    `keep` (optional) multiplies the normalised weights (dropout with a known mask).
    Returns `(output [b, t, n, hv], weights [b, n, t, s])`.
    """
    group = query.shape[2] // key.shape[2]
    # Query head n reads key/value head n // group.
    key = jnp.repeat(key, group, axis=2)
    value = jnp.repeat(value, group, axis=2)
    scores = jnp.einsum("btnh,bsnh->bnts", query, key) * scale
    if bias is not None:
        scores = scores + bias
    allowed = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask, scores.shape)
    scores = jnp.where(allowed, scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    exp = jnp.where(allowed, jnp.exp(scores - row_max), 0.0)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    weights = exp / jnp.where(total > 0, total, 1.0)
    attended = weights if keep is None else weights * keep
    return jnp.einsum("bnts,bsnh->btnh", attended, value), weights


# ----------------------------------------------------------------------------------------
# Inputs and masks, built by hand in NumPy.


def causal(t, s):
    return np.tril(np.ones((t, s), bool))[None, None]


def local(t, s, left, right):
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    return ((j >= i - left) & (j <= i + right))[None, None]


def same_segment(q_ids, kv_ids):
    real = (q_ids > 0)[:, :, None] & (kv_ids > 0)[:, None, :]
    return ((q_ids[:, :, None] == kv_ids[:, None, :]) & real)[:, None]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    # Packed sequences; segment 0 is padding (rows with no allowed key).
    segments = np.array([[1] * 12 + [2] * 15 + [3] * 6 + [0] * 4, [1] * 30 + [0] * 7])
    valid = np.arange(LENGTH)[None, :] < np.array([[LENGTH], [29]])
    padding = valid[:, None, :, None] & valid[:, None, None, :]
    per_head = rng.random((BATCH, HEADS, LENGTH, LENGTH)) < 0.7
    per_head[0, 1, 5] = False  # one empty row
    bias = normal(1, HEADS, LENGTH, LENGTH)
    return dict(
        query=normal(BATCH, LENGTH, HEADS, HEAD_DIM),
        key=normal(BATCH, LENGTH, HEADS, HEAD_DIM),
        value=normal(BATCH, LENGTH, HEADS, HEAD_DIM),
        value_narrow=normal(BATCH, LENGTH, HEADS, VALUE_DIM),
        cross_query=normal(BATCH, CROSS_Q_LENGTH, HEADS, HEAD_DIM),
        cotangent=normal(BATCH, LENGTH, HEADS, HEAD_DIM),
        segments=jnp.asarray(segments),
        segment_mask=same_segment(segments, segments),
        padding=jnp.asarray(padding),
        key_padding=jnp.asarray(valid[:, None, None, :]),
        valid=valid,
        per_head=jnp.asarray(per_head),
        bias=bias,
        key_bias=normal(BATCH, 1, 1, LENGTH),
    )


def mask_case(name, d):
    """`(attention keyword arguments, the same mask written out, bias)` of a named case."""
    t = s = LENGTH
    if name == "none":
        return {}, None, None
    if name == "padding":
        return dict(mask=d["padding"]), d["padding"], None
    if name == "causal":
        return dict(is_causal=True), causal(t, s), None
    if name == "segments":
        return dict(segment_ids=d["segments"]), d["segment_mask"], None
    if name == "local":
        return dict(local_window=(3, 1)), local(t, s, 3, 1), None
    if name == "causal_segments_local":
        kwargs = dict(is_causal=True, segment_ids=d["segments"], local_window=9)
        return kwargs, causal(t, s) & d["segment_mask"] & local(t, s, 9, 9), None
    if name == "causal_local_padding":
        kwargs = dict(is_causal=True, local_window=(5, 0), mask=d["padding"])
        return kwargs, causal(t, s) & local(t, s, 5, 0) & d["padding"], None
    if name == "segments_causal_bias":
        kwargs = dict(is_causal=True, segment_ids=d["segments"], bias=d["bias"])
        return kwargs, causal(t, s) & d["segment_mask"], d["bias"]
    if name == "per_head_mask_key_bias":
        kwargs = dict(mask=d["per_head"], bias=d["key_bias"])
        return kwargs, d["per_head"], d["key_bias"]
    raise KeyError(name)


MASK_CASES = (
    "none",
    "padding",
    "causal",
    "segments",
    "local",
    "causal_segments_local",
    "causal_local_padding",
    "segments_causal_bias",
    "per_head_mask_key_bias",
)


def implementation_cases():
    for implementation in ("reference", "xla", "chunked"):
        for case in MASK_CASES:
            yield implementation, case
    for case in SPLASH_CASES:
        yield "splash", case


# ----------------------------------------------------------------------------------------
# Every implementation equals the written-out formula.


@pytest.mark.parametrize("implementation,case", list(implementation_cases()))
def test_matches_einsum_reference(data, implementation, case):
    kwargs, mask, bias = mask_case(case, data)
    kv_heads = 2  # grouped-query attention throughout: 4 query heads over 2 kv heads
    key, value = data["key"][:, :, :kv_heads], data["value"][:, :, :kv_heads]
    output = attention(data["query"], key, value, implementation=implementation, **kwargs)
    expected, _ = einsum_attention(data["query"], key, value, mask, bias)
    np.testing.assert_allclose(output, expected, **TOL)


@pytest.mark.parametrize("implementation", ["reference", "xla", "chunked", "splash"])
@pytest.mark.parametrize("kv_heads", [HEADS, 1], ids=["mha", "mqa"])
def test_head_layouts(data, implementation, kv_heads):
    if implementation == "splash" and kv_heads == HEADS:
        pytest.skip("splash: MHA is covered by the GQA cases; interpret mode is slow")
    kwargs, mask, _ = mask_case("causal_segments_local", data)
    key, value = data["key"][:, :, :kv_heads], data["value"][:, :, :kv_heads]
    output = attention(data["query"], key, value, implementation=implementation, **kwargs)
    expected, _ = einsum_attention(data["query"], key, value, mask)
    np.testing.assert_allclose(output, expected, **TOL)


@pytest.mark.parametrize("implementation", ["reference", "chunked", "splash"])
def test_cross_attention_with_value_dim(data, implementation):
    """q_length != kv_length, value_dim != head_dim, padded keys."""
    query, key, value = data["cross_query"], data["key"][:, :, :2], data["value_narrow"][:, :, :2]
    kv_ids = jnp.asarray(data["valid"], jnp.int32)
    q_ids = jnp.ones((BATCH, CROSS_Q_LENGTH), jnp.int32)
    output = attention(
        query, key, value, segment_ids=(q_ids, kv_ids), implementation=implementation
    )
    expected, _ = einsum_attention(query, key, value, data["key_padding"])
    assert output.shape == (BATCH, CROSS_Q_LENGTH, HEADS, VALUE_DIM)
    np.testing.assert_allclose(output, expected, **TOL)


def test_splash_on_lengths_that_need_no_padding():
    # Lengths that are multiples of 128 take splash's path without segment ids.
    rng = np.random.default_rng(1)
    query, key, value = (
        jnp.asarray(rng.normal(size=(1, 128, h, 8)), jnp.float32) for h in (2, 1, 1)
    )
    output = attention(
        query, key, value, is_causal=True, local_window=(20, 0), implementation="splash"
    )
    expected, _ = einsum_attention(query, key, value, causal(128, 128) & local(128, 128, 20, 0))
    np.testing.assert_allclose(output, expected, **TOL)


def test_xla_rejects_value_dim_other_than_head_dim(data):
    with pytest.raises(ValueError, match="needs value_dim == head_dim"):
        attention(data["query"], data["key"], data["value_narrow"], implementation="xla")


JAX_CASES = {
    # name: (attnx keyword arguments, jax.nn.dot_product_attention keyword arguments)
    "none": ({}, {}),
    "causal": (dict(is_causal=True), dict(is_causal=True)),
    "local": (dict(local_window=(3, 1)), dict(local_window_size=(3, 1))),
    "causal_bias": (dict(is_causal=True, bias="bias"), dict(is_causal=True, bias="bias")),
    "key_lengths": (dict(mask="key_padding"), dict(key_value_seq_lengths=np.array([37, 29]))),
}


@pytest.mark.parametrize("implementation", ["reference", "xla", "chunked", "splash"])
@pytest.mark.parametrize("case", list(JAX_CASES))
def test_matches_jax_dot_product_attention(data, implementation, case):
    # Strings name arrays of the `data` fixture.
    resolve = lambda kwargs: {k: data[v] if isinstance(v, str) else v for k, v in kwargs.items()}
    ours, theirs = (resolve(kwargs) for kwargs in JAX_CASES[case])
    if implementation == "splash" and ("bias" in ours or "mask" in ours or case != "causal"):
        pytest.skip("splash: dense masks and bias are not splash's; interpret mode is slow")
    query, key, value = data["query"], data["key"][:, :, :2], data["value"][:, :, :2]
    output = attention(query, key, value, implementation=implementation, **ours)
    expected = jax.nn.dot_product_attention(query, key, value, implementation="xla", **theirs)
    np.testing.assert_allclose(output, expected, **TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_einsum_reference(data):
    cast = lambda x: x.astype(jnp.bfloat16)
    query, key, value = cast(data["query"]), cast(data["key"]), cast(data["value"])
    output = attention(query, key, value, is_causal=True, implementation="cudnn")
    expected, _ = einsum_attention(query, key, value, causal(LENGTH, LENGTH))
    np.testing.assert_allclose(output.astype(jnp.float32), expected, atol=2e-2)


# ----------------------------------------------------------------------------------------
# Rows with no allowed key, and gradients.


@pytest.mark.parametrize("implementation", ["reference", "xla", "chunked", "splash"])
def test_empty_rows_give_zero_output_and_finite_gradients(data, implementation):
    # Segment 0 (padding) attends nothing; the last rows of batch 0 and 1 are empty.
    kwargs, mask, _ = mask_case("causal_segments_local", data)
    empty = ~np.asarray(jnp.broadcast_to(mask, (BATCH, 1, LENGTH, LENGTH))).any(-1)[:, 0]
    assert empty.sum() == 11

    def loss(query, key, value):
        output = attention(query, key, value, implementation=implementation, **kwargs)
        return jnp.sum(output * data["cotangent"]), output

    args = data["query"], data["key"][:, :, :2], data["value"][:, :, :2]
    grads, output = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
    np.testing.assert_array_equal(np.asarray(output)[empty], 0.0)
    expected = jax.jit(
        jax.grad(
            lambda *a: jnp.sum(einsum_attention(*a, mask)[0] * data["cotangent"]),
            argnums=(0, 1, 2),
        )
    )(*args)
    for grad, want in zip(grads, expected, strict=True):
        assert np.all(np.isfinite(grad))
        np.testing.assert_allclose(grad, want, **TOL)
    np.testing.assert_array_equal(np.asarray(grads[0])[empty], 0.0)


def test_reference_weights_of_empty_rows_are_zero(data):
    kwargs, mask, _ = mask_case("causal_segments_local", data)
    output, weights = attention(
        data["query"], data["key"], data["value"], return_weights=True, **kwargs
    )
    _, expected = einsum_attention(data["query"], data["key"], data["value"], mask)
    np.testing.assert_allclose(weights, expected, **TOL)
    sums = np.asarray(weights).sum(-1)
    empty = ~np.asarray(jnp.broadcast_to(mask, weights.shape)).any(-1)
    np.testing.assert_array_equal(sums[empty], 0.0)
    np.testing.assert_allclose(sums[~empty], 1.0, atol=1e-6)


def test_bias_of_minus_infinity_empties_a_row(data):
    bias = jnp.zeros((1, 1, LENGTH, LENGTH)).at[..., 3, :].set(-jnp.inf)
    for implementation in ("reference", "chunked"):
        output = attention(
            data["query"], data["key"], data["value"], bias=bias, implementation=implementation
        )
        np.testing.assert_array_equal(np.asarray(output)[:, 3], 0.0)
        assert np.all(np.isfinite(output))


@pytest.mark.parametrize("case", ["segments_causal_bias", "per_head_mask_key_bias"])
def test_chunked_gradients_match_einsum_reference(data, case):
    kwargs, mask, bias = mask_case(case, data)
    kwargs.pop("bias", None)
    query, key, value = data["query"], data["key"][:, :, :2], data["value_narrow"][:, :, :2]
    bias = data["bias"] if bias is None else bias

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * data["cotangent"][..., :VALUE_DIM])

    chunked_fn = lambda q, k, v, b: attention(q, k, v, bias=b, implementation="chunked", **kwargs)
    einsum_fn = lambda q, k, v, b: einsum_attention(q, k, v, mask, b)[0]
    grads = jax.jit(jax.grad(loss(chunked_fn), argnums=(0, 1, 2, 3)))(query, key, value, bias)
    expected = jax.grad(loss(einsum_fn), argnums=(0, 1, 2, 3))(query, key, value, bias)
    for name, grad, want in zip("qkvb", grads, expected, strict=True):
        assert grad.shape == want.shape, name
        np.testing.assert_allclose(grad, want, **TOL, err_msg=f"d{name}")


@pytest.mark.parametrize("chunks", [(1, 5), (16, 8), (64, 100)])
def test_chunk_sizes_do_not_change_the_result(data, chunks):
    kwargs, mask, bias = mask_case("segments_causal_bias", data)
    spec = make_mask_spec(
        data["query"],
        data["key"],
        mask=None,
        is_causal=True,
        segment_ids=kwargs["segment_ids"],
        local_window=None,
    )
    output = chunked.chunked_attention(
        data["query"],
        data["key"],
        data["value"],
        spec=spec,
        bias=bias,
        scale=SCALE,
        dropout_rate=0.0,
        dropout_rng=None,
        query_chunk_size=chunks[0],
        key_chunk_size=chunks[1],
    )
    expected, _ = einsum_attention(data["query"], data["key"], data["value"], mask, bias)
    np.testing.assert_allclose(output, expected, **TOL)


# ----------------------------------------------------------------------------------------
# Dropout in the chunked implementation.


def test_chunked_dropout_rate_zero_is_no_dropout(data):
    args = data["query"], data["key"], data["value"]
    plain = attention(*args, is_causal=True, implementation="chunked")
    zero = attention(
        *args,
        is_causal=True,
        implementation="chunked",
        dropout_rate=0.0,
        dropout_rng=jax.random.key(3),
    )
    np.testing.assert_array_equal(plain, zero)


def test_chunked_dropout_is_inverted_dropout_with_a_consistent_backward(data):
    rate, rng = 0.3, jax.random.key(7)
    kwargs, mask, _ = mask_case("causal_segments_local", data)
    query, key, value = data["query"], data["key"][:, :, :2], data["value"][:, :, :2]
    ct = data["cotangent"]

    @jax.jit
    def loss_and_grads(query, key, value):
        # One-hot values appended to the real ones read off the dropped-out weights
        # (the keep-mask does not depend on the value width).
        one_hot = jnp.broadcast_to(jnp.eye(LENGTH)[None, :, None], (BATCH, LENGTH, 2, LENGTH))

        def loss(query, key, value):
            out = attention(
                query,
                key,
                jnp.concatenate([value, one_hot], axis=-1),
                dropout_rate=rate,
                dropout_rng=rng,
                implementation="chunked",
                **kwargs,
            )
            dropped = jnp.transpose(out[..., HEAD_DIM:], (0, 2, 1, 3))  # [b, n, t, s]
            return jnp.sum(out[..., :HEAD_DIM] * ct), dropped

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(query, key, value)

    (value_loss, dropped), grads = loss_and_grads(query, key, value)
    dropped = np.asarray(dropped)
    _, weights = einsum_attention(query, key, value, mask)
    allowed = np.asarray(weights) > 0
    kept = dropped != 0
    # Kept weights are scaled by 1 / (1 - rate); about `rate` of them are dropped.
    np.testing.assert_allclose(dropped[kept], np.asarray(weights)[kept] / (1 - rate), **TOL)
    assert not np.any(kept & ~allowed)
    assert abs(1.0 - kept[allowed].mean() - rate) < 0.04

    # Forward and gradients equal the written-out formula with the same keep-mask.
    keep = jnp.asarray(kept / (1 - rate), jnp.float32)
    theirs = lambda *a: jnp.sum(einsum_attention(*a, mask, keep=keep)[0] * ct)
    np.testing.assert_allclose(value_loss, theirs(query, key, value), **TOL)
    expected = jax.grad(theirs, argnums=(0, 1, 2))(query, key, value)
    for grad, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad, want, **TOL)


def test_chunked_dropout_averages_to_no_dropout(data):
    # Every batch element draws its own keep-mask: 2000 copies of one example are 2000
    # dropout samples (cheaper to compile than a vmap over keys).
    copies = 2000
    query, key, value = (
        jnp.broadcast_to(x[:1, :16, :2], (copies, 16, 2, HEAD_DIM))
        for x in (data["query"], data["key"], data["value"])
    )
    key, value = key[:, :, :1], value[:, :, :1]
    samples = attention(
        query, key, value, dropout_rate=0.5, dropout_rng=jax.random.key(0), implementation="chunked"
    )
    expected = attention(query[:1], key[:1], value[:1], implementation="chunked")[0]
    # One sample is far off; the mean of 2000 is close (its standard error is ~0.01).
    assert np.abs(samples[0] - expected).max() > 0.2
    np.testing.assert_allclose(samples.mean(0), expected, atol=0.05)
    assert len({np.asarray(s).tobytes() for s in samples[:10]}) == 10


# ----------------------------------------------------------------------------------------
# Weights, dispatch and errors.


def test_return_weights_shapes(data):
    query, key, value = data["cross_query"], data["key"][:, :, :1], data["value_narrow"][:, :, :1]
    output, weights = attention(query, key, value, return_weights=True)
    assert output.shape == (BATCH, CROSS_Q_LENGTH, HEADS, VALUE_DIM)
    assert weights.shape == (BATCH, HEADS, CROSS_Q_LENGTH, LENGTH)
    expected_out, expected_weights = einsum_attention(query, key, value)
    np.testing.assert_allclose(output, expected_out, **TOL)
    np.testing.assert_allclose(weights, expected_weights, **TOL)
    # implementation=None without weights picks a path that returns the output alone.
    automatic = attention(query, key, value)
    assert isinstance(automatic, jax.Array)
    np.testing.assert_allclose(automatic, expected_out, **TOL)


@pytest.mark.parametrize("implementation", ["xla", "chunked", "splash"])
def test_weights_from_a_path_that_cannot_return_them(data, implementation):
    with pytest.raises(ValueError, match="cannot return weights"):
        attention(
            data["query"],
            data["key"],
            data["value"],
            implementation=implementation,
            return_weights=True,
        )


def test_sparse_normalizer_only_on_reference(data):
    args = data["query"], data["key"], data["value"]
    with pytest.raises(ValueError, match="only the softmax"):
        attention(*args, normalizer="sparsemax", implementation="chunked")
    # implementation=None picks 'reference' for sparsemax: some weights are exactly zero.
    _, weights = attention(*args, normalizer="sparsemax", return_weights=True)
    assert np.any(np.asarray(weights) == 0.0)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize(
    "args,message",
    [
        (dict(query=(2, 5, 4)), "must be \\[batch, length, heads, head_dim\\]"),
        (dict(key=(2, 7, 2, 3)), "head_dim"),
        (dict(key=(2, 7, 3, 8), value=(2, 7, 3, 8)), "not a multiple of num_kv_heads"),
        (dict(value=(2, 6, 2, 8)), "differ in batch, length or heads"),
        (dict(key=(3, 7, 2, 8), value=(3, 7, 2, 8)), "batch"),
        (dict(mask=np.ones((2, 1, 5, 7), np.float32)), "mask must be boolean"),
        (dict(mask=np.ones((2, 1, 5, 6), bool)), "mask of shape"),
        (dict(bias=np.zeros((2, 3, 5, 7), np.float32)), "bias of shape"),
        (dict(implementation="flash"), "unknown implementation 'flash'"),
        (dict(dropout_rate=0.1), "needs a dropout_rng"),
        (dict(dropout_rate=1.0), "dropout_rate must be in"),
        (dict(segment_ids=np.ones((2, 6), np.int32)), "segment ids"),
    ],
)
def test_bad_arguments_raise_clear_errors(args, message):
    shapes = dict(query=(2, 5, 4, 8), key=(2, 7, 2, 8), value=(2, 7, 2, 8))
    arrays = {name: jnp.ones(args.pop(name, shape)) for name, shape in shapes.items()}
    with pytest.raises(ValueError, match=message):
        attention(arrays["query"], arrays["key"], arrays["value"], **args)


def test_splash_rejects_dense_mask_and_bias(data):
    args = data["query"], data["key"], data["value"]
    with pytest.raises(ValueError, match="only structured masks"):
        attention(*args, mask=data["padding"], implementation="splash")
    with pytest.raises(ValueError, match="only structured masks"):
        attention(*args, bias=data["bias"], implementation="splash")


def test_select_implementation():
    def select(q_len=256, kv_len=256, dtype=jnp.float32, value_dim=64, backend="cpu", **kwargs):
        query = jax.ShapeDtypeStruct((2, q_len, 8, 64), dtype)
        key = jax.ShapeDtypeStruct((2, kv_len, 8, 64), dtype)
        value = jax.ShapeDtypeStruct((2, kv_len, 8, value_dim), dtype)
        spec = make_mask_spec(
            query,
            key,
            mask=kwargs.pop("mask", None),
            is_causal=True,
            segment_ids=None,
            local_window=None,
        )
        options = dict(bias=None, normalizer="softmax", dropout_rate=0.0, return_weights=False)
        options.update(kwargs)
        return select_implementation(query, key, value, spec=spec, backend=backend, **options)

    for backend in ("cpu", "gpu", "tpu"):
        assert select(backend=backend, return_weights=True) == "reference"
        assert select(backend=backend, normalizer="sparsemax") == "reference"
        assert select(backend=backend, normalizer="entmax15") == "reference"
    assert select(backend="tpu") == "splash"
    assert select(backend="tpu", q_len=200) != "splash"
    assert select(backend="tpu", bias=jnp.zeros((1, 1, 256, 256))) != "splash"
    assert select(backend="gpu", dtype=jnp.bfloat16) == "cudnn"
    assert select(backend="gpu") == "xla"
    assert select(backend="cpu") == "xla"
    assert select(backend="cpu", q_len=4096, kv_len=4096) == "chunked"
    assert select(backend="cpu", dropout_rate=0.1) == "reference"
    assert select(backend="cpu", value_dim=32) == "reference"
    for implementation in (select(backend=b) for b in ("cpu", "gpu", "tpu")):
        assert implementation in IMPLEMENTATIONS
