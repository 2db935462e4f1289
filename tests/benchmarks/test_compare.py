"""benchmarks.compare: its parsing of the children's output and its table, on fake lines (no timing)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import compare  # noqa: E402


def run(label, ms, *, model="transformer", rss=1000.0, warmup=30.0, load=0.0, **extra):
    return dict(
        model=model,
        label=label,
        step_ms_median=ms,
        peak_rss_mb=rss,
        warmup_s=warmup,
        other_load=load,
        params=100,
        **extra,
    )


def test_parse_json_lines_keeps_only_objects():
    text = "\n".join(
        [
            "WARNING: something happened",
            json.dumps({"model": "rnn", "step_ms_median": 5.0}),
            "{not json",
            "  " + json.dumps({"a": 1}) + "  ",
            json.dumps([1, 2]),
            "",
        ]
    )
    assert compare.parse_json_lines(text) == [{"model": "rnn", "step_ms_median": 5.0}, {"a": 1}]


def test_summaries_medians_ratios_and_mfu():
    records = [
        run("attnx", 100.0, gflop_per_step=10.0, load=0.05),
        run("attnx", 120.0, gflop_per_step=10.0, rss=1100.0),
        run("attnx", 90.0, gflop_per_step=10.0, load=0.2),
        run("torch-eager", 200.0),
        run("torch-eager", 180.0),
        run("torch-eager", 220.0),
        run("flax", 50.0),
        {"model": "transformer", "label": "torch-compile", "error": "timed out after 10 s"},
    ]
    rows = {row["framework"]: row for row in compare.summarize(records, ceiling_gflops=200.0)}
    attnx, eager, flax = rows["attnx"], rows["torch-eager"], rows["flax"]
    assert attnx["step_ms"] == 100.0 and attnx["runs"] == 3
    assert attnx["tokens_per_s"] == pytest.approx(32 * 64 / 0.1)
    assert attnx["peak_rss_mb"] == 1000.0  # the median over the rounds
    assert attnx["other_load"] == 0.2  # the worst round
    # MFU: 10 GFLOP / 0.1 s / 200 GFLOP/s; the peers get attnx's FLOPs.
    assert attnx["mfu"] == pytest.approx(0.5)
    assert eager["mfu"] == pytest.approx(10.0 / 0.2 / 200.0)
    assert eager["speedup_vs_peer"] == 2.0  # the peer takes twice attnx's time
    assert flax["speedup_vs_peer"] == 0.5
    assert rows["torch-compile"]["error"] == "timed out after 10 s"
    table = compare.markdown(list(rows.values()))
    assert "| transformer | torch-eager | 200 | 10240 |" in table
    assert "2.00x" in table and "0.50x" in table
    assert "failed: timed out after 10 s" in table


def test_summaries_without_ceiling_or_flops_have_no_mfu():
    rows = compare.summarize([run("attnx", 10.0, model="rnn")], ceiling_gflops=None)
    assert rows[0]["mfu"] is None
    assert "| rnn | attnx | 10 |" in compare.markdown(rows)


def test_partly_failed_framework_counts_its_good_runs():
    records = [run("attnx", 10.0), {"model": "transformer", "label": "attnx", "error": "boom"}]
    (row,) = compare.summarize(records, None)
    assert row["runs"] == 1 and row["failed_runs"] == 1 and row["step_ms"] == 10.0


def test_commands_per_framework():
    assert compare.command("flax", "rnn", 5, 1) is None  # plain Flax: Transformer only
    assert compare.command("torch-compile", "rnn", 5, 1)[-6:] == [
        "--mode",
        "compile",
        "--steps",
        "5",
        "--warmup",
        "1",
    ]
    assert "benchmarks.train_step" in compare.command("attnx", "spatial", 5, 1)
    with pytest.raises(ValueError, match="unknown framework"):
        compare.command("tensorflow", "rnn", 5, 1)


def test_run_child_reports_a_failing_process():
    record, error = compare.run_child(
        [sys.executable, "-c", "import sys; print('{}'); sys.exit('it broke')"], timeout_s=60
    )
    assert record is None and "exit code 1" in error and "it broke" in error
    line = json.dumps({"model": "rnn", "step_ms_median": 3.0})
    record, error = compare.run_child([sys.executable, "-c", f"print('log'); print({line!r})"], 60)
    assert error == "" and record == {"model": "rnn", "step_ms_median": 3.0}
