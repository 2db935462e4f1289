"""Layer demo: one attention layer learns the alignment of sequence reversal.

The target at position i is the source token at position n - 1 - i, so the
gold alignment is the anti-diagonal. A single `MultiHeadAttention` (one head)
reads the source with learned positional queries; for each normalizer
(softmax, sparsemax, entmax-1.5) we train it and report token accuracy, how
often the attention's argmax hits the gold source position, and how many
source positions get non-zero weight (sparse normalizers put exact zeros).

    python -m attnx.demo --workdir=/tmp/attnx_demo

Expected (CPU, ~1 min): token and alignment accuracy 1.00 for all three;
softmax attends all 12 positions, sparsemax and entmax15 about 1-2.
Writes attention maps to WORKDIR/alignment_<normalizer>.png and one JSON
line per normalizer to stdout.
"""

import json
import os

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from attnx.layers import MultiHeadAttention
from attnx.layers.params import param

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/attnx_demo", "Where plots are written.")
flags.DEFINE_integer("steps", 300, "Training steps per normalizer.")
flags.DEFINE_integer("length", 12, "Sequence length.")

VOCAB, DIM, BATCH = 16, 32, 64


class Reverser(nnx.Module):
    """Embeddings + positions -> one cross-attention layer -> vocabulary logits."""

    def __init__(self, length: int, normalizer: str, rngs: nnx.Rngs):
        normal = nnx.initializers.normal(0.5)
        self.embed = param(rngs, normal, (VOCAB, DIM), ("vocab", "embed"))
        self.source_positions = param(rngs, normal, (length, DIM), (None, "embed"))
        self.target_positions = param(rngs, normal, (length, DIM), (None, "embed"))
        self.attend = MultiHeadAttention(1, DIM, normalizer=normalizer, rngs=rngs)
        self.readout = param(
            rngs, nnx.initializers.lecun_normal(), (DIM, VOCAB), ("embed", "vocab")
        )

    def __call__(self, source: jax.Array):
        keys = self.embed[...][source] + self.source_positions[...]
        queries = jnp.broadcast_to(self.target_positions[...], keys.shape)
        context, weights = self.attend(queries, keys, return_weights=True)
        return context @ self.readout[...], weights[:, 0]


def run(normalizer: str, length: int, steps: int) -> tuple[dict, np.ndarray]:
    model = Reverser(length, normalizer, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, source):
        def loss_fn(model):
            logits, _ = model(source)
            target = source[:, ::-1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        loss = train_step(model, optimizer, jnp.asarray(rng.integers(0, VOCAB, (BATCH, length))))
    source = jnp.asarray(rng.integers(0, VOCAB, (BATCH, length)))
    logits, weights = model(source)
    weights = np.asarray(weights)
    gold = length - 1 - np.arange(length)
    result = {
        "normalizer": normalizer,
        "final_loss": float(loss),
        "token_accuracy": float(
            (np.asarray(logits).argmax(-1) == np.asarray(source)[:, ::-1]).mean()
        ),
        "alignment_accuracy": float((weights.argmax(-1) == gold).mean()),
        "mean_support": float((weights > 0).sum(-1).mean()),
    }
    return result, weights[0]


def main(argv):
    del argv
    os.makedirs(FLAGS.workdir, exist_ok=True)
    for normalizer in ("softmax", "sparsemax", "entmax15"):
        result, weights = run(normalizer, FLAGS.length, FLAGS.steps)
        figure, axis = plt.subplots(figsize=(4, 4))
        axis.imshow(weights, cmap="Greys", vmin=0, vmax=1)
        axis.set(xlabel="source position", ylabel="target position", title=normalizer)
        path = os.path.join(FLAGS.workdir, f"alignment_{normalizer}.png")
        figure.savefig(path, bbox_inches="tight")
        plt.close(figure)
        print(json.dumps({**result, "plot": path}), flush=True)


if __name__ == "__main__":
    app.run(main)
