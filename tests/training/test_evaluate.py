"""attnx.training.evaluate: beam-search metrics scored against every reference of a record."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import sacrebleu
from flax import nnx

from attnx import decoding
from attnx.data.tokenizers import CharacterTokenizer
from attnx.models.captioner import Captioner, tiny
from attnx.training import evaluate, steps

MAX_LENGTH = 6


def test_caption_metrics_use_every_reference_of_the_record(tmp_path):
    model = Captioner(tiny(), rngs=nnx.Rngs(0))
    tokenizer = CharacterTokenizer("abcdefg")  # 4 special ids + 7 = the tiny vocab of 11
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(4, 16, 16, 1)).astype(np.float32)
    targets = rng.integers(4, 11, (4, MAX_LENGTH)).astype(np.int32)
    targets[:, -1] = 2
    targets[3] = 0  # a padding row: no example, index -1
    batch = {
        "image": jnp.asarray(images),
        "targets": jnp.asarray(targets),
        "index": jnp.asarray([5, 2, 7, -1], jnp.int32),
    }
    eval_config = ml_collections.ConfigDict(
        dict(
            max_examples=100,
            beam_size=2,
            length_penalty="gnmt",
            alpha=0.6,
            num_plots=0,
            bleu_tokenize="char",
        )
    )
    # The hypotheses, decoded independently of the evaluator.
    result = decoding.beam_search(model, batch["image"], beam_size=2, max_length=MAX_LENGTH)
    hypotheses = [tokenizer.decode(row) for row in np.asarray(result.sequences[:3, 0])]
    references = {
        5: ["gg", hypotheses[0]],
        2: [hypotheses[1], "a"],
        7: ["bcd", "cde"],
    }
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    eval_step = jax.jit(steps.make_eval_step(graphdef, rest, label_smoothing=0.0))
    predictions = tmp_path / "predictions.tsv"
    results, _ = evaluate.evaluate(
        model=model,
        params=params,
        eval_step=eval_step,
        batches=[batch],
        tokenizer=tokenizer,
        eval_config=eval_config,
        max_target_length=MAX_LENGTH,
        captions=True,
        plot_dir=None,
        references_of=lambda index: references[index],
        predictions_path=str(predictions),
    )
    assert results["eval/decoded_examples"] == 3
    # Two hypotheses equal one of their references (not the row's targets).
    assert results["eval/exact_match"] == 2 / 3
    streams = [[references[i][k] for i in (5, 2, 7)] for k in range(2)]
    bleu = sacrebleu.BLEU(tokenize="char", smooth_method="none", max_ngram_order=1)
    expected = bleu.corpus_score(hypotheses, streams).score
    np.testing.assert_allclose(results["eval/bleu1"], expected, atol=1e-6)
    lines = predictions.read_text().splitlines()
    assert lines == [f"{references[i][0]}\t{h}" for i, h in zip((5, 2, 7), hypotheses, strict=True)]
