"""Training-step time of the four architectures at the "cpu-small" settings, one JSON line each.

The step is the training loop's own (`attnx.training.steps.make_train_step`:
forward, masked cross-entropy, backward, Adam; compiled once with `jax.jit`,
the state donated), on the settings that `../shared/peers/` times in PyTorch
and plain Flax (its README lists them), so that the lines compare one to one:

  transformer  vocab 8000 shared and tied, d_model 256, 4 heads, ff 1024,
               3+3 layers, dropout 0.1, sinusoidal, post-LN; 64 x 64, batch 32
  rnn          vocab 8000, embeddings 256, BiLSTM 256 per direction, LSTM
               decoder 256, additive attention 256; 64 x 64, batch 32
  convs2s      the `cpu_small` preset (4 + 3 GLU blocks of 256, kernel 3,
               attention in every decoder block); 64 x 64, batch 32
  spatial      64 x 64 x 1 images -> 8 x 8 x 128 grid, LSTM 256, embeddings
               128, attention 256, doubly stochastic term (lambda 1); vocab
               16, 8 tokens, batch 64

Known differences from the peers: attnx's RNNsearch decoder has the paper's
maxout deep output (here 256 units) where the peer has a tanh layer, and its
decoder starts from tanh(W h<-_1) of the backward encoder; ConvS2S keeps its
weight normalisation. Batches are random tokens, each row half to full length,
eos last, as the peers draw them.

Each line: model, framework 'attnx', mode 'jit', params, batch,
step_ms_median, step_ms_min, tokens_per_s (target tokens per second at the
median), warmup_s (tracing, compilation and the warm-up steps), peak_rss_mb,
and other_load (cores other processes used while timing, from the peers'
machine_load.py when `--peers_dir` has it, else null).

  python benchmarks/train_step.py --models transformer --wait_idle 600
  # alternate with the peers, fresh processes, and compare medians:
  for i in 1 2 3; do
    python benchmarks/train_step.py --models transformer
    python ../shared/peers/flax_reference.py
    python ../shared/peers/torch_peers.py --models transformer --modes eager
  done
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnx.models import build_model, make_loss_terms, make_model_config, spec_of
from attnx.training import steps

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
        "--peers_dir",
        default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "peers"),
        help="where machine_load.py is (to record other processes' load)",
    )
    parser.add_argument(
        "--wait_idle", type=float, default=0.0, help="wait up to S seconds for an idle machine"
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


def load_window(peers_dir: str):
    """The peers' `machine_load` module, or None when it is not there."""
    if not os.path.isfile(os.path.join(peers_dir, "machine_load.py")):
        return None
    sys.path.insert(0, os.path.abspath(peers_dir))
    import machine_load  # on sys.path only now

    return machine_load


def time_model(name: str, args: argparse.Namespace, machine_load) -> dict:
    setting = SETTINGS[name]
    vocab = setting["vocab"]
    captions = spec_of(setting["model"]["name"]).source_kind == "image"
    model_config = make_model_config(
        setting["model"], source_vocab_size=None if captions else vocab, target_vocab_size=vocab
    )
    start = time.perf_counter()
    model = build_model(
        setting["model"]["name"],
        model_config,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_count = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    optimizer = optax.adam(1e-3)
    train = {"attention_penalty": setting.get("attention_penalty", 0.0)}
    loss_terms = make_loss_terms(setting["model"]["name"], model_config, train)
    state = steps.TrainState.create(params, optimizer, jax.random.key(args.seed + 2), loss_terms)
    train_step = jax.jit(
        steps.make_train_step(
            graphdef, rest, optimizer, label_smoothing=0.0, loss_terms=loss_terms
        ),
        donate_argnums=0,
    )
    batch = make_batch(setting, args.seed)
    for _ in range(1 + args.warmup):  # the first call compiles
        state, sums = train_step(state, batch)
        jax.block_until_ready((state, sums))
    warmup_s = time.perf_counter() - start

    window = machine_load.Window() if machine_load else None
    if window:
        window.__enter__()
    times_ms = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        state, sums = train_step(state, batch)
        jax.block_until_ready((state, sums))
        times_ms.append((time.perf_counter() - begin) * 1e3)
    if window:
        window.__exit__(None, None, None)

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
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        loss=round(loss, 4),
        other_load=window.result["other_load"] if window else None,
    )


def main() -> None:
    args = parse_args()
    machine_load = load_window(args.peers_dir)
    for name in args.models.split(","):
        if args.wait_idle and machine_load:
            machine_load.wait_for_idle(args.wait_idle, label=name)
        print(json.dumps(time_model(name, args, machine_load)), flush=True)


if __name__ == "__main__":
    main()
