"""RNNsearch-50 on WMT'14 English -> French: the paper's setting.

Bahdanau, Cho & Bengio (2014), "Neural Machine Translation by Jointly
Learning to Align and Translate" (model preset `rnnsearch50`: bidirectional
GRU encoder of 1000 units a direction, GRU decoder of 1000 units, embeddings
620, alignment MLP of 1000 units, maxout deep output of 500 units; sec. 4.2,
appendix A.2), trained as in sec. 4 and appendix B:

  data       wmt14_translate/fr-en, English -> French (sec. 4.1). The paper
             trains on a 348M-word selection of the corpora (Axelrod et al.)
             with a shortlist of the 30,000 most frequent words per language;
             attnx trains on TFDS's whole training split with one shared
             SentencePiece vocabulary of 30,000 pieces, so no word is unknown.
  lengths    "-50": training pairs of up to 50 words; here up to 80 pieces a
             side (about 50 words).
  batch      80 sentence pairs (appendix B).
  optimizer  Adadelta (eps 1e-6, rho 0.95), gradients clipped to norm 1
             (appendix B; the `rnnsearch` recipe). No dropout.
  steps      300,000 updates (the paper trains about five days; our choice).
  decoding   beam 12, ranked by the raw log-probability (no length penalty).

Command (a TPU VM or a GPU machine; `--config.model.dtype=bfloat16` for
bfloat16 compute):

  python -m attnx.main --config=experiments/wmt14_rnnsearch.py --workdir=/mnt/gcs/wmt14_rnnsearch \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

The data must be prepared first (BUILD.md).

CPU smoke run (the real data pipeline, width 16, a 1,000-piece vocabulary,
20 steps):

  python -m attnx.main --config=experiments/wmt14_rnnsearch.py:tiny --workdir=/tmp/wmt14_rnnsearch_tiny

Expected: paper: 26.75 BLEU on newstest2014 (Table 1, RNNsearch-50, all
sentences; 34.16 on sentences without unknown words; 28.45 for the longer
trained RNNsearch-50*). The run evaluates on newstest2013
(`task.eval_split='validation'`) and, at its end, scores newstest2014 once
with the checkpoint of the best validation BLEU (`test/bleu`). The paper's
BLEU is multi-bleu.perl on tokenised text; `eval/bleu` is sacreBLEU (13a),
whose tokens match Moses' up to apostrophes and escapes, with `eval/chrf`
beside it.
"""

import ml_collections

from attnx.training.benchmark_tasks import wmt14_smoke_run, wmt14_translation
from attnx.training.config import base_config
from attnx.training.config_overrides import set_model
from attnx.training.optimizers import RECIPES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    wmt14_translation(config, pair="fr-en", vocab_size=30000, max_length=80, eval_batch_size=80)
    config.task.source_key = "en"
    config.task.target_key = "fr"

    set_model(config, "rnn", "rnnsearch50", dropout_rate=0.0, dtype="float32")

    config.train.update(RECIPES["rnnsearch"])
    config.train.steps = 300_000
    config.train.batch_size = 80

    config.checkpoint.every_steps = 5000
    config.checkpoint.best_metric = "eval/bleu"

    config.eval.beam_size = 12
    config.eval.alpha = 0.0

    if arg == "tiny":
        config.model.embed_dim = 16
        config.model.hidden_dim = 16
        config.model.decoder_hidden_dim = 16
        config.model.attention_dim = 16
        config.model.maxout_units = 8
        wmt14_smoke_run(config)
    elif arg is not None:
        raise ValueError(f"experiments/wmt14_rnnsearch.py: unknown arg {arg!r}; use 'tiny'")
    return config
