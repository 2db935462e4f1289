"""Show, Attend and Tell (soft attention) on MS COCO 2014: the paper's setting.

Xu et al. (2015), "Show, Attend and Tell: Neural Image Caption Generation
with Visual Attention", MS COCO with deterministic soft attention (model
preset `coco_vgg`: VGG-19 up to conv5_4 on 224 x 224 images, a 14 x 14 x 512
grid of annotations, L = 196, C = 512; an LSTM of 1800 units, embeddings
512, dropout 0.5, from the authors' released COCO defaults), trained as in
sec. 4.3 and the authors' code (github.com/kelvinxu/arctic-captions):

  data       coco_captions/2014 (Karpathy's splits in TFDS), images resized
             to 224 x 224. Each epoch pairs every image with one of its
             captions, drawn anew per epoch (`task.caption_choice='random'`),
             so training sees all captions, as the authors' code does with
             its (caption, image) pairs.
  vocabulary 10,000 entries as in the paper (sec. 5.1), here a SentencePiece
             vocabulary of 10,000 pieces trained on the captions.
  loss       cross-entropy plus the doubly stochastic attention penalty
             lambda sum_i (1 - sum_t alpha_ti)^2 with lambda = 1 (sec. 4.2.1;
             the authors' alpha_c = 1).
  optimizer  Adam, which the paper used for Flickr30k and COCO (sec. 4.3),
             with the authors' code's learning rate 2e-4 and batch 64.
  steps      50,000 (the authors stop early on validation performance; our
             choice), evaluated every 2,000 steps (their validFreq).
  decoding   beam 5 (our choice), no length penalty.

The paper's encoder is an ImageNet-trained VGG-19 that it does not fine-tune;
`coco_vgg` builds VGG-19 from random weights. Load ImageNet weights into the
`encoder` parameters, or precompute the conv5_4 features and use the preset
`coco_features` (`--config.model.preset=coco_features`) on a dataset that
holds them.

Command (a TPU VM or a GPU machine; `--config.model.dtype=bfloat16` for
bfloat16 compute). COCO's TFDS builder needs TensorFlow to prepare: build
`coco_captions/2014` as ArrayRecord on a machine with TensorFlow and copy it
into data_dir (BUILD.md):

  python -m attnx.main --config=experiments/coco_spatial.py --workdir=/mnt/gcs/coco_spatial \
      --config.task.data_dir=/mnt/gcs/tensorflow_datasets

CPU smoke run (the real data pipeline, 64 x 64 images, a three-block CNN,
width 16, a 1,000-piece vocabulary, 20 steps):

  python -m attnx.main --config=experiments/coco_spatial.py:tiny --workdir=/tmp/coco_tiny

Expected: paper: BLEU-1/2/3/4 70.7 / 49.2 / 34.4 / 24.3 and METEOR 23.90 on
COCO (Table 1, soft attention), scored against all five reference captions,
as attnx's `eval/bleu1`..`eval/bleu4` are (sacrebleu's 13a tokenisation, not
the COCO toolkit's PTB tokeniser, so expect small differences). Not run here:
no accelerator and no COCO download on this machine.
"""

import ml_collections

from attnx.training.config import base_config, smoke_run
from attnx.training.config_overrides import set_model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = base_config()
    config.task.dataset = "coco_captions/2014"
    config.task.tokenizer = "sentencepiece"
    config.task.vocab_size = 10000
    config.task.max_target_length = 32
    config.task.image_size = (224, 224)
    config.task.caption_choice = "random"

    set_model(config, "captioner", "coco_vgg", attention={"kind": "soft"}, dtype="float32")

    config.train.optimizer = "adam"
    config.train.learning_rate = 2e-4
    config.train.b1 = 0.9
    config.train.b2 = 0.999
    config.train.eps = 1e-8
    config.train.schedule = "constant"
    config.train.attention_penalty = 1.0
    config.train.steps = 50_000
    config.train.batch_size = 64
    config.train.log_every_steps = 100

    config.checkpoint.every_steps = 2000
    config.checkpoint.best_metric = "eval/bleu4"

    config.eval.every_steps = 2000
    config.eval.batch_size = 64
    config.eval.max_examples = 5000  # Karpathy's validation split: 5,000 images
    config.eval.beam_size = 5
    config.eval.alpha = 0.0

    if arg == "tiny":
        config.task.vocab_size = 1000
        config.task.max_target_length = 16
        config.task.image_size = (64, 64)
        config.model.conv_blocks = ((8,), (16,), (16,))
        config.model.pool_last_block = True  # an 8 x 8 grid
        config.model.embed_dim = 16
        config.model.hidden_dim = 32
        config.model.attention_dim = 16
        config.model.init_hidden_layers = 0
        smoke_run(config)
    elif arg is not None:
        raise ValueError(f"experiments/coco_spatial.py: unknown arg {arg!r}; use 'tiny'")
    return config
