"""The cpu-small Transformer training step in plain `flax.linen`, under `jax.jit`; one JSON line.

Written the way Flax's WMT example writes its Transformer: one `nn.Embed`
shared by source, target and the output layer (`attend`), fixed sinusoidal
positions, `nn.MultiHeadDotProductAttention`, `nn.Dense` MLP blocks, boolean
masks from `nn.make_attention_mask` / `nn.make_causal_mask`, a
`flax.training.train_state.TrainState` with `optax.adam(1e-3)`, and one
jitted step (forward, masked cross-entropy, backward, update; the state
donated). Where the cpu-small setting differs from the WMT example, the
setting wins: post-LN blocks with no final LayerNorm, attention projections
with biases (so the parameter count is attnx's and PyTorch's), LayerNorm
epsilon 1e-5, embeddings scaled by sqrt(d_model).

  python -m benchmarks.peers.flax_transformer

The line has the fields of `torch_step`'s (framework 'flax', mode 'jit').
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.peers import machine, settings  # noqa: E402


def sinusoids(length: int, dim: int) -> np.ndarray:
    """float32 `[length, dim]`: sin on even channels, cos on odd ones."""
    position = np.arange(length)[:, None]
    rate = np.exp(np.arange(0, dim, 2) * (-np.log(10000.0) / dim))
    table = np.zeros((length, dim), np.float32)
    table[:, 0::2], table[:, 1::2] = np.sin(position * rate), np.cos(position * rate)
    return table


def define_transformer():
    """The linen module class (defined here so that importing this file needs no flax)."""
    import flax.linen as nn

    dense_init = nn.initializers.xavier_uniform()

    class Block(nn.Module):
        """A post-LN block: x = LN(x + Dropout(sublayer(x))) for each sublayer (one or two
        attentions, then the MLP)."""

        setting: dict
        cross: bool

        @nn.compact
        def __call__(self, x, self_mask, memory=None, cross_mask=None, *, train: bool):
            s = self.setting

            def attention(inputs_kv, mask):
                return nn.MultiHeadDotProductAttention(
                    num_heads=s["heads"],
                    kernel_init=dense_init,
                    use_bias=True,
                    dropout_rate=s["dropout"],
                    broadcast_dropout=False,
                    deterministic=not train,
                )(x, inputs_kv, mask=mask)

            def residual(x, y):
                y = nn.Dropout(s["dropout"])(y, deterministic=not train)
                return nn.LayerNorm(epsilon=1e-5)(x + y)

            x = residual(x, attention(x, self_mask))
            if self.cross:
                x = residual(x, attention(memory, cross_mask))
            y = nn.relu(nn.Dense(s["d_ff"], kernel_init=dense_init)(x))
            y = nn.Dropout(s["dropout"])(y, deterministic=not train)
            return residual(x, nn.Dense(x.shape[-1], kernel_init=dense_init)(y))

    class Transformer(nn.Module):
        """`(src [b, s], tgt_in [b, t], train) -> logits [b, t, vocab]`."""

        setting: dict

        def setup(self):
            s = self.setting
            self.embedding = nn.Embed(
                s["vocab"],
                s["d_model"],
                embedding_init=nn.initializers.normal(s["d_model"] ** -0.5),
            )
            self.encoder = [Block(s, cross=False) for _ in range(s["layers"])]
            self.decoder = [Block(s, cross=True) for _ in range(s["layers"])]
            self.dropout = nn.Dropout(s["dropout"])

        def embed(self, tokens, train):
            d = self.setting["d_model"]
            x = self.embedding(tokens) * np.sqrt(d) + sinusoids(tokens.shape[1], d)
            return self.dropout(x, deterministic=not train)

        def __call__(self, src, tgt_in, *, train: bool):
            src_mask = nn.make_attention_mask(src > 0, src > 0)
            x = self.embed(src, train)
            for block in self.encoder:
                x = block(x, src_mask, train=train)
            self_mask = nn.combine_masks(
                nn.make_attention_mask(tgt_in > 0, tgt_in > 0), nn.make_causal_mask(tgt_in)
            )
            cross_mask = nn.make_attention_mask(tgt_in > 0, src > 0)
            y = self.embed(tgt_in, train)
            for block in self.decoder:
                y = block(y, self_mask, x, cross_mask, train=train)
            return self.embedding.attend(y)  # tied output projection

    return Transformer


def make_step(setting: dict, batch: dict, seed: int = 0):
    """Returns `(step, params)`; `step()` trains once on `batch` and returns the loss (float)."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    model = define_transformer()(setting)
    src, tgt_in, tgt_out = (jnp.asarray(batch[k], jnp.int32) for k in ("src", "tgt_in", "tgt_out"))
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    params = jax.jit(lambda k: model.init(k, src, tgt_in, train=False))(init_key)["params"]
    count = int(sum(x.size for x in jax.tree.leaves(params)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-3))

    def train_step(state, src, tgt_in, tgt_out):
        rng = jax.random.fold_in(dropout_key, state.step)

        def loss_fn(params):
            logits = state.apply_fn(
                {"params": params}, src, tgt_in, train=True, rngs={"dropout": rng}
            )
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, tgt_out)
            weights = (tgt_out != settings.PAD).astype(losses.dtype)
            return jnp.sum(losses * weights) / jnp.sum(weights)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    jitted = jax.jit(train_step, donate_argnums=0)
    holder = {"state": state}

    def step() -> float:
        holder["state"], loss = jitted(holder["state"], src, tgt_in, tgt_out)
        return float(loss)  # float() waits for the step, like block_until_ready

    return step, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (>= 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step compiles)")
    import flax
    import jax

    setting = settings.SETTINGS["transformer"]
    start = time.perf_counter()
    step, params = make_step(setting, settings.make_batch("transformer", args.seed), args.seed)
    losses = [step() for _ in range(args.warmup)]
    warmup_s = time.perf_counter() - start
    times_ms = []
    with machine.LoadWindow() as window:
        for _ in range(args.steps):
            begin = time.perf_counter()
            losses.append(step())
            times_ms.append((time.perf_counter() - begin) * 1e3)
    median = statistics.median(times_ms)
    record = dict(
        model="transformer",
        framework="flax",
        mode="jit",
        jax=jax.__version__,
        flax=flax.__version__,
        params=params,
        batch=setting["batch"],
        steps=args.steps,
        step_ms_median=round(median, 2),
        step_ms_min=round(min(times_ms), 2),
        tokens_per_s=round(settings.tokens_per_step("transformer") / (median / 1e3), 1),
        warmup_s=round(warmup_s, 2),
        peak_rss_mb=machine.peak_rss_mb(),
        loss_first=round(losses[0], 4),
        loss_last=round(losses[-1], 4),
        other_load=window.other_load,
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
