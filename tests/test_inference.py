"""`attnx.load(workdir)`: a trained run from Python, on this machine, from data only.

The tiny dates experiment, trained once for the test run in a subprocess on a
2-device mesh with sharded parameters (fsdp=2, conftest's `dates_tiny_run`), is
loaded here onto one of 8 devices; the tiny digits captioner is trained once
too, and captions an image file through `attnx.load` and through
`--mode=decode --config.decode.input=`.
The tiny models' outputs are wrong; their structure, shapes and the handling
of awkward inputs are what is checked.
"""

import logging
import pathlib
import shutil
import sys

import numpy as np
import preloaded
import pytest
from command_env import cpu_env
from PIL import Image

import attnx
from attnx.errors import RunError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def attnx_main(*argv: str, devices: int = 1, stdin: str | None = None, ok: bool = True):
    env = cpu_env(devices)
    result = preloaded.run(
        [sys.executable, "-m", "attnx.main", *argv],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def dates_run(dates_tiny_run) -> pathlib.Path:
    return dates_tiny_run  # Read only: the tests that change a run copy it first.


@pytest.fixture(scope="module")
def dates(dates_run):
    return attnx.load(dates_run)


def test_translate_gives_hypotheses_scores_and_attention(dates):
    texts = ["3 March 1974", "1 May 2001"]
    results = dates.translate(texts)
    assert [r.source for r in results] == texts
    for text, result in zip(texts, results, strict=True):
        # Character tokenizer: one source token per character, then eos.
        assert result.source_tokens == list(text) + ["</s>"]
        assert not result.truncated and result.unknown_characters == []
        [best] = result.hypotheses
        assert isinstance(best.text, str) and np.isfinite(best.score)
        assert best.log_prob <= 0 and best.alignment is None
        assert isinstance(best.attention, np.ndarray) and best.attention.dtype == np.float32
        assert best.attention.shape == (len(best.tokens), len(result.source_tokens))
        assert best.tokens[-1] == "</s>" or not best.finished
        # Every output token's attention is a distribution over the real source tokens.
        np.testing.assert_allclose(best.attention.sum(axis=1), 1.0, atol=1e-4)
    assert dates.step == 20


def test_same_inputs_same_answers_whatever_the_batch(dates):
    texts = ["3 March 1974", "1 May 2001", "12/31/99"]
    together = dates.translate(texts, batch_size=4)
    alone = [dates.translate([text], batch_size=1)[0] for text in texts]
    for a, b in zip(together, alone, strict=True):
        assert a.hypotheses[0].text == b.hypotheses[0].text
        assert a.hypotheses[0].score == pytest.approx(b.hypotheses[0].score, abs=1e-5)


def test_nbest_comes_in_score_order_with_alignments(dates):
    [result] = dates.translate(["3 March 1974"], beam_size=3, nbest=3, alignment="hard")
    assert len(result.hypotheses) == 3
    scores = [h.score for h in result.hypotheses]
    assert scores == sorted(scores, reverse=True)
    assert len({h.text for h in result.hypotheses}) == 3
    for hypothesis in result.hypotheses:
        rows = len(hypothesis.tokens) - (1 if hypothesis.finished else 0)
        assert sorted(t for _, t in hypothesis.alignment) == list(range(rows))
        assert hypothesis.alignment == sorted(hypothesis.alignment)  # Pharaoh order
        # eos is never a link's source: indices count the 12 characters only.
        assert all(0 <= s < len("3 March 1974") for s, _ in hypothesis.alignment)
        assert hypothesis.soft_alignment is None
    with pytest.raises(ValueError, match="alignment"):
        dates.translate(["3 March 1974"], alignment="yes")
    with pytest.raises(ValueError, match="nbest"):
        dates.translate(["3 March 1974"], beam_size=2, nbest=3)


def test_empty_unknown_and_overlong_inputs(dates, caplog):
    long_text = "3 March 1974 " * 10
    with caplog.at_level(logging.WARNING):
        empty, unknown, long = dates.translate(["", "Zürich ☃ 1974", long_text])
    assert empty.hypotheses == [] and empty.source_tokens is None
    assert unknown.unknown_characters == ["Z", "☃"]
    assert unknown.source_tokens[:3] == ["<unk>", "ü", "r"]
    assert unknown.hypotheses and long.hypotheses
    assert long.truncated and long.source_tokens == list(long_text[:39]) + ["</s>"]
    assert long.hypotheses[0].attention.shape[1] == 40
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("input 1:") and "'☃' (U+2603)" in m for m in messages)
    assert any(m.startswith("input 2:") and "max_source_length=40" in m for m in messages)
    assert not any(m.startswith("input 0:") for m in messages)


def test_load_reads_only_data_from_the_workdir(dates_run, tmp_path):
    # A workdir is data: nothing in it is imported, even a Python file beside the config.
    shared = tmp_path / "shared_run"
    shutil.copytree(dates_run, shared)
    (shared / "config.py").write_text("raise SystemExit('executed')\n")
    model = attnx.load(shared)
    assert model.translate(["3 March 1974"])[0].hypotheses
    assert not any(
        str(getattr(module, "__file__", None) or "").startswith(str(shared))
        for module in list(sys.modules.values())
    )


@pytest.mark.parametrize(
    "remove, needle",
    [
        ("config.json", "config.json"),
        ("vocab", "no vocabulary"),
        ("checkpoints", "no checkpoint"),
    ],
)
def test_a_missing_piece_is_a_run_error_naming_it(dates_run, tmp_path, remove, needle):
    broken = tmp_path / "run"
    shutil.copytree(dates_run, broken, ignore=shutil.ignore_patterns(remove))
    with pytest.raises(RunError, match=needle) as raised:
        attnx.load(broken)
    assert str(broken) in str(raised.value)


def test_not_a_workdir(tmp_path):
    with pytest.raises(RunError, match="not a directory"):
        attnx.load(tmp_path / "nowhere")


# --- the captioner -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_data_dir, digits_tiny_run):
    root = tmp_path_factory.mktemp("captions")
    workdir = root / "digits"
    shutil.copytree(digits_tiny_run, workdir)  # Its --mode=decode writes into the run.
    import tensorflow_datasets as tfds

    record = tfds.data_source("digit_captions", split="validation", data_dir=digits_data_dir)[0]
    image = root / "digits.png"
    Image.fromarray(record["image"][..., 0]).save(image)
    return workdir, image, record["image"]


def test_caption_an_image_file_through_both_routes(digits_run, tmp_path):
    workdir, image, pixels = digits_run
    model = attnx.load(workdir)
    assert model.image_source
    by_path, by_array, empty = model.caption([str(image), pixels, ""])
    assert by_path.source == str(image) and by_array.source == "array 1"
    assert empty.hypotheses == []
    [best] = by_path.hypotheses
    # The PNG holds the pipeline's pixels: the same caption as the array.
    assert best.text == by_array.hypotheses[0].text
    assert best.score == pytest.approx(by_array.hypotheses[0].score, abs=1e-5)
    assert by_path.source_tokens is None
    assert best.attention.shape == (len(best.tokens), 64)  # the 8 x 8 grid of digits_small
    with pytest.raises(RunError, match="no_such.png"):
        model.caption([str(tmp_path / "no_such.png")])

    # One image a batch: the first is out before the second, which cannot be read, stops the run.
    result = attnx_main(
        f"--config={ROOT}/experiments/digits_spatial.py:tiny",
        f"--workdir={workdir}",
        "--mode=decode",
        "--config.decode.input=-",
        "--config.decode.batch_size=1",
        stdin=f"{image}\n{tmp_path / 'no_such.png'}\n",
        ok=False,
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == f"S-0\t{image}"
    tag, score, text = lines[1].split("\t")
    assert tag == "H-0" and text == best.text
    assert float(score) == pytest.approx(best.score, abs=1e-5)
    assert result.returncode == 1
    [fatal] = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert fatal == result.stderr.splitlines()[-1]
    assert "line 2 of standard input" in fatal and str(tmp_path / "no_such.png") in fatal
