"""ConvS2S on the bundled `number_words/en_de` task: English number words -> German.

Gehring et al. (2017): GLU convolution blocks on both sides, a separate
attention in every decoder block (multi-step attention), and the paper's
optimizer (the `convs2s` recipe, sec. 4.3): Nesterov momentum 0.99,
learning rate 0.25, gradients renormalised to norm 0.1, and the learning rate
divided by 10 whenever the validation perplexity (`eval/perplexity`) stops
improving (plateau schedule, checked at every evaluation). Character
tokenizer shared by both sides; sources up to 73 characters, targets up to
65, so the learned position tables cover 128.

Command (CPU, this machine):

  python -m attnx.main --config=experiments/numbers_convs2s.py --workdir=/tmp/numbers_convs2s

CPU smoke run:

  python -m attnx.main --config=experiments/numbers_convs2s.py:tiny --workdir=/tmp/numbers_convs2s_tiny

Expected: see README results table.
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
    config.train.plateau_metric = "eval/perplexity"
    config.train.steps = 6000
    config.train.batch_size = 64
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 1000
    config.eval.max_examples = 512

    if arg == "tiny":
        set_model(config, "convs2s", "tiny")
        smoke_run(config)
        config.eval.every_steps = 10
    elif arg is not None:
        raise ValueError(f"experiments/numbers_convs2s.py: unknown arg {arg!r}; use 'tiny'")
    return config
