"""The settings that the experiments on one benchmark share, written once.

An experiment file (`experiments/wmt14_*.py`) calls these on its
`base_config()` and then sets what its paper changes (model, optimizer,
steps, checkpoints, beam):

    config = base_config()
    wmt14_translation(config, vocab_size=37000, max_length=192, packing=True)
    set_model(config, 'transformer', 'base')   # sized for the task: set it first
    ...
    if arg == 'tiny':
        config.model.d_model = 32                 # the experiment's own small model
        wmt14_smoke_run(config)
"""

import ml_collections

from attnx.training.config import smoke_run

# newstest2013 has 3,000 sentence pairs and newstest2014 3,003: either split whole.
WMT14_EVAL_EXAMPLES = 3003


def wmt14_translation(
    config: ml_collections.ConfigDict,
    *,
    pair: str = "de-en",
    vocab_size: int,
    max_length: int,
    packing: bool = False,
    eval_batch_size: int = 64,
) -> ml_collections.ConfigDict:
    """WMT'14 translation as the papers train and evaluate it; sets `config` in place.

    Task: TFDS `wmt14_translate/{pair}` (English -> the other language unless
    `config.task.source_key` / `target_key` say otherwise), one shared
    SentencePiece vocabulary of `vocab_size` pieces, pairs of up to
    `max_length` pieces a side (longer ones are dropped), packed rows if
    `packing`. Evaluation on newstest2013 (`task.eval_split='validation'`;
    `--config.task.eval_split=test` scores newstest2014), all of it, every
    10,000 steps, in batches of `eval_batch_size`. Training logs every 100 steps.
    Beam size, length penalty and the checkpoint metric stay the experiment's.
    """
    config.task.dataset = f"wmt14_translate/{pair}"
    config.task.tokenizer = "sentencepiece"
    config.task.vocab_size = vocab_size
    config.task.max_source_length = max_length
    config.task.max_target_length = max_length
    config.task.packing = packing
    config.task.eval_split = "validation"
    config.train.log_every_steps = 100
    config.eval.every_steps = 10_000
    config.eval.batch_size = eval_batch_size
    config.eval.max_examples = WMT14_EVAL_EXAMPLES
    return config


def wmt14_smoke_run(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An experiment's `tiny` run on the real WMT'14 pipeline, in place.

    A 1,000-piece vocabulary, pairs of up to 32 pieces, and `smoke_run`'s
    schedule (20 steps on CPU). The experiment shrinks its model itself; call
    this after `set_model`, which sizes the model for the full task.
    """
    config.task.vocab_size = 1000
    config.task.max_source_length = 32
    config.task.max_target_length = 32
    return smoke_run(config)
