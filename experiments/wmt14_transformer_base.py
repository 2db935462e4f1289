"""Transformer (base) on WMT'14 English -> German: the paper's setting.

Vaswani et al. (2017), "Attention Is All You Need", Table 3 row "base"
(model preset `base`: N = 6, d_model = 512, d_ff = 2048, h = 8,
P_drop = 0.1) trained as in sec. 5:

  data       wmt14_translate/de-en, English -> German (sec. 5.1), one shared
             SentencePiece vocabulary of 37,000 pieces (the paper: shared
             byte-pair encoding of about 37,000 tokens; attnx trains a
             SentencePiece unigram model on the training text).
  batch      about 25,000 source and 25,000 target tokens per step (sec. 5.1):
             packed rows (several sentences per row), 128 rows x 192 tokens =
             24,576 tokens per side. 128 rows divide every power-of-two mesh
             up to 128 devices; sentence pairs longer than 192 pieces (a
             fraction of a percent) are dropped.
  optimizer  Adam(0.9, 0.98, 1e-9), lr = d_model^-0.5 min(s^-0.5, s 4000^-1.5)
             (sec. 5.3, the `transformer` recipe); label smoothing 0.1 (sec. 5.4).
  steps      100,000 (sec. 5.2: 12 hours on 8 P100s, 0.4 s a step).
  averaging  the final model averages the last 5 checkpoints, written every
             1,500 steps (the paper: every 10 minutes, i.e. 1,500 steps at
             0.4 s; sec. 6.1).
  decoding   beam 4, length penalty alpha = 0.6 (Wu et al.'s GNMT penalty, sec. 6.1).

Command (a TPU VM, e.g. v3-8 / v4-8; `--config.model.dtype=bfloat16` for
bfloat16 compute with float32 parameters):

  python -m attnx.main --config=experiments/wmt14_transformer_base.py --workdir=/mnt/gcs/wmt14_base \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

The data must be prepared first (BUILD.md: TFDS downloads and writes
`wmt14_translate/de-en` as ArrayRecord files into data_dir, which needs network).

CPU smoke run (the real data pipeline, a 1-layer model of width 32, a
1,000-piece vocabulary, 20 steps):

  python -m attnx.main --config=experiments/wmt14_transformer_base.py:tiny --workdir=/tmp/wmt14_tiny

Expected: paper: 27.3 BLEU on newstest2014 (Table 2, last 5 checkpoints
averaged) and 25.8 BLEU / perplexity 4.92 on newstest2013 (Table 3, no
averaging). The run evaluates on newstest2013 (`task.eval_split='validation'`)
and, at its end, scores newstest2014 once with the checkpoint of the best
validation BLEU (`test/...`) and with the averaged checkpoints
(`test_averaged/...`, the paper's Table 2 setting). The paper's BLEU is
tokenized with compound splitting: `eval/tokenized_bleu` (and
`test_averaged/tokenized_bleu`) computes it that way
(`attnx.training.string_metrics.tokenized_bleu`); `eval/bleu` beside it is
sacreBLEU on detokenised text, which runs below it, and `eval/chrf` is chrF.
"""

import ml_collections

from attnx.training.benchmark_tasks import wmt14_smoke_run, wmt14_translation
from attnx.training.config import base_config
from attnx.training.config_overrides import set_model
from attnx.training.optimizers import RECIPES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    wmt14_translation(config, vocab_size=37000, max_length=192, packing=True)

    set_model(config, "transformer", "base", dtype="float32")

    config.train.update(RECIPES["transformer"])
    config.train.label_smoothing = 0.1
    config.train.steps = 100_000
    config.train.batch_size = 128

    config.checkpoint.every_steps = 1500
    config.checkpoint.keep = 5
    config.checkpoint.average_last = 5
    config.checkpoint.best_metric = "eval/bleu"

    config.eval.beam_size = 4
    config.eval.length_penalty = "gnmt"
    config.eval.alpha = 0.6
    config.eval.tokenized_bleu = True

    if arg == "tiny":
        config.model.d_model = 32
        config.model.num_heads = 2
        config.model.d_ff = 64
        config.model.num_encoder_layers = 1
        config.model.num_decoder_layers = 1
        wmt14_smoke_run(config)
        config.checkpoint.every_steps = 5
        config.checkpoint.keep = 2
        config.checkpoint.average_last = 2
    elif arg is not None:
        raise ValueError(f"experiments/wmt14_transformer_base.py: unknown arg {arg!r}; use 'tiny'")
    return config
