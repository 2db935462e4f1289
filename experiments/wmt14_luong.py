"""Luong attention (local-p, input feeding) on WMT'14 English -> German: the paper's setting.

Luong, Pham & Manning (2015), "Effective Approaches to Attention-based
Neural Machine Translation", their best single system "Base + reverse +
dropout + local-p attention (general) + feed input" (model preset
`luong_4layer`: stacked LSTMs of 4 layers, 1000 cells, embeddings 1000, the
source read backwards, dropout 0.2, local-p attention with the 'general'
score and D = 10, input feeding; sec. 3, 4.1), trained as in sec. 4.1:

  data       wmt14_translate/de-en, English -> German (4.5M pairs), pairs of
             up to 50 words; here up to 80 pieces a side (about 50 words).
             The paper keeps the 50,000 most frequent words of each language
             and maps the rest to <unk>; attnx trains one shared
             SentencePiece vocabulary of 50,000 pieces, so no word is unknown
             and there are no <unk>s to replace (the paper's "unk replace",
             +1.9 BLEU, has nothing to do here).
  batch      128 sentence pairs.
  optimizer  plain SGD (no momentum), learning rate 1.0, the gradient rescaled
             whenever its norm exceeds 5.
  schedule   the paper trains 12 epochs (dropout models) and halves the
             learning rate after every epoch from the 8th on. attnx has no
             per-epoch step decay; this setting halves it whenever the
             validation perplexity stops improving, checked every 17,500
             steps (half an epoch at 128 pairs: 4.5M / 128 = 35,000 steps an
             epoch), which decays about as often once training levels off.
  steps      420,000 (12 epochs).
  decoding   beam 12, ranked by the raw log-probability (our choice: the paper
             gives no beam size).

What attnx does not reproduce: the paper initialises every parameter
uniformly in [-0.1, 0.1] (attnx's LSTMs use their own initialisers), uses a
word vocabulary with unknown-word replacement, and reports ensembles.

Evaluation: the paper reports BLEU on tokenized text (multi-bleu.perl) on
newstest2014 without compound splitting; `eval/bleu` is sacreBLEU (13a), whose
tokenisation of the hypotheses and references matches that up to apostrophes
and escapes, and `eval/chrf` is beside it. The run evaluates on newstest2013
and scores newstest2014 once at its end (`test/bleu`, the checkpoint with the
best validation BLEU).

Command (a TPU VM, e.g. v4-8 / v5litepod-8; `--config.model.dtype=bfloat16`
for bfloat16 compute):

  python -m attnx.main --config=experiments/wmt14_luong.py --workdir=/mnt/gcs/wmt14_luong \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

The data must be prepared first (BUILD.md).

CPU smoke run (the real data pipeline, 2 layers of width 16, a 1,000-piece
vocabulary, 20 steps):

  python -m attnx.main --config=experiments/wmt14_luong.py:tiny --workdir=/tmp/wmt14_luong_tiny

Expected: paper: 19.0 BLEU (perplexity 5.9) on newstest2014 for this system
without unk replacement, 20.9 with it, and 23.0 for an ensemble of 8 models
with unk replacement (Table 1). Not run here: no accelerator and no WMT
download on this machine.
"""

import ml_collections

from attnx.training.benchmark_tasks import wmt14_smoke_run, wmt14_translation
from attnx.training.config import base_config
from attnx.training.config_overrides import set_model

# 4.5M training pairs in batches of 128 (sec. 4.1).
STEPS_PER_EPOCH = 35_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    wmt14_translation(config, vocab_size=50000, max_length=80)

    set_model(config, "rnn", "luong_4layer", dtype="float32")

    config.train.optimizer = "sgd"
    config.train.momentum = 0.0
    config.train.learning_rate = 1.0
    config.train.clip_grad_norm = 5.0
    config.train.schedule = "plateau"
    config.train.plateau_metric = "eval/perplexity"
    config.train.plateau_factor = 0.5
    config.train.plateau_patience = 0
    config.train.steps = 12 * STEPS_PER_EPOCH
    config.train.batch_size = 128

    config.checkpoint.every_steps = STEPS_PER_EPOCH // 2
    config.checkpoint.best_metric = "eval/bleu"
    config.eval.every_steps = STEPS_PER_EPOCH // 2

    config.eval.beam_size = 12
    config.eval.alpha = 0.0

    if arg == "tiny":
        config.model.embed_dim = 16
        config.model.hidden_dim = 16
        config.model.encoder_layers = 2
        config.model.decoder_layers = 2
        wmt14_smoke_run(config)
    elif arg is not None:
        raise ValueError(f"experiments/wmt14_luong.py: unknown arg {arg!r}; use 'tiny'")
    return config
