"""ConvS2S on the bundled `number_words/en_de` task: English number words -> German.

Gehring et al. (2017): GLU convolution blocks on both sides, a separate
attention in every decoder block (multi-step attention), and the paper's
optimizer (the `convs2s` recipe, sec. 4.3: Nesterov momentum 0.99, learning
rate 0.25, gradients renormalised to norm 0.1) with one change: the learning
rate follows a half cosine to 0 over the 700 steps instead of the paper's
division by 10 when the validation perplexity stops improving (see
`get_config`; `--config.train.schedule=plateau` restores the paper's). Character
tokenizer shared by both sides; sources up to 73 characters, targets up to
65, so the learned position tables cover 128.

Command (CPU, this machine):

  python -m attnx.main --config=experiments/numbers_convs2s.py --workdir=/tmp/numbers_convs2s

CPU smoke run:

  python -m attnx.main --config=experiments/numbers_convs2s.py:tiny --workdir=/tmp/numbers_convs2s_tiny

Expected (measured 2026-12-03 on 2 CPU cores, 7.3 min, 2.1 steps/s, the
numbers already prepared; preparing them takes about 20 s more): the best
validation checkpoint (step 700) scores exact match 0.998, chrF 99.99,
character error rate 0.0005 on 512 test numbers (beam 4); validation exact
match 0.984 / 1.000 at steps 350 / 700. The 1,200-step run of 2026-12-02
reached test 1.000 (validation 0.988 / 1.000 / 1.000 at steps 400 / 800 /
1200) in 18.7 min with the test suite running beside it.
"""

import ml_collections

from attnx.training.config import base_config, smoke_run
from attnx.training.config_overrides import set_model
from attnx.training.optimizers import RECIPES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.task.dataset = "number_words/en_de"
    config.task.tokenizer = "char"
    config.task.max_source_length = 80
    config.task.max_target_length = 72

    # 'small': embeddings 128, (channels, kernel width) (128, 3) x 6 encoder and x 4
    # decoder GLU blocks, dropout 0.1. Six blocks see 13 characters, about two
    # number words; attention covers the rest.
    set_model(config, "convs2s", "small")

    config.train.update(RECIPES["convs2s"])
    # The paper's plateau schedule lets the learning rate sit at 0.25 until the
    # validation perplexity rises: here it reached exact match 0.996 by step 1000,
    # then the perplexity rose 40-fold and exact match fell to 0.879 by step 2000
    # before the plateau cut came. A half cosine from 0.25 to 0 over the run (the
    # same Nesterov momentum and clipping) settles instead of diverging.
    config.train.schedule = "cosine"
    config.train.warmup_steps = 100
    config.train.steps = 700
    config.train.batch_size = 64
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 350
    config.eval.every_steps = 350
    config.eval.max_examples = 512

    if arg == "tiny":
        set_model(config, "convs2s", "tiny")
        smoke_run(config)
        config.eval.every_steps = 10
    elif arg is not None:
        raise ValueError(f"experiments/numbers_convs2s.py: unknown arg {arg!r}; use 'tiny'")
    return config
