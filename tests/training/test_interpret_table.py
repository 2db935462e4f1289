"""The interpretability table from hand-written reports and configs."""

import json

import pytest

from attnx.training import interpret_table


def write_run(path, model, report):
    (path / "interpret").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": model}))
    (path / "interpret" / "report.json").write_text(json.dumps(report))
    return str(path)


REPORT = {
    "step": 4000,
    "split": "test",
    "examples": 256,
    "gold": "spans",
    "pointing": {
        "metric": "accuracy",
        "per_head": {"layer_1/head_2": {"accuracy": 0.91, "mass": 0.7}},
        "alignment": {"accuracy": 0.8, "mass": 0.6},
        "rollout": {"accuracy": 0.55, "mass": 0.4},
        "best": {"map": "layer_1/head_2", "accuracy": 0.91, "mass": 0.7},
    },
    "pointing_accuracy": 0.91,
    "attention_mass": 0.7,
    "faithfulness": {"erasure": {"random": {"aopc_comprehensiveness": 0.13}}},
    "comprehensiveness": 0.463,
    "uniform_attention_gap": 0.405,
    "kendall_tau_gradient": 0.031,
}


def test_rows_read_the_report_and_name_the_attention(tmp_path):
    luong = write_run(
        tmp_path / "dates_local",
        {"name": "rnn", "variant": "luong", "attention": {"local": "local_p", "score": "general"}},
        REPORT,
    )
    # No gold and no faithfulness: dashes, not zeros.
    plain = write_run(
        tmp_path / "numbers",
        {"name": "convs2s", "attention": {"normalizer": "entmax15"}},
        {"step": 10, "split": "validation", "examples": 8, "gold": None},
    )
    lines = interpret_table.table([luong, plain]).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == len(interpret_table.COLUMNS) + 1
    cells = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert cells == [
        "dates_local",
        "RNN, Luong general, local_p",
        "4000",
        "test (256)",
        "0.910",
        "`layer_1/head_2`",
        "0.700",
        "0.550 / 0.800",
        "0.463 (0.130)",
        "0.405",
        "0.03",
    ]
    cells = [cell.strip() for cell in lines[3].strip("|").split("|")]
    assert cells[1] == "ConvS2S, multi-step, entmax15"
    assert cells[4:] == ["-"] * 7


@pytest.mark.parametrize(
    "model, name",
    [
        ({"name": "transformer"}, "Transformer"),
        ({"name": "rnn", "variant": "bahdanau"}, "RNN, Bahdanau"),
        ({"name": "captioner", "attention": {"kind": "hard"}}, "Show, Attend and Tell, hard"),
    ],
)
def test_describe_attention(model, name):
    assert interpret_table.describe_attention(model) == name


def test_a_workdir_without_a_report_is_one_fatal_line(tmp_path, capsys):
    assert interpret_table.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("FATAL ") and str(tmp_path / "interpret" / "report.json") in err
    assert "\n" not in err
