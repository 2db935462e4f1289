"""Greedy search, beam search and sampling over any attnx seq2seq model.

Every search runs on the one interface of the attnx models (see `attnx.models`):

  encoded = model.encode(src, train=False)            # pytree, leading batch axis
  model.init_cache(encoded, max_length)               # all decoding state in nnx.Cache
  logits[, weights] = model.decode_step(tokens[, return_weights=True])
                                                      # [b, 1] int32 -> [b, vocab]

Token conventions: pad=0 (never generated: outputs are padded with it), bos
(fed first), eos (ends a hypothesis). A hypothesis's *length* counts its
tokens including the final eos; a hypothesis that reaches the maximum length
without eos is complete too (marked `finished=False`).

The whole search is one `jax.jit`-compiled function of the model's state: the
model goes in as `nnx.split(model)` (graphdef static, state traced), so new
parameters of the same shapes reuse the compiled search. The caller's model is
never mutated (the search works on a copy merged inside the trace).

Beam search follows the batched formulation of the Flax WMT example / t5x
(fixed-size alive and finished pools, `lax.while_loop`, early stop once no
alive hypothesis can beat the finished ones) with fairseq's rule that a
hypothesis ending in eos joins the finished pool only if it ranks among the
top `beam_size` of the `2 * beam_size` candidates of its step, so a beam of one
is exactly greedy search when no length penalty is applied (alpha=0).

Length penalties (the score used to rank hypotheses is log P(y|x) / lp(|y|)):
  'gnmt':  lp(n) = ((5 + n) / 6) ** alpha      (Wu et al. 2016, eq. 14)
  'power': lp(n) = n ** alpha

Attention traces: with `trace=TraceSelection(...)` every search also carries
the selected entries of each step's `decode_step` weights (every layer, kind
and head by default, or only their `top_k` largest weights and key indices,
selected inside the compiled search so that only those leave the device),
reordered with the beams exactly like the 'alignment'; the encoder's weights,
which do not depend on the hypothesis, are computed once per source. They land
in `DecodeResult.traces`; `attnx.interpret.traces` turns them into typed records.
"""

import dataclasses
import functools
import inspect
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from attnx.decoding_traces import (  # noqa: F401  (re-exported: decoding.TraceSelection)
    ATTENTION_KINDS,
    SearchTraces,
    TraceSelection,
    attention_kind,
    select_weights,
    skip_unselected_layers,
)
from attnx.layers.source_cache import SourceCache

Array = jax.Array

PAD_ID = 0
LENGTH_PENALTIES = ("gnmt", "power")


@flax.struct.dataclass
class DecodeResult:
    """Output of a search. Greedy and sampling give `[b, ...]` fields; beam
    search adds a hypothesis axis after the batch: `[b, num_return, ...]`,
    best first.

    Attributes:
      sequences: int32 `[..., L]` generated tokens (no bos), 0 after the end.
      scores: float32 `[...]` ranking score: the length-normalised log-prob for
        beam search, the log-prob sum for greedy search and sampling.
      log_probs: float32 `[...]` sum of the model's log-probs of the tokens.
      lengths: int32 `[...]` number of tokens, eos included.
      finished: bool `[...]` True if the hypothesis ended with eos.
      alignments: float32 `[..., L, s]` the model's 'alignment' weights of each
        generated token (zero after the end), when asked; else None.
      traces: the attention weights selected by `trace=TraceSelection(...)`
        (`SearchTraces`), else None.
    """

    sequences: Array
    scores: Array
    log_probs: Array
    lengths: Array
    finished: Array
    alignments: Array | None = None
    traces: SearchTraces | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that changes the compiled program's structure."""

    buffer_length: int
    eos_id: int
    bos_id: int
    return_weights: bool
    beam_size: int = 1
    num_return: int = 1
    temperature_is_zero: bool = False
    trace: TraceSelection | None = None

    @property
    def recording(self) -> bool:
        """Whether each step's weights are carried (alignment or trace)."""
        return self.return_weights or self.trace is not None


def length_penalty(lengths: Array, kind: str | Array, alpha: Array | float) -> Array:
    """The divisor lp(n) of a hypothesis's log-prob: 'gnmt' ((5 + n) / 6)^alpha or 'power' n^alpha.

    `kind` may also be a traced boolean (True = 'gnmt'), so that one compiled
    search serves both.
    """
    if isinstance(kind, str):
        if kind not in LENGTH_PENALTIES:
            raise ValueError(
                f"length_penalty: kind must be one of {LENGTH_PENALTIES}, got {kind!r}"
            )
        kind = kind == "gnmt"
    lengths = jnp.asarray(lengths, jnp.float32)
    return jnp.where(kind, (5.0 + lengths) / 6.0, lengths) ** alpha


# -- argument checks and set-up (plain Python, before anything compiles) ------


def _check_model(model: Any) -> None:
    for name in ("encode", "init_cache", "decode_step"):
        if not callable(getattr(model, name, None)):
            raise TypeError(f"decoding: the model has no {name}() method (see attnx.models)")


def _resolve_lengths(
    src: Array, max_length: int | None, max_length_a: float, max_length_b: float | None
) -> tuple[int, float, float]:
    """Returns (static buffer length, a, b) with per-example limit clip(floor(a*len + b), 1, buffer)."""
    if src.ndim < 2:
        raise ValueError(f"decoding: src must have a batch axis and more, got shape {src.shape}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise ValueError(f"decoding: max_length must be a positive int, got {max_length!r}")
    if max_length_a == 0.0 and max_length_b is None:
        if max_length is None:
            raise ValueError("decoding: give max_length, or max_length_a/max_length_b")
        return max_length, 0.0, float(max_length)
    if not jnp.issubdtype(src.dtype, jnp.integer) or src.ndim != 2:
        raise ValueError(
            "decoding: max_length_a/max_length_b need token sources [b, s] (the source length "
            f"counts non-pad tokens); got src {src.dtype} {src.shape}; pass max_length instead"
        )
    b = 0.0 if max_length_b is None else float(max_length_b)
    buffer = max_length if max_length is not None else int(max_length_a * src.shape[1] + b)
    if buffer < 1:
        raise ValueError(
            f"decoding: max_length_a={max_length_a}, max_length_b={max_length_b} give a "
            f"maximum length {buffer} < 1 for the padded source length {src.shape[1]}"
        )
    return buffer, float(max_length_a), b


def _check_trace(trace: TraceSelection | None) -> TraceSelection | None:
    if trace is not None and not isinstance(trace, TraceSelection):
        raise TypeError(f"decoding: trace must be a TraceSelection or None, got {trace!r}")
    return trace


def _check_common(min_length: int, eos_id: int, bos_id: int) -> None:
    if min_length < 0:
        raise ValueError(f"decoding: min_length must be >= 0, got {min_length}")
    if PAD_ID in (eos_id, bos_id):
        raise ValueError(f"decoding: eos_id={eos_id} and bos_id={bos_id} must differ from pad=0")


# -- pieces traced inside the compiled searches --------------------------------


def _source_limits(src: Array, a: Array, b: Array, buffer: int) -> Array:
    """Per-example maximum output length `[b]` int32: clip(floor(a * src_len + b), 1, buffer)."""
    if jnp.issubdtype(src.dtype, jnp.integer) and src.ndim == 2:
        src_len = jnp.sum(src != PAD_ID, axis=1).astype(jnp.float32)
    else:  # images: only a fixed limit is allowed (a == 0, checked before tracing)
        src_len = jnp.zeros((src.shape[0],), jnp.float32)
    # The small epsilon keeps e.g. 1.2 * 5 + 3 = 8.9999995 in float32 at 9.
    limits = jnp.floor(a * src_len + b + 1e-4).astype(jnp.int32)
    return jnp.clip(limits, 1, buffer)


def traced_encode(model: Any, src: Array, selection: TraceSelection) -> tuple[Any, dict]:
    """`model.encode(src, train=False)` and its selected weights (`select_weights`;
    {} for an encoder without attention). Traced inside the caller's `jit`."""
    if "return_weights" not in inspect.signature(model.encode).parameters:
        return model.encode(src, train=False), {}
    encoded, weights = model.encode(src, train=False, return_weights=True)
    return encoded, select_weights(weights, selection, model, step=False)


def _encode(model, src, static: _Static):
    """`model.encode(src)`, and the encoder's selected weights when tracing (else None)."""
    if static.trace is None:
        return model.encode(src, train=False), None
    # The alignment may read any decoder layer: with it, only the encoder's are spared.
    stacks = ("encoder",) if static.return_weights else None
    skip_unselected_layers(model, static.trace, stacks=stacks)
    return traced_encode(model, src, static.trace)


def _start(graphdef, state, src, copies: int, static: _Static):
    """Merges the model, encodes, tiles by `copies`, creates the cache and splits it out.

    Returns (loop graphdef, cache, rest, the encoder's traced weights or None).
    """
    buffer = static.buffer_length
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off in every submodule that has a `deterministic` flag
    encoded, source = _encode(model, src, static)
    batch = src.shape[0]

    def tile(x):
        if x.ndim == 0 or x.shape[0] != batch:
            raise ValueError(
                f"decoding: every leaf of model.encode's output needs a leading batch axis "
                f"of {batch}, got a leaf of shape {x.shape}"
            )
        return jnp.repeat(x, copies, axis=0)

    encoded = jax.tree.map(tile, encoded)
    model.init_cache(encoded, buffer)
    loop_def, cache, rest = nnx.split(model, nnx.Cache, ...)
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if leaf.ndim > 0 and leaf.shape[0] != batch * copies:
            raise ValueError(
                f"decoding: nnx.Cache {jax.tree_util.keystr(path)} has shape {leaf.shape}; "
                f"cache arrays need a leading batch axis of {batch * copies} (or be 0-d)"
            )
    return loop_def, cache, rest, source


def _make_step(loop_def, rest, static: _Static):
    """Returns step(cache, tokens [n, 1]) -> (cache, log-probs [n, V] float32, carried).

    `carried` holds what each step records: 'alignment' `[n, s]` (return_weights)
    and 'trace' (`select_weights` of the step's weights); {} when nothing is asked.
    """

    def step(cache, tokens):
        model = nnx.merge(loop_def, cache, rest)
        carried = {}
        if static.recording:
            logits, weights = model.decode_step(tokens, return_weights=True)
            if static.return_weights:
                if "alignment" not in weights:
                    raise ValueError(
                        "decoding: return_weights needs an 'alignment' entry in decode_step's "
                        f"weights, got {sorted(weights)}"
                    )
                carried["alignment"] = weights["alignment"][:, 0].astype(jnp.float32)
            if static.trace is not None:
                carried["trace"] = select_weights(weights, static.trace, model, step=True)
        else:
            logits = model.decode_step(tokens)
        if logits.ndim != 2 or logits.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"decoding: decode_step must return logits [{tokens.shape[0]}, vocab], "
                f"got {logits.shape}"
            )
        return (
            nnx.state(model, nnx.Cache),
            jax.nn.log_softmax(logits.astype(jnp.float32)),
            carried,
        )

    return step


def _record_buffers(step, cache, n: int, bos_id: int, lead: tuple[int, ...], length: int):
    """Zero buffers `[*lead, length, ...]` for every leaf a step carries, found without running it."""
    tokens = jnp.full((n, 1), bos_id, jnp.int32)
    shapes = jax.eval_shape(lambda c: step(c, tokens)[2], cache)
    return jax.tree.map(lambda x: jnp.zeros((*lead, length, *x.shape[1:]), x.dtype), shapes)


def _traces(records: dict, source: dict | None) -> SearchTraces | None:
    return None if source is None else SearchTraces(records["trace"], source)


def _forbid(log_probs: Array, t: Array, min_length: Array, eos_id: int) -> Array:
    """Pad is never generated; eos not before `min_length` tokens. `log_probs` `[..., V]`."""
    vocab = jnp.arange(log_probs.shape[-1])
    forbidden = (vocab == PAD_ID) | ((vocab == eos_id) & (t < min_length))
    return jnp.where(forbidden, -jnp.inf, log_probs)


def _filter_logits(logits: Array, top_k: Array, top_p: Array) -> Array:
    """Top-k (Fan et al. 2018) then nucleus top-p (Holtzman et al. 2020) filtering of `[n, V]` logits.

    `top_k` (0 = off) and `top_p` (1 = off) are traced: new values do not recompile.
    """
    vocab = logits.shape[-1]
    descending = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = jax.lax.dynamic_index_in_dim(descending, k - 1, axis=1)
    logits = jnp.where(logits >= kth, logits, -jnp.inf)
    probs = jax.nn.softmax(logits)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # The nucleus: the most probable tokens until their mass reaches top_p (the top one always).
    kept = (mass_before < top_p) | (top_p >= 1.0)
    threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


# -- greedy search and sampling -----------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _sequential_search(graphdef, state, src, rng, dyn, static: _Static) -> DecodeResult:
    """One token per step per example: argmax (greedy) or a draw from the filtered distribution."""
    batch, length = src.shape[0], static.buffer_length
    limits = _source_limits(src, dyn["a"], dyn["b"], length)
    loop_def, cache, rest, source = _start(graphdef, state, src, 1, static)
    step = _make_step(loop_def, rest, static)
    records = _record_buffers(step, cache, batch, static.bos_id, (batch,), length)

    def choose(log_probs, t):
        if static.temperature_is_zero:
            return jnp.argmax(log_probs, axis=-1)
        # Log-probs are logits up to a per-row constant, so filtering and sampling them is the same.
        logits = _filter_logits(log_probs / dyn["temperature"], dyn["top_k"], dyn["top_p"])
        return jax.random.categorical(jax.random.fold_in(rng, t), logits, axis=-1)

    def body(carry):
        t, cache, seqs, total, lengths, ended, done, records = carry
        previous = jax.lax.dynamic_index_in_dim(seqs, jnp.maximum(t - 1, 0), 1, keepdims=False)
        tokens = jnp.where(t == 0, static.bos_id, previous)[:, None]
        cache, log_probs, carried = step(cache, tokens)
        log_probs = _forbid(log_probs, t, dyn["min_length"], static.eos_id)
        token = jnp.where(done, PAD_ID, choose(log_probs, t)).astype(jnp.int32)
        token_log_prob = jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]
        total = total + jnp.where(done, 0.0, token_log_prob)
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, t, 1)

        def record(buffer, x):
            x = jnp.where(done.reshape(-1, *(1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)
            return jax.lax.dynamic_update_index_in_dim(buffer, x, t, 1)

        records = jax.tree.map(record, records, carried)
        lengths = jnp.where(done, lengths, t + 1)
        is_eos = (token == static.eos_id) & ~done
        ended = ended | is_eos
        done = done | is_eos | (t + 1 >= limits)
        return t + 1, cache, seqs, total, lengths, ended, done, records

    def cond(carry):
        return (carry[0] < length) & ~jnp.all(carry[6])

    init = (
        jnp.array(0, jnp.int32),
        cache,
        jnp.zeros((batch, length), jnp.int32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), bool),
        jnp.zeros((batch,), bool),
        records,
    )
    _, _, seqs, total, lengths, ended, _, records = jax.lax.while_loop(cond, body, init)
    return DecodeResult(
        seqs, total, total, lengths, ended, records.get("alignment"), _traces(records, source)
    )


def greedy_search(
    model: nnx.Module,
    src: Array,
    *,
    max_length: int | None = None,
    max_length_a: float = 0.0,
    max_length_b: float | None = None,
    min_length: int = 0,
    eos_id: int = 2,
    bos_id: int = 1,
    return_weights: bool = False,
    trace: TraceSelection | None = None,
) -> DecodeResult:
    """Picks the most probable token at every step.

    Args:
      model: an attnx seq2seq model (encode / init_cache / decode_step).
      src: the source batch (tokens `[b, s]` with 0 padding, or an image batch).
      max_length: fixed maximum output length; with `max_length_a`/`max_length_b`
        it is the cap (the static buffer size), by default floor(a * s_padded + b).
      max_length_a, max_length_b: per-example maximum floor(a * src_len + b),
        src_len = the number of non-pad source tokens (token sources only).
      min_length: eos is forbidden before this many tokens have been generated.
      eos_id, bos_id: end and start tokens.
      return_weights: also return the model's alignment of every generated token.
      trace: also carry the selected attention weights of every generated
        token, and the encoder's once (`DecodeResult.traces`, see `TraceSelection`).
        The layers it does not select keep their kernel (`skip_unselected_layers`;
        with `return_weights` the encoder's only, as the alignment may read any
        decoder layer).

    Returns:
      A `DecodeResult` with `[b, L]` sequences; `scores` = `log_probs` (unnormalised).
    """
    return sample(
        model,
        src,
        jax.random.key(0),
        temperature=0.0,
        max_length=max_length,
        max_length_a=max_length_a,
        max_length_b=max_length_b,
        min_length=min_length,
        eos_id=eos_id,
        bos_id=bos_id,
        return_weights=return_weights,
        trace=trace,
    )


def sample(
    model: nnx.Module,
    src: Array,
    rng: Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    max_length: int | None = None,
    max_length_a: float = 0.0,
    max_length_b: float | None = None,
    min_length: int = 0,
    eos_id: int = 2,
    bos_id: int = 1,
    return_weights: bool = False,
    trace: TraceSelection | None = None,
) -> DecodeResult:
    """Draws one sequence per example from the model, token by token.

    Each step samples from softmax(log p / temperature) restricted to the
    `top_k` most probable tokens (0 = all), then to the nucleus: the most
    probable tokens whose mass reaches `top_p` (Holtzman et al. 2020; tokens
    tied with the last one kept stay in). `temperature=0` is greedy search.
    Step t uses the key `fold_in(rng, t)`: the same rng gives the same samples.
    Scores are the model's (untempered) log-probs of the drawn tokens. The
    other arguments are those of `greedy_search`.
    """
    _check_model(model)
    buffer, a, b = _resolve_lengths(src, max_length, max_length_a, max_length_b)
    _check_common(min_length, eos_id, bos_id)
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0, got {temperature}")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"sample: top_k must be an int >= 0, got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"sample: top_p must be in (0, 1], got {top_p}")
    static = _Static(
        buffer_length=buffer,
        eos_id=eos_id,
        bos_id=bos_id,
        return_weights=return_weights,
        temperature_is_zero=temperature == 0,
        trace=_check_trace(trace),
    )
    dyn = dict(
        a=a,
        b=b,
        min_length=min_length,
        temperature=max(temperature, 1e-30),
        top_k=top_k,
        top_p=float(top_p),
    )
    graphdef, state = nnx.split(model)
    return _sequential_search(graphdef, state, jnp.asarray(src), rng, dyn, static)


# -- beam search --------------------------------------------------------------


def _gather_beams(x: Array, index: Array) -> Array:
    """x `[b, k, ...]`, index `[b, m]` -> `[b, m, ...]`."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _reorder_beams(cache: nnx.State, rows: Array) -> nnx.State:
    """Each hypothesis's cache rows from its parent's (`rows` `[batch * beam]`).

    `SourceCache` arrays are the same in every beam of a source, so they are
    not copied: for the Transformer's cross-attention keys and values or an
    RNN's projected annotations that is as much memory traffic per step as
    the source side of the model.
    """
    fixed, per_hypothesis = cache.split(SourceCache, ...)
    per_hypothesis = jax.tree.map(lambda x: x[rows] if x.ndim else x, per_hypothesis)
    return nnx.merge_state(fixed, per_hypothesis)


@functools.partial(jax.jit, static_argnames=("graphdef", "static"))
def _beam_search(graphdef, state, src, dyn, static: _Static) -> DecodeResult:
    batch, beam, length = src.shape[0], static.beam_size, static.buffer_length
    limits = _source_limits(src, dyn["a"], dyn["b"], length)
    loop_def, cache, rest, source = _start(graphdef, state, src, beam, static)
    step = _make_step(loop_def, rest, static)
    records = _record_buffers(step, cache, batch * beam, static.bos_id, (batch, beam), length)

    def penalty(n):
        return length_penalty(n, dyn["gnmt"], dyn["alpha"])

    # Since log-probs are <= 0 and lp grows with length (alpha >= 0), an alive
    # hypothesis with log-prob c ends with a score of at most c / lp(limit).
    best_possible_divisor = penalty(limits)

    def body(carry):
        t, cache, alive, finished, done = carry
        previous = jax.lax.dynamic_index_in_dim(alive["seqs"], jnp.maximum(t - 1, 0), 2, False)
        tokens = jnp.where(t == 0, static.bos_id, previous).reshape(batch * beam, 1)
        cache, log_probs, carried = step(cache, tokens)
        log_probs = _forbid(log_probs, t, dyn["min_length"], static.eos_id)
        vocab = log_probs.shape[-1]
        candidates = alive["log_prob"][:, :, None] + log_probs.reshape(batch, beam, vocab)
        # 2k candidates always hold k that do not end (each beam adds at most one eos).
        top_log_prob, top_index = jax.lax.top_k(candidates.reshape(batch, beam * vocab), 2 * beam)
        parent, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
        seqs = _gather_beams(alive["seqs"], parent)
        seqs = jax.lax.dynamic_update_index_in_dim(seqs, token, t, 2)

        # Each candidate inherits its parent's records and this step's weights of its parent.
        def extend(buffer, x):
            x = _gather_beams(x.reshape(batch, beam, *x.shape[1:]), parent)
            return jax.lax.dynamic_update_index_in_dim(_gather_beams(buffer, parent), x, t, 2)

        new = {
            "seqs": seqs,
            "log_prob": top_log_prob,
            "records": jax.tree.map(extend, alive["records"], carried),
        }

        # Finished: eos among the top k candidates (fairseq), or anything in the top k at the limit.
        is_eos = token == static.eos_id
        at_limit = (t + 1 >= limits)[:, None]
        ends = (jnp.arange(2 * beam) < beam) & (is_eos | at_limit) & ~done[:, None]
        ending_log_prob = jnp.where(ends, top_log_prob, -jnp.inf)
        ending = dict(
            new,
            log_prob=ending_log_prob,
            score=ending_log_prob / penalty(t + 1),
            length=jnp.full((batch, 2 * beam), t + 1, jnp.int32),
            ended=is_eos,
        )
        pool = jax.tree.map(lambda f, e: jnp.concatenate([f, e], axis=1), finished, ending)
        _, keep = jax.lax.top_k(pool["score"], beam)
        finished = jax.tree.map(lambda x: _gather_beams(x, keep), pool)

        # Alive: the k best candidates that did not end with eos.
        _, survivors = jax.lax.top_k(jnp.where(is_eos, -jnp.inf, top_log_prob), beam)
        alive = jax.tree.map(lambda x: _gather_beams(x, survivors), new)
        alive["log_prob"] = jnp.where(_gather_beams(is_eos, survivors), -jnp.inf, alive["log_prob"])
        rows = (jnp.arange(batch)[:, None] * beam + _gather_beams(parent, survivors)).reshape(-1)
        cache = _reorder_beams(cache, rows)

        best_alive = jnp.max(alive["log_prob"], axis=1) / best_possible_divisor
        enough = finished["score"][:, static.num_return - 1] >= best_alive
        done = done | at_limit[:, 0] | enough
        return t + 1, cache, alive, finished, done

    def cond(carry):
        return (carry[0] < length) & ~jnp.all(carry[4])

    # All k beams start identical: only the first is live, so that they do not repeat each other.
    alive = {
        "seqs": jnp.zeros((batch, beam, length), jnp.int32),
        "log_prob": jnp.tile(jnp.array([0.0] + [-jnp.inf] * (beam - 1)), (batch, 1)),
        "records": records,
    }
    finished = {
        "seqs": jnp.zeros((batch, beam, length), jnp.int32),
        "log_prob": jnp.full((batch, beam), -jnp.inf),
        "score": jnp.full((batch, beam), -jnp.inf),
        "length": jnp.zeros((batch, beam), jnp.int32),
        "ended": jnp.zeros((batch, beam), bool),
        "records": records,
    }
    init = (jnp.array(0, jnp.int32), cache, alive, finished, jnp.zeros((batch,), bool))
    finished = jax.lax.while_loop(cond, body, init)[3]
    top = jax.tree.map(lambda x: x[:, : static.num_return], finished)
    records = top["records"]
    return DecodeResult(
        top["seqs"],
        top["score"],
        top["log_prob"],
        top["length"],
        top["ended"],
        records.get("alignment"),
        _traces(records, source),
    )


def beam_search(
    model: nnx.Module,
    src: Array,
    *,
    beam_size: int,
    length_penalty: str = "gnmt",
    alpha: float = 0.6,
    max_length: int | None = None,
    max_length_a: float = 0.0,
    max_length_b: float | None = None,
    min_length: int = 0,
    eos_id: int = 2,
    bos_id: int = 1,
    return_weights: bool = False,
    num_return: int = 1,
    trace: TraceSelection | None = None,
) -> DecodeResult:
    """Batched beam search, compiled once per shapes and settings.

    Keeps `beam_size` alive hypotheses per example (the model's cache is tiled
    by beam and every batch-leading nnx.Cache array but the `SourceCache`
    ones is reordered with the surviving beams each step) and a pool of the `beam_size` best complete
    ones, ranked by log P(y|x) / lp(|y|) (see the module docstring). An example
    stops when its `num_return`-th best complete hypothesis beats every score
    its alive ones could still reach, or at its maximum length, where the alive
    ones complete unfinished; so some hypothesis is always returned.

    Args:
      model, src, max_length, max_length_a, max_length_b, min_length, eos_id,
        bos_id: as in `greedy_search`.
      beam_size: hypotheses kept per example.
      length_penalty: 'gnmt' ((5 + n) / 6)^alpha (Wu et al. 2016) or 'power' n^alpha.
      alpha: the length penalty's exponent, >= 0 (0 ranks by the raw log-prob).
      return_weights: also return each hypothesis's alignment `[b, r, L, s]`,
        carried and reordered with its beam.
      num_return: hypotheses returned per example, best first (<= beam_size).
      trace: also carry each hypothesis's selected attention weights of every
        step (`[b, r, L, ...]`, reordered with its beam like the alignment) and
        the encoder's, once per source (`DecodeResult.traces`; see
        `greedy_search` and `attnx.interpret.traces.trace_beam_search`).

    Returns:
      A `DecodeResult` with a hypothesis axis: sequences `[b, num_return, L]`,
      `scores` the length-normalised ranking scores, `log_probs` the raw sums.
    """
    _check_model(model)
    buffer, a, b = _resolve_lengths(src, max_length, max_length_a, max_length_b)
    _check_common(min_length, eos_id, bos_id)
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_search: beam_size must be a positive int, got {beam_size!r}")
    if not isinstance(num_return, int) or not 1 <= num_return <= beam_size:
        raise ValueError(
            f"beam_search: num_return must be in [1, beam_size={beam_size}], got {num_return!r}"
        )
    if length_penalty not in LENGTH_PENALTIES:
        raise ValueError(
            f"beam_search: length_penalty must be one of {LENGTH_PENALTIES}, got {length_penalty!r}"
        )
    if alpha < 0:
        raise ValueError(
            f"beam_search: alpha must be >= 0 (early stopping relies on it), got {alpha}"
        )
    static = _Static(
        buffer_length=buffer,
        eos_id=eos_id,
        bos_id=bos_id,
        return_weights=return_weights,
        beam_size=beam_size,
        num_return=num_return,
        trace=_check_trace(trace),
    )
    dyn = dict(a=a, b=b, min_length=min_length, alpha=float(alpha), gnmt=length_penalty == "gnmt")
    graphdef, state = nnx.split(model)
    return _beam_search(graphdef, state, jnp.asarray(src), dyn, static)
