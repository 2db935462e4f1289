"""The cpu-small settings of the four architectures and their random batches (numpy only).

The settings are the specification every framework is timed at (attnx's
`benchmarks/train_step.py`, the PyTorch and plain-Flax peers here):

  transformer  vocab 8000 shared and tied, d_model 256, 4 heads, ff 1024,
               3+3 layers, dropout 0.1, sinusoidal positions, post-LN;
               source and target 64 tokens, batch 32
  rnn          vocab 8000, embeddings 256, BiLSTM 256 per direction, LSTM
               decoder 256, Bahdanau additive attention (256) at every step,
               maxout deep output (256); 64 x 64, batch 32
  convs2s      vocab 8000, embeddings 256, 4 encoder and 3 decoder GLU blocks
               of 256 channels, kernel 3, attention in every decoder block
               (keys z, values z + e), dropout 0.1; 64 x 64, batch 32
  spatial      64 x 64 x 1 images, conv 32/64/128 (3x3, ReLU, 2x2 max-pool) to
               an 8 x 8 x 128 grid, LSTM 256, embeddings 128, additive
               attention 256, scalar gate, doubly stochastic term (lambda 1);
               vocab 16, captions of 8 tokens, batch 64

Batches: random tokens, each row half to full length (row 0 full, so the
padded shape is always reached), eos last, then padding (pad 0, bos 1, eos 2).
"""

import numpy as np

PAD, BOS, EOS = 0, 1, 2
MODELS = ("transformer", "rnn", "convs2s", "spatial")

SETTINGS: dict[str, dict] = {
    "transformer": dict(
        vocab=8000, d_model=256, heads=4, d_ff=1024, layers=3, dropout=0.1, src_len=64,
        tgt_len=64, batch=32,
    ),
    "rnn": dict(
        vocab=8000, embed=256, hidden=256, attention=256, maxout=256, src_len=64, tgt_len=64,
        batch=32,
    ),
    "convs2s": dict(
        vocab=8000, embed=256, channels=256, kernel=3, encoder_layers=4, decoder_layers=3,
        dropout=0.1, src_len=64, tgt_len=64, batch=32,
    ),
    "spatial": dict(
        vocab=16, image=64, conv=(32, 64, 128), hidden=256, embed=128, attention=256,
        penalty=1.0, tgt_len=8, batch=64,
    ),
}  # fmt: skip


def tokens_per_step(model: str) -> int:
    """Target tokens in one batch (padding included), what tokens/s counts."""
    setting = SETTINGS[model]
    return setting["batch"] * setting["tgt_len"]


def random_tokens(
    rng: np.random.Generator, batch: int, length: int, vocab: int, min_length: int | None = None
) -> np.ndarray:
    """int64 `[batch, length]`: random words, `min_length` (default half) to full length, eos last."""
    lengths = rng.integers(length // 2 if min_length is None else min_length, length + 1, batch)
    lengths[0] = length
    tokens = rng.integers(EOS + 1, vocab, size=(batch, length))
    positions = np.arange(length)[None, :]
    tokens = np.where(positions == lengths[:, None] - 1, EOS, tokens)
    return np.where(positions >= lengths[:, None], PAD, tokens)


def shift_right(targets: np.ndarray) -> np.ndarray:
    """The decoder's teacher-forced input `[batch, length]`: bos, then the targets but the last."""
    return np.concatenate([np.full_like(targets[:, :1], BOS), targets[:, :-1]], axis=1)


def make_batch(model: str, seed: int = 0, setting: dict | None = None) -> dict[str, np.ndarray]:
    """The numpy batch of `model` at `setting` (default its cpu-small one): 'src' `[b, s]`
    int64 (or 'image' `[b, H, W, 1]` float32 in [0, 1)), 'tgt_in' and 'tgt_out' `[b, t]` int64."""
    s = SETTINGS[model] if setting is None else setting
    rng = np.random.default_rng(seed)
    out = {}
    if model == "spatial":
        out["image"] = rng.random((s["batch"], s["image"], s["image"], 1), dtype=np.float32)
        targets = random_tokens(rng, s["batch"], s["tgt_len"], s["vocab"], min_length=3)
    else:
        out["src"] = random_tokens(rng, s["batch"], s["src_len"], s["vocab"])
        targets = random_tokens(rng, s["batch"], s["tgt_len"], s["vocab"])
    out["tgt_in"], out["tgt_out"] = shift_right(targets), targets
    return out
