"""`--mode=interpret` end to end, as a user runs it, on tiny trained runs with gold.

`dates` (gold spans, the RNN) and `digit_captions` (gold boxes, the soft
captioner): a 20-step run, then the report. Untrained attention points
nowhere in particular; these tests check that every output is there, in the
documented shape, consistent with the others, and that the training record
is untouched. The scores themselves are checked against hand-made oracles in
tests/interpret/, and on trained runs in the README's table.
"""

import csv
import json
import os
import pathlib
import shutil
import sys

import preloaded
import pytest
from command_env import cpu_env

from attnx.interpret import alignment_output

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = 48


def attnx_main(*arguments: str) -> None:
    env = cpu_env()
    result = preloaded.run(
        [sys.executable, "-m", "attnx.main", *arguments],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def trained(
    workdir: pathlib.Path, experiment: str, data_dir: str, train: bool = True
) -> pathlib.Path:
    """The report of `experiment` in `workdir`, trained there first unless `train` is False."""
    common = (
        f"--config={experiment}",
        f"--workdir={workdir}",
        f"--config.task.data_dir={data_dir}",
        f"--config.interpret.max_examples={EXAMPLES}",
        "--config.interpret.page_examples=3",
        "--config.interpret.figures=2",
    )
    if train:
        attnx_main(*common)
    record = (workdir / "metrics.jsonl").read_text()
    attnx_main(*common, "--mode=interpret")
    # The training record is the training's alone.
    assert (workdir / "metrics.jsonl").read_text() == record
    return workdir / "interpret"


@pytest.fixture(scope="module")
def dates_report(tmp_path_factory, dates_data_dir):
    return trained(
        tmp_path_factory.mktemp("dates_rnn"), "experiments/dates_rnn.py:tiny", dates_data_dir
    )


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory, digits_data_dir, digits_tiny_run):
    # The shared run, trained without the interpret.* flags: they are read by the report alone.
    workdir = tmp_path_factory.mktemp("digits") / "run"
    shutil.copytree(digits_tiny_run, workdir)
    return trained(workdir, "experiments/digits_spatial.py:tiny", digits_data_dir, train=False)


def check_common(out: pathlib.Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 20 and report["examples"] == EXAMPLES
    assert report["split"] == "validation"
    assert report["checkpoint"].endswith(os.path.join("checkpoints", "20"))
    pharaoh = (out / "alignments.pharaoh").read_text().splitlines()
    with open(out / "hypotheses.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["source", "reference", "hypothesis"]
    assert len(pharaoh) == len(rows) - 1 == EXAMPLES
    for line, (_, _, hypothesis) in zip(pharaoh, rows[1:], strict=True):
        for link in line.split():
            source, target = map(int, link.split("-"))
            assert source >= 0 and 0 <= target < max(len(hypothesis), 1)
    page = (out / "index.html").read_text()
    assert "<script" in page and "http://" not in page and "https://" not in page
    pointing = report["pointing"]
    best = pointing["best"]
    assert pointing["per_head"][best["map"]]["accuracy"] == best["accuracy"]
    assert report["pointing_accuracy"] == best["accuracy"]
    assert all(v["accuracy"] <= best["accuracy"] for v in pointing["per_head"].values())
    for scores in [*pointing["per_head"].values(), pointing["alignment"], pointing["rollout"]]:
        assert 0.0 <= scores["accuracy"] <= 1.0 and 0.0 <= scores["mass"] <= 1.0
    assert (out / "figures" / f"heads_{pointing['metric']}.png").is_file()
    return report


def test_dates_report_scores_each_field_against_the_gold_spans(dates_report):
    report = check_common(dates_report)
    assert report["gold"] == "spans"
    best = report["pointing"]["best"]
    # 8 digits a date (the dashes have no span), every example scored.
    assert best["count"] == 8 * EXAMPLES
    for field in ("year", "month", "day"):
        assert 0.0 <= best[f"{field}_accuracy"] <= 1.0
    # The RNN's one attention is its 'alignment' and its rollout.
    assert report["pointing"]["alignment"]["accuracy"] == best["accuracy"]
    for name in ("example_0_heads", "example_1_rollout"):
        for suffix in ("png", "svg"):
            assert (dates_report / "figures" / f"{name}.{suffix}").stat().st_size > 0
    assert not (dates_report / "figures" / "example_2_heads.png").exists()


def test_training_evaluations_write_the_pointing_accuracy(dates_report):
    lines = (dates_report.parent / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in lines if "eval/pointing_accuracy" in line]
    assert evals and all(0.0 <= m["eval/pointing_accuracy"] <= 1.0 for m in evals)
    assert all("eval/attention_mass" in m for m in evals)


def test_digits_report_scores_the_spatial_attention_against_the_boxes(digits_report):
    report = check_common(digits_report)
    assert report["gold"] == "boxes"
    best = report["pointing"]["best"]
    assert best["map"] == "layer_0/head_0" and best["count"] >= 2 * EXAMPLES
    assert (digits_report / "figures" / "example_0_spatial.png").is_file()
    assert (digits_report / "figures" / "example_0_spatial.svg").is_file()


def test_decode_prints_the_alignments_the_report_wrote(dates_report):
    # --mode=decode over the same split, hard then soft: its lines for the examples
    # the report read are the report's alignments.pharaoh, and soft's argmax is hard.
    workdir = dates_report.parent
    common = (
        "--config=experiments/dates_rnn.py:tiny",
        f"--workdir={workdir}",
        "--mode=decode",
    )
    attnx_main(*common, "--config.decode.print_alignment=hard")
    attnx_main(*common, "--config.decode.print_alignment=soft")
    decoded = workdir / "decode"
    hard = (decoded / "alignments_step_20.pharaoh").read_text().splitlines()
    soft = (decoded / "alignments_step_20.soft").read_text().splitlines()
    predictions = (decoded / "predictions_step_20.tsv").read_text().splitlines()
    assert len(hard) == len(soft) == len(predictions) - 1 > EXAMPLES
    assert hard[:EXAMPLES] == (dates_report / "alignments.pharaoh").read_text().splitlines()
    for hard_line, soft_line in zip(hard, soft, strict=True):
        weights = alignment_output.parse_soft(soft_line)
        links = [tuple(map(int, link.split("-"))) for link in hard_line.split()]
        # One link per target token, to a most attended source token (the soft
        # weights are rounded to 4 decimals: near-ties compare within that).
        assert sorted(t for _, t in links) == list(range(weights.shape[0]))
        for source, target in links:
            assert weights[target, source] >= weights[target].max() - 1e-4
    # The second decode moved the first one's predictions aside, never over them.
    assert len(list(decoded.glob("predictions_step_20.tsv*"))) == 2
