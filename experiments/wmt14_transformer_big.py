"""Transformer (big) on WMT'14 English -> German: the paper's setting.

Vaswani et al. (2017), "Attention Is All You Need", Table 3 row "big"
(model preset `big`: N = 6, d_model = 1024, d_ff = 4096, h = 16,
P_drop = 0.3) trained as in sec. 5:

  data       wmt14_translate/de-en, English -> German (sec. 5.1), one shared
             SentencePiece vocabulary of 37,000 pieces (the paper: shared
             byte-pair encoding of about 37,000 tokens; attnx trains a
             SentencePiece unigram model on the training text).
  batch      about 25,000 source and 25,000 target tokens per step (sec. 5.1):
             packed rows, 128 rows x 192 tokens = 24,576 tokens per side
             (pairs longer than 192 pieces are dropped).
  optimizer  Adam(0.9, 0.98, 1e-9), lr = d_model^-0.5 min(s^-0.5, s 4000^-1.5)
             (sec. 5.3, the `transformer` recipe); label smoothing 0.1 (sec. 5.4).
  steps      300,000 (sec. 5.2: 3.5 days on 8 P100s, 1.0 s a step).
  averaging  the final model averages the last 20 checkpoints, written every
             600 steps (the paper: every 10 minutes, i.e. 600 steps at 1.0 s;
             sec. 6.1).
  decoding   beam 4, length penalty alpha = 0.6 (sec. 6.1).

For English -> French the paper used P_drop = 0.1 (sec. 6.1):
`--config.model.dropout_rate=0.1` with `--config.task.dataset=wmt14_translate/fr-en`.

Command (a TPU VM, e.g. v3-8 / v4-8; `--config.model.dtype=bfloat16` for
bfloat16 compute with float32 parameters; `--config.mesh.fsdp=N` to shard the
parameters and optimizer state over N devices):

  python -m attnx.main --config=experiments/wmt14_transformer_big.py --workdir=/mnt/gcs/wmt14_big \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

The data must be prepared first (BUILD.md).

CPU smoke run (the real data pipeline, a 1-layer model of width 32, a
1,000-piece vocabulary, 20 steps):

  python -m attnx.main --config=experiments/wmt14_transformer_big.py:tiny --workdir=/tmp/wmt14_big_tiny

Expected: paper: 28.4 BLEU on newstest2014 (Table 2, last 20 checkpoints
averaged) and 26.4 BLEU / perplexity 4.33 on newstest2013 (Table 3, no
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

    set_model(config, "transformer", "big", dtype="float32")

    config.train.update(RECIPES["transformer"])
    config.train.label_smoothing = 0.1
    config.train.steps = 300_000
    config.train.batch_size = 128

    config.checkpoint.every_steps = 600
    config.checkpoint.keep = 20
    config.checkpoint.average_last = 20
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
        raise ValueError(f"experiments/wmt14_transformer_big.py: unknown arg {arg!r}; use 'tiny'")
    return config
