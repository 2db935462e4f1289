"""ConvS2S on WMT'14 English -> German: the paper's setting.

Gehring, Auli, Grangier, Yarats & Dauphin (2017), "Convolutional Sequence to
Sequence Learning", WMT'14 English-German (model preset `wmt14_en_de`,
sec. 5.1: 15 encoder and 15 decoder GLU blocks, 512 channels in the first ten,
768 in the next three, then two blocks of 2048 with kernel width 1;
embeddings 512; dropout 0.2), trained as in the paper's sec. 4:

  data       wmt14_translate/de-en, English -> German, one shared vocabulary of
             40,000 SentencePiece pieces (the paper: 40K joint BPE types).
  batch      64 sentence pairs, up to 128 pieces a side (our
             bound; longer pairs are dropped).
  optimizer  Nesterov momentum 0.99, learning rate 0.25, gradients
             renormalised when their norm exceeds 0.1, and the learning rate
             divided by 10 whenever the validation perplexity stops improving
             (the `convs2s` recipe; the plateau is checked at every evaluation,
             every 10,000 steps, on newstest2013). No label smoothing.
  steps      400,000 (about six passes over the 4.5M pairs). The paper trains
             until the decayed learning rate falls below 1e-4 and gives no step
             count; stop early once `train/learning_rate` is below 1e-4.
  decoding   beam 5, log-likelihood normalised by the length:
             length penalty 'power' with alpha 1 (lp(n) = n).

Command (a TPU VM or a GPU machine; `--config.model.dtype=bfloat16` for
bfloat16 compute):

  python -m attnx.main --config=experiments/wmt14_convs2s.py --workdir=/mnt/gcs/wmt14_convs2s \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

The data must be prepared first (BUILD.md).

CPU smoke run (the real data pipeline, two blocks of 16 channels a side, a
1,000-piece vocabulary, 20 steps):

  python -m attnx.main --config=experiments/wmt14_convs2s.py:tiny --workdir=/tmp/wmt14_convs2s_tiny

Expected: paper: 25.16 BLEU on newstest2014 (Table 1, ConvS2S, BPE 40K).
The plateau needs the validation split, so the run evaluates on newstest2013
and, at its end, scores newstest2014 once with the checkpoint of the best
validation perplexity (`test/bleu`). The paper's BLEU is multi-bleu.perl on
Moses-tokenised text without compound splitting; `eval/bleu` is sacreBLEU
(13a), whose tokens match Moses' up to apostrophes and escapes, with
`eval/chrf` beside it.
"""

import ml_collections

from attnx.training.benchmark_tasks import wmt14_smoke_run, wmt14_translation
from attnx.training.config import base_config
from attnx.training.config_overrides import set_model
from attnx.training.optimizers import RECIPES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    wmt14_translation(config, vocab_size=40000, max_length=128)

    set_model(config, "convs2s", "wmt14_en_de", dtype="float32")

    config.train.update(RECIPES["convs2s"])
    config.train.plateau_metric = "eval/perplexity"
    config.train.label_smoothing = 0.0
    config.train.steps = 400_000
    config.train.batch_size = 64

    config.checkpoint.every_steps = 5000
    config.checkpoint.best_metric = "eval/perplexity"
    config.checkpoint.best_mode = "min"

    config.eval.beam_size = 5
    config.eval.length_penalty = "power"
    config.eval.alpha = 1.0

    if arg == "tiny":
        config.model.embed_dim = 16
        config.model.encoder_layers = ((16, 3),) * 2
        config.model.decoder_layers = ((16, 3),) * 2
        config.model.decoder_out_embed_dim = 16
        wmt14_smoke_run(config)
        config.eval.every_steps = 10
    elif arg is not None:
        raise ValueError(f"experiments/wmt14_convs2s.py: unknown arg {arg!r}; use 'tiny'")
    return config
