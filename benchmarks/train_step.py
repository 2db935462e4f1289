"""Training-step time of the four architectures at the "cpu-small" settings, one JSON line each.

The step is the training loop's own (`attnx.training.steps.make_train_step`:
forward, masked cross-entropy, backward, Adam; compiled once with `jax.jit`,
the state donated), on the settings that the peers in `benchmarks/peers/`
time in PyTorch and plain Flax (`benchmarks/peers/settings.py`), so that the
lines compare one to one (`python -m benchmarks.compare` alternates them):

  transformer  vocab 8000 shared and tied, d_model 256, 4 heads, ff 1024,
               3+3 layers, dropout 0.1, sinusoidal, post-LN; 64 x 64, batch 32
  rnn          vocab 8000, embeddings 256, BiLSTM 256 per direction, LSTM
               decoder 256, additive attention 256; 64 x 64, batch 32
  convs2s      the `cpu_small` preset (4 + 3 GLU blocks of 256, kernel 3,
               attention in every decoder block); 64 x 64, batch 32
  spatial      64 x 64 x 1 images -> 8 x 8 x 128 grid, LSTM 256, embeddings
               128, attention 256, doubly stochastic term (lambda 1); vocab
               16, 8 tokens, batch 64

The PyTorch peers follow the same equations (RNNsearch's maxout deep output
and s_0 = tanh(W h<-_1), ConvS2S's weight normalisation); parameter counts
differ only by PyTorch's second LSTM bias and the captioner's deep-output
bias. Batches are random tokens, each row half to full length,
eos last, as the peers draw them.

Each line: model, framework 'attnx', mode 'jit', params, batch,
step_ms_median, step_ms_min, tokens_per_s (target tokens per second at the
median), warmup_s (tracing, compilation and the warm-up steps), compile_s
(tracing and compilation alone), gflop_per_step (XLA's cost analysis of the
compiled step: the FLOPs that MFU divides by, for attnx and its peers alike),
peak_rss_mb, and other_load (cores other processes used while timing).

  python -m benchmarks.train_step --models transformer --wait_idle 600
  # attnx and its peers alternated over fresh processes, medians and ratios:
  python -m benchmarks.compare --models transformer
"""

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnx import host_memory
from attnx.models import build_model, make_loss_terms, make_model_config, spec_of
from attnx.training import steps

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.peers import machine  # noqa: E402

PAD, EOS = 0, 2
MODELS = ("transformer", "rnn", "convs2s", "spatial")

SETTINGS = {
    "transformer": dict(
        model=dict(
            name="transformer",
            d_model=256,
            num_heads=4,
            d_ff=1024,
            num_encoder_layers=3,
            num_decoder_layers=3,
            dropout_rate=0.1,
            pre_ln=False,
            share_embeddings=True,
            tie_output=True,
        ),
        vocab=8000,
        source_length=64,
        target_length=64,
        batch=32,
    ),
    "rnn": dict(
        model=dict(
            name="rnn",
            cell="lstm",
            embed_dim=256,
            hidden_dim=256,
            bidirectional=True,
            decoder_hidden_dim=256,
            variant="bahdanau",
            attention_dim=256,
            maxout_units=256,
        ),
        vocab=8000,
        source_length=64,
        target_length=64,
        batch=32,
    ),
    "convs2s": dict(
        model=dict(name="convs2s", preset="cpu_small"),
        vocab=8000,
        source_length=64,
        target_length=64,
        batch=32,
    ),
    "spatial": dict(
        model=dict(name="captioner", preset="digits_small", embed_dim=128, hidden_dim=256),
        vocab=16,
        image_size=64,
        target_length=8,
        batch=64,
        attention_penalty=1.0,
    ),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait_idle",
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to S seconds for an idle machine",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"--models: unknown model {unknown[0]!r}; choose from {list(MODELS)}")
    return args


def random_tokens(rng: np.random.Generator, batch: int, length: int, vocab: int) -> np.ndarray:
    """int32 `[batch, length]`: rows of random words, half to full length, eos last, then padding."""
    lengths = rng.integers(length // 2, length + 1, size=batch)
    lengths[0] = length  # one full row, so the padded shape is always reached
    tokens = rng.integers(EOS + 1, vocab, size=(batch, length))
    positions = np.arange(length)[None, :]
    tokens = np.where(positions == lengths[:, None] - 1, EOS, tokens)
    return np.where(positions >= lengths[:, None], PAD, tokens).astype(np.int32)


def make_batch(setting: dict, seed: int) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    batch = {
        "targets": random_tokens(rng, setting["batch"], setting["target_length"], setting["vocab"])
    }
    if "image_size" in setting:
        size = setting["image_size"]
        batch["image"] = rng.random((setting["batch"], size, size, 1), np.float32)
    else:
        batch["inputs"] = random_tokens(
            rng, setting["batch"], setting["source_length"], setting["vocab"]
        )
    return {name: jnp.asarray(value) for name, value in batch.items()}


def step_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (None if absent)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else None


def build_step(name: str, seed: int = 0) -> dict:
    """The compiled training step of model `name` at its setting, with its state and batch.

    Returns a dict: `step` (compiled ahead of time, once, the same program
    `jax.jit` would run, so that XLA's cost analysis of exactly this step gives
    the FLOPs; the state is donated), `state`, `batch`, `params` (count),
    `compile_s` (tracing and compilation) and `flops` (per call, or None).
    """
    setting = SETTINGS[name]
    vocab = setting["vocab"]
    captions = spec_of(setting["model"]["name"]).source_kind == "image"
    model_config = make_model_config(
        setting["model"], source_vocab_size=None if captions else vocab, target_vocab_size=vocab
    )
    model = build_model(
        setting["model"]["name"],
        model_config,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_count = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    optimizer = optax.adam(1e-3)
    train = {"attention_penalty": setting.get("attention_penalty", 0.0)}
    loss_terms = make_loss_terms(setting["model"]["name"], model_config, train)
    state = steps.TrainState.create(params, optimizer, jax.random.key(seed + 2), loss_terms)
    batch = make_batch(setting, seed)
    compile_start = time.perf_counter()
    train_step = (
        jax.jit(
            steps.make_train_step(
                graphdef, rest, optimizer, label_smoothing=0.0, loss_terms=loss_terms
            ),
            donate_argnums=0,
        )
        .lower(state, batch)
        .compile()
    )
    return dict(
        step=train_step,
        state=state,
        batch=batch,
        params=param_count,
        compile_s=time.perf_counter() - compile_start,
        flops=step_flops(train_step),
    )


def time_model(name: str, args: argparse.Namespace) -> dict:
    setting = SETTINGS[name]
    start = time.perf_counter()
    built = build_step(name, args.seed)
    train_step, state, batch = built["step"], built["state"], built["batch"]
    compile_s, flops, param_count = built["compile_s"], built["flops"], built["params"]
    for _ in range(1 + args.warmup):
        state, sums = train_step(state, batch)
        jax.block_until_ready((state, sums))
    warmup_s = time.perf_counter() - start

    times_ms = []
    with machine.LoadWindow() as window:
        for _ in range(args.steps):
            begin = time.perf_counter()
            state, sums = train_step(state, batch)
            jax.block_until_ready((state, sums))
            times_ms.append((time.perf_counter() - begin) * 1e3)

    loss = float(sums["loss"][0]) / float(sums["loss"][1])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{name}: the training loss is {loss}")
    median = statistics.median(times_ms)
    return dict(
        model=name,
        framework="attnx",
        mode="jit",
        jax=jax.__version__,
        devices=jax.device_count(),
        params=param_count,
        batch=setting["batch"],
        steps=args.steps,
        step_ms_median=round(median, 2),
        step_ms_min=round(min(times_ms), 2),
        tokens_per_s=round(setting["batch"] * setting["target_length"] / (median / 1e3), 1),
        warmup_s=round(warmup_s, 2),
        compile_s=round(compile_s, 2),
        gflop_per_step=round(flops / 1e9, 2) if flops else None,
        peak_rss_mb=machine.peak_rss_mb(),
        loss=round(loss, 4),
        other_load=window.other_load,
    )


def main() -> None:
    args = parse_args()
    host_memory.keep_freed_memory()  # as `python -m attnx.main` runs, before JAX starts
    for name in args.models.split(","):
        machine.wait_for_idle(args.wait_idle)
        print(json.dumps(time_model(name, args)), flush=True)


if __name__ == "__main__":
    main()
