"""Transformer on the bundled `number_words/en_fr` task: English number words -> French.

The source spells a number in English ("seventy-one thousand, two hundred
and ninety-seven"), the target in French ("soixante et onze mille deux cent
quatre-vingt-dix-sept"); French counts 70-99 in twenties ("quatre-vingt-dix-
sept" is four-twenty-ten-seven), so one English word can become three French
ones and the alignment is not one to one. Character tokenizer shared by both
sides, a small post-LN Transformer (Vaswani et al. 2017, 3 + 3 layers of
d_model 128) with the paper's Adam (0.9/0.98) and label smoothing 0.1, and
the schedule of `dates_transformer.py`: a 200-step warm-up to 3e-3, then a
half cosine to 0 over 600 steps. Rows are packed (several numbers to a row of
80 characters; attention does not cross their segment boundaries).

Command (CPU, this machine):

  python -m attnx.main --config=experiments/numbers_transformer.py --workdir=/tmp/numbers_transformer

CPU smoke run:

  python -m attnx.main --config=experiments/numbers_transformer.py:tiny --workdir=/tmp/numbers_tiny

Expected (measured 2026-12-03 on 2 CPU cores, 11.4 min, 1.16 steps/s; preparing
the numbers took 11 s more): the best validation checkpoint (step 600) scores
exact match 1.000, BLEU 100.0, chrF 100.0 on 512 test numbers (beam 4);
validation exact match 0.004 at step 300 (token accuracy 0.914: the loss was
still falling through 0.25) and 1.000 at step 600. A 1,500-step run of the same
model had validation exact match 0.998 at step 500.
"""

import ml_collections

from attnx.training.config import base_config, smoke_run
from attnx.training.config_overrides import set_model
from attnx.training.optimizers import RECIPES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.task.dataset = "number_words/en_fr"
    config.task.tokenizer = "char"
    # The longest numbers in either language have 73 characters ('quatre cent
    # quatre-vingt-quatorze mille quatre cent quatre-vingt-quatorze').
    config.task.max_source_length = 80
    config.task.max_target_length = 80

    # 'small' (d_model 128, 4 heads, d_ff 512) with 3 + 3 layers, rotary positions and
    # no dropout, as in dates_transformer.py (30,000 distinct numbers over a few
    # epochs are not memorised).
    set_model(
        config,
        "transformer",
        "small",
        num_encoder_layers=3,
        num_decoder_layers=3,
        dropout_rate=0.0,
    )
    config.model.attention.positions = "rotary"
    # Half the numbers have at most three digits (at most ~30 characters): packing
    # several into each row of 80 trains on about twice the examples per step.
    config.task.packing = True

    # The paper's Adam (0.9, 0.98, 1e-9) and label smoothing; the half cosine of
    # dates_transformer.py lets the last steps settle where the paper's inverse
    # square root would still hold a high rate.
    config.train.update(RECIPES["transformer_cosine"])
    config.train.label_smoothing = 0.1
    config.train.steps = 600
    config.train.batch_size = 64
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 300
    config.eval.every_steps = 300
    config.eval.max_examples = 512

    if arg == "tiny":
        set_model(
            config,
            "transformer",
            "tiny",
            d_model=32,
            d_ff=64,
            num_encoder_layers=1,
            num_decoder_layers=1,
        )
        config.model.attention.positions = "rotary"
        smoke_run(config)
        # A short warm-up, so that a smoke run of a few steps still has a cosine to follow.
        config.train.warmup_steps = 2
    elif arg is not None:
        raise ValueError(f"experiments/numbers_transformer.py: unknown arg {arg!r}; use 'tiny'")
    return config
