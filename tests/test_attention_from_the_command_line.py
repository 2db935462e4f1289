"""Attention as an experiment axis, from the command line with no file edited.

Each run is the user's command at `:tiny` size: it trains (20 steps, with an
evaluation by beam search at the end), then `--mode=decode` with the same
flags decodes the evaluation split from the checkpoint. The run's own
`config.json` records the choice, and the checkpoint holds the architecture
asked for (tests/models/test_attention_axes.py checks that each choice is
what the model computes).
"""

import csv
import json
import pathlib
import sys

import orbax.checkpoint as ocp
import preloaded
import pytest
from command_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]

CASES = {
    "transformer-entmax15": (
        "dates_transformer.py:tiny",
        ["--config.model.attention.normalizer=entmax15"],
        {"name": "transformer", "attention.normalizer": "entmax15"},
    ),
    # The experiment uses rotary positions; the flag brings back the paper's sinusoids.
    "transformer-sinusoidal": (
        "dates_transformer.py:tiny",
        ["--config.model.attention.positions=sinusoidal"],
        {"name": "transformer", "attention.positions": "sinusoidal"},
    ),
    "transformer-experiment-as-rnn": (
        "dates_transformer.py:tiny",
        ["--config.model.name=rnn"],
        {"name": "rnn", "preset": "tiny", "variant": "bahdanau"},
    ),
    "rnn-dot": (
        "dates_rnn.py:tiny",
        ["--config.model.attention.score=dot"],
        {"name": "rnn", "attention.score": "dot"},
    ),
    "convs2s-sparsemax": (
        "numbers_convs2s.py:tiny",
        ["--config.model.attention.normalizer=sparsemax"],
        {"name": "convs2s", "attention.normalizer": "sparsemax"},
    ),
}


def _run(experiment, workdir, data_dir, flags, *extra):
    result = preloaded.run(
        [
            sys.executable,
            "-m",
            "attnx.main",
            f"--config=experiments/{experiment}",
            f"--workdir={workdir}",
            f"--config.task.data_dir={data_dir}",
            *flags,
            *extra,
        ],
        cwd=ROOT,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _get(tree, dotted):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_attention_choice_trains_evaluates_and_decodes(
    case, tmp_path, dates_data_dir, numbers_data_dir
):
    experiment, flags, expected = CASES[case]
    data_dir = numbers_data_dir if experiment.startswith("numbers") else dates_data_dir
    workdir = tmp_path / "run"
    _run(experiment, workdir, data_dir, flags)

    recorded = json.loads((workdir / "config.json").read_text())["model"]
    for key, value in expected.items():
        assert _get(recorded, key) == value, key
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    final = [row for row in rows if "eval/exact_match" in row]
    assert final and final[-1]["step"] == 20 and final[-1]["eval/decoded_examples"] > 0
    params = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "20" / "state")["params"]
    if expected["name"] == "rnn":
        assert "encoder" in params and "decoder" in params

    _run(experiment, workdir, data_dir, flags, "--mode=decode")
    with open(workdir / "decode" / "predictions_step_20.tsv", encoding="utf-8") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert table[0] == ["source", "reference", "hypothesis", "score"] and len(table) > 100
