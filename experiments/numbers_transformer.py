"""Transformer on the bundled `number_words/en_de` task: English number words -> German.

The source spells a number in English ("seventy-one thousand, two hundred
and twenty-four"), the target in German ("einundsiebzigtausendzweihundert-
vierundzwanzig"); German puts the units before the tens, so the alignment is
not monotonic and the model has to reorder. Character tokenizer shared by
both sides (sources up to 73 characters, targets up to 65), a small post-LN
Transformer (Vaswani et al. 2017) with the paper's recipe (Adam 0.9/0.98,
inverse-square-root warm-up) and label smoothing 0.1.

Command (CPU, this machine):

  python -m attnx.main --config=experiments/numbers_transformer.py --workdir=/tmp/numbers_transformer

CPU smoke run:

  python -m attnx.main --config=experiments/numbers_transformer.py:tiny --workdir=/tmp/numbers_tiny

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

    # 'small' (d_model 128, 4 heads, d_ff 512, dropout 0.1) with 3 + 3 layers.
    set_model(config, "transformer", "small", num_encoder_layers=3, num_decoder_layers=3)

    config.train.update(RECIPES["transformer"])
    config.train.learning_rate = 1.0
    config.train.warmup_steps = 1000
    config.train.label_smoothing = 0.1
    config.train.steps = 6000
    config.train.batch_size = 64
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 1000
    config.eval.every_steps = 2000
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
        smoke_run(config)
    elif arg is not None:
        raise ValueError(f"experiments/numbers_transformer.py: unknown arg {arg!r}; use 'tiny'")
    return config
