"""Decoding speed of the four architectures with attnx's cached search; one JSON line per case.

For every model (random weights at the cpu-small settings of
`benchmarks/train_step.py`), greedy and beam-4 search (`attnx.decoding`, one
compiled `lax.while_loop` over `init_cache` / `decode_step`) of a batch of
sources, every sentence forced to the full output length (`min_length` =
`max_length`, so eos never ends one early and every run does the same work:
64 tokens for the text models, 8 for the captioner, the lengths they train at).

For the Transformer and ConvS2S it also times beam-4 at 256 output tokens
against a BASELINE written here, `make_uncached_beam_search`: the same beam search
without a cache, which runs the model's full teacher-forced `decode` on the
whole prefix at every step and keeps the last position's logits. Its prefix
buffer grows in buckets of `--bucket` tokens (one compiled step per bucket
width, compiled before timing), so it recomputes at most `bucket - 1` padding
positions beyond the prefix; `baseline_padding` is the total positions it
computed over the positions of the prefixes (1.0 = exactly the prefixes).

Each line: model, mode ('greedy', 'beam4', 'beam4_256', 'beam4_256_uncached'),
batch, output_tokens (per sentence), tokens_per_s (generated tokens, all
sentences), ms_per_sentence, compile_s (the first call), repeats; the
256-token pair adds speedup (uncached ms / cached ms) and same_best (the
fraction of sentences whose best hypothesis is the same token for token).

  python -m benchmarks.decode
  python -m benchmarks.decode --models transformer --batch 8 --repeats 5

Timings made while other processes load the machine are not meaningful
(`other_load` in each line says how many cores they used).
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnx import decoding, host_memory
from attnx.models import build_model, make_model_config, spec_of

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.peers import machine, settings  # noqa: E402
from benchmarks.train_step import SETTINGS  # noqa: E402

MODELS = ("transformer", "rnn", "convs2s", "spatial")
LONG_MODELS = ("transformer", "convs2s")  # the 256-token cached-vs-uncached comparison
BOS, EOS = 1, 2


def build(name: str, max_length: int, seed: int) -> nnx.Module:
    """The cpu-small model `name` with random weights, positions covering `max_length`."""
    setting = SETTINGS[name]
    fields = dict(setting["model"])
    if name == "convs2s":
        fields["max_length"] = max(max_length, 64)  # learned positions: cover the output
    vocab = setting["vocab"]
    captions = spec_of(fields["name"]).source_kind == "image"
    config = make_model_config(
        fields, source_vocab_size=None if captions else vocab, target_vocab_size=vocab
    )
    return build_model(fields["name"], config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))


def sources(name: str, batch: int, seed: int) -> jax.Array:
    """A batch of sources: tokens `[batch, 64]` or images `[batch, 64, 64, 1]`."""
    setting = dict(settings.SETTINGS[name], batch=batch)
    numpy_batch = settings.make_batch(name, seed, setting)
    if name == "spatial":
        return jnp.asarray(numpy_batch["image"])
    return jnp.asarray(numpy_batch["src"], jnp.int32)


def make_uncached_beam_search(
    model: nnx.Module, *, batch: int, beam_size: int, length: int, bucket: int
):
    """The BASELINE: beam search that re-decodes the whole prefix at every step (no cache).

    Every step runs `model.decode(prefix, encoded)` on the `[batch * beam, w]`
    prefixes (w = the prefix length rounded up to `bucket`, so that only
    ceil(length / bucket) step programs compile; the decoders are causal, so
    the padding after the prefix does not change its last position's logits),
    then the usual top-`beam_size` of the beam x vocabulary candidates. Pad is
    never chosen and eos neither (every hypothesis runs `length` tokens, as in
    the cached search it is compared with), so all hypotheses have one length
    and rank by their log-probability.

    Returns `search(src [batch, ...]) -> (tokens [batch, beam, length] best
    first, log-probs [batch, beam], positions computed / prefix positions)`;
    its compiled programs are kept across calls.
    """
    graphdef, state = nnx.split(model)

    @jax.jit
    def encode(state, src):
        encoded = nnx.merge(graphdef, state).encode(src, train=False)
        return jax.tree.map(lambda x: jnp.repeat(x, beam_size, axis=0), encoded)

    @functools.partial(jax.jit, static_argnums=5)
    def step(state, encoded, tokens, scores, t, width):
        model = nnx.merge(graphdef, state)
        prefix = tokens[:, :, :width].reshape(batch * beam_size, width)
        logits = model.decode(prefix, encoded, train=False)  # [b * beam, width, vocab]
        logits = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
        log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        vocab = log_probs.shape[-1]
        forbidden = (jnp.arange(vocab) == decoding.PAD_ID) | (jnp.arange(vocab) == EOS)
        log_probs = jnp.where(forbidden, -jnp.inf, log_probs).reshape(batch, beam_size, vocab)
        candidates = (scores[:, :, None] + log_probs).reshape(batch, beam_size * vocab)
        scores, index = jax.lax.top_k(candidates, beam_size)
        origin, token = index // vocab, index % vocab
        tokens = jnp.take_along_axis(tokens, origin[:, :, None], axis=1)
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, token.astype(tokens.dtype), t + 1, 2)
        return tokens, scores

    def search(src: jax.Array) -> tuple[np.ndarray, np.ndarray, float]:
        encoded = encode(state, src)
        tokens = jnp.zeros((batch, beam_size, length + 1), jnp.int32).at[:, :, 0].set(BOS)
        # Only the first beam is alive at the start; the others would repeat it.
        scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (beam_size - 1)), (batch, 1))
        computed = 0
        for t in range(length):
            width = min(math.ceil((t + 1) / bucket) * bucket, length)
            computed += width
            tokens, scores = step(state, encoded, tokens, scores, t, width)
        tokens, scores = jax.block_until_ready((tokens, scores))
        prefixes = length * (length + 1) / 2
        return np.asarray(tokens[:, :, 1:]), np.asarray(scores), computed / prefixes

    return search


def timed(fn, repeats: int) -> tuple[float, list[float], object]:
    """(seconds of the first call, seconds of each of `repeats` more calls, the last result)."""
    begin = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - begin
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return first, times, result


def record(name, mode, batch, length, first, times, window, **extra) -> dict:
    median = statistics.median(times)
    return dict(
        model=name,
        mode=mode,
        batch=batch,
        output_tokens=length,
        tokens_per_s=round(batch * length / median, 1),
        ms_per_sentence=round(median * 1e3 / batch, 2),
        compile_s=round(first - median, 2),
        repeats=len(times),
        other_load=window.other_load,
        **extra,
    )


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    long = name in LONG_MODELS and not args.skip_long
    model = build(name, args.long_length if long else 64, args.seed)
    src = sources(name, args.batch, args.seed)
    length = settings.SETTINGS[name]["tgt_len"]
    lines = []
    searches = {
        "greedy": lambda: decoding.greedy_search(model, src, max_length=length, min_length=length),
        f"beam{args.beam}": lambda: decoding.beam_search(
            model, src, beam_size=args.beam, max_length=length, min_length=length
        ),
    }
    for mode, fn in searches.items():
        with machine.LoadWindow() as window:
            first, times, _ = timed(fn, args.repeats)
        lines.append(record(name, mode, args.batch, length, first, times, window))
    if not long:
        return lines

    n = args.long_length

    def cached():
        return decoding.beam_search(model, src, beam_size=args.beam, max_length=n, min_length=n)

    baseline_search = make_uncached_beam_search(
        model, batch=args.batch, beam_size=args.beam, length=n, bucket=args.bucket
    )

    def uncached():
        return baseline_search(src)

    with machine.LoadWindow() as window:
        first, times, result = timed(cached, args.repeats)
    cached_line = record(name, f"beam{args.beam}_{n}", args.batch, n, first, times, window)
    # The baseline is slow: fewer timed runs (its first run compiles every bucket's step).
    with machine.LoadWindow() as window:
        first, times, (tokens, _, padding) = timed(uncached, max(1, args.repeats // 2))
    baseline = record(
        name,
        f"beam{args.beam}_{n}_uncached",
        args.batch,
        n,
        first,
        times,
        window,
        baseline_padding=round(padding, 3),
    )
    best = np.asarray(result.sequences[:, 0])
    same = float(np.mean(np.all(best == tokens[:, 0], axis=-1)))
    speedup = baseline["ms_per_sentence"] / cached_line["ms_per_sentence"]
    cached_line.update(speedup=round(speedup, 1), same_best=round(same, 3))
    return lines + [cached_line, baseline]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=4, help="sentences (images) per search")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--long_length", "--long-length", type=int, default=256)
    parser.add_argument("--bucket", type=int, default=16, help="the baseline's prefix buckets")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per case")
    parser.add_argument("--skip_long", "--skip-long", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait_idle", "--wait-idle", type=float, default=0.0)
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown model {unknown[0]!r}; choose from {list(MODELS)}")
    return args


def main() -> None:
    args = parse_args()
    host_memory.keep_freed_memory()  # as `python -m attnx.main` runs, before JAX starts
    for name in args.models.split(","):
        machine.wait_for_idle(args.wait_idle)
        for line in bench_model(name, args):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
