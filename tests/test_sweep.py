"""attnx.sweep: trial lists, names, launch commands and a tiny local sweep."""

import itertools
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from attnx import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_sweep(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # trials on one CPU device: the fastest on a small machine
    return subprocess.run(
        [sys.executable, "-m", "attnx.sweep", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_product_is_the_cartesian_product_first_axis_slowest():
    rates, widths = [0.5, 1.0, 2.0], [64, 128]
    trials = sweep.product({"train.learning_rate": rates}, **{"model.d_model": widths})
    expected = [
        {"train.learning_rate": r, "model.d_model": w} for r, w in itertools.product(rates, widths)
    ]
    assert trials == expected
    assert list(trials[0]) == ["train.learning_rate", "model.d_model"]


def test_zip_aligns_the_axes():
    trials = sweep.zip_({"model.d_model": [64, 128], "model.d_ff": [256, 512]})
    assert trials == [
        {"model.d_model": 64, "model.d_ff": 256},
        {"model.d_model": 128, "model.d_ff": 512},
    ]
    with pytest.raises(ValueError, match="different lengths"):
        sweep.zip_({"model.d_model": [64, 128], "model.d_ff": [256]})


def test_axis_errors_name_the_axis():
    with pytest.raises(TypeError, match="train.optimizer"):
        sweep.product({"train.optimizer": "adam"})  # a string, not a list of strings
    with pytest.raises(ValueError, match="model.d_model"):
        sweep.product({"model.d_model": []})


def test_trial_name_is_readable_and_safe():
    assert (
        sweep.trial_name({"train.learning_rate": 0.001, "model.d_model": 64})
        == "train.learning_rate=0.001,model.d_model=64"
    )
    assert sweep.trial_name({}) == "default"
    name = sweep.trial_name({"task.image_size": (224, 224), "task.dataset": "number_words/en de"})
    assert name == "task.image_size=224x224,task.dataset=number_words_en_de"
    long_a = sweep.trial_name({"model.name": "a" * 300})
    long_b = sweep.trial_name({"model.name": "a" * 299 + "b"})
    assert len(long_a) <= 120 and long_a != long_b


def test_values_format_as_the_config_flags_parse_them():
    assert sweep.override_flags({"a.b": True, "a.c": 1e-3, "a.d": (1, 2), "a.e": "x y"}) == [
        "--config.a.b=true",
        "--config.a.c=0.001",
        "--config.a.d=(1, 2)",
        "--config.a.e=x y",
    ]
    with pytest.raises(ValueError, match="None"):
        sweep.format_value(None)


def test_tpu_command_round_trips_through_the_shell():
    main_argv = sweep.trial_command(
        "experiments/dates_transformer.py:tiny", "gs://b/root/x=1,y=2", {"task.dataset": "a b"}
    )
    line = sweep.tpu_command(main_argv, "my-tpu", "us-central2-b")
    argv = shlex.split(line)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--zone=us-central2-b" in argv and "--worker=all" in argv
    (command,) = [a for a in argv if a.startswith("--command=")]
    remote = shlex.split(command[len("--command=") :])
    assert remote[:3] == ["cd", "attnx", "&&"]
    assert remote[3:] == main_argv


def test_print_mode_prints_one_gcloud_command_per_trial():
    result = run_sweep(
        "--config=experiments/dates_transformer.py",
        "--workdir=/mnt/gcs/sweeps/dates",
        "--run=print",
        "--tpu_name=my-tpu",
        "--zone=europe-west4-a",
        "--config.train.steps=100",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    module_trials = sweep.load_sweep(str(ROOT / "experiments/dates_transformer.py"))
    assert len(lines) == len(module_trials) == 6
    for line, trial in zip(lines, module_trials, strict=True):
        argv = shlex.split(line)
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
        (command,) = [a for a in argv if a.startswith("--command=")]
        remote = shlex.split(command[len("--command=") :])
        assert remote[3:6] == ["python", "-m", "attnx.main"]
        assert f"--workdir=/mnt/gcs/sweeps/dates/{sweep.trial_name(trial)}" in remote
        assert "--config=experiments/dates_transformer.py" in remote
        assert "--config.train.steps=100" in remote  # the common override reaches every trial
        for flag in sweep.override_flags(trial):
            assert flag in remote


def test_a_bucket_url_as_root_is_refused_with_advice():
    result = run_sweep(
        "--config=experiments/dates_transformer.py",
        "--workdir=gs://bucket/sweeps/dates",
        "--run=print",
        "--tpu_name=my-tpu",
        timeout=120,
    )
    assert result.returncode != 0
    assert "--workdir=gs://bucket/sweeps/dates" in result.stderr and "gcsfuse" in result.stderr
    assert result.stdout == ""


def test_a_bad_trial_stops_the_sweep_before_anything_runs(tmp_path):
    result = run_sweep(
        "--config=experiments/dates_transformer.py",
        f"--workdir={tmp_path}",
        "--config.train.batch_size=0",
        timeout=120,
    )
    assert result.returncode != 0
    assert "config.train.batch_size" in result.stderr
    assert not any(tmp_path.iterdir())


def test_tiny_sweep_runs_locally_and_tabulates(tmp_path):
    result = run_sweep(
        "--config=experiments/dates_transformer.py:tiny",
        f"--workdir={tmp_path}",
        "--run=local",
        "--config.train.steps=4",
        "--config.eval.every_steps=4",
        "--config.checkpoint.every_steps=4",
        "--config.eval.max_examples=8",
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    names = ["train.learning_rate=0.5", "train.learning_rate=1.0"]
    for name in names:
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert max(m["step"] for m in metrics) == 4
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert [row["trial"] for row in rows] == names
    for row in rows:
        metrics = [json.loads(line) for line in (tmp_path / row["trial"] / "metrics.jsonl").open()]
        last = {}
        for record in metrics:
            last.update(record)
        assert row["status"] == "ok"
        assert row["metrics"] == last
        assert "eval/exact_match" in row["metrics"] and "train/loss" in row["metrics"]
    # The learning rate reached each trial: the logged rate scales with it.
    lr = [row["metrics"]["train/learning_rate"] for row in rows]
    assert lr[1] == pytest.approx(2 * lr[0])
    table = (tmp_path / "results.md").read_text().strip().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header[:5] == ["trial", "status", "seconds", "train.learning_rate", "step"]
    assert len(table) == 2 + len(names)
    for line, name in zip(table[2:], names, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == name and cells[1] == "ok" and cells[4] == "4"
        loss = next(r for r in rows if r["trial"] == name)["metrics"]["train/loss"]
        assert cells[header.index("train/loss")] == f"{loss:.4g}"
