"""End to end: the main job's command on a tiny experiment, run as a user runs it.

Every run is a subprocess (`python -m attnx.main ...`) so that device counts,
processes and signals are real. The runs are shared by the tests below
(module-scoped fixtures), since each costs a compilation.
"""

import filecmp
import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import preloaded
import pytest
from command_env import cpu_env

from attnx.data import prepare

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPERIMENT = "experiments/dates_transformer.py:tiny"
STEPS = 20


@pytest.fixture(scope="module")
def data_dir(dates_data_dir) -> str:
    return dates_data_dir


def command(workdir, data_dir, *overrides, extra=()):
    return [
        sys.executable,
        "-m",
        "attnx.main",
        f"--config={EXPERIMENT}",
        f"--workdir={workdir}",
        f"--config.task.data_dir={data_dir}",
        *overrides,
        *extra,
    ]


def run(workdir, data_dir, *overrides, devices=8, timeout=900):
    result = preloaded.run(
        command(workdir, data_dir, *overrides),
        env=cpu_env(devices),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(workdir) -> list[dict]:
    lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def final_metrics(workdir) -> dict:
    """Every row of the last step merged: validation, then the test split's final evaluation."""
    merged = {}
    for row in metrics(workdir):
        if row["step"] == STEPS:
            merged.update(row)
    return merged


def train_loss(workdir, step=STEPS) -> float:
    return next(
        m["train/loss"] for m in metrics(workdir) if m["step"] == step and "train/loss" in m
    )


def saved_params(workdir, step=STEPS):
    state = ocp.StandardCheckpointer().restore(
        pathlib.Path(workdir, "checkpoints", str(step), "state")
    )
    return state["params"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory, data_dir):
    """The tiny experiment on 8 devices with data, fsdp and tensor axes of 2."""
    workdir = tmp_path_factory.mktemp("sharded")
    run(workdir, data_dir, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
    return workdir


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("single")
    run(workdir, data_dir, devices=1)
    return workdir


def test_main_job_writes_checkpoints_metrics_events_and_plots(sharded_run):
    assert (sharded_run / "checkpoints" / str(STEPS)).is_dir()
    logged = metrics(sharded_run)
    assert any("train/loss" in m for m in logged)
    # Throughput (evaluations excluded) and the run's wall time, for sweeps' tables.
    train_rows = [m for m in logged if "train/loss" in m]
    assert all(m["train/steps_per_second"] > 0 for m in train_rows[1:])
    walls = [m["train/wall_seconds"] for m in train_rows]
    assert walls == sorted(walls) and walls[-1] > 0
    final = [m for m in logged if "eval/bleu" in m]
    assert final and final[-1]["step"] == STEPS and "eval/exact_match" in final[-1]
    assert list((sharded_run / "tensorboard").glob("events.out.tfevents.*"))
    assert list((sharded_run / "plots" / f"step_{STEPS}").glob("alignment_*.png"))
    assert (sharded_run / "vocab" / "tokenizer.json").is_file()


def test_the_best_checkpoint_is_scored_once_on_the_test_split(sharded_run):
    rows = [m for m in metrics(sharded_run) if any(k.startswith("test/") for k in m)]
    assert len(rows) == 1, "one test evaluation, at the end"
    [row] = rows
    # Step 20 is the only evaluated checkpoint (eval.every_steps=20), so it is the best.
    assert row["step"] == STEPS and row["test/checkpoint_step"] == STEPS
    assert {"test/exact_match", "test/bleu", "test/chrf", "test/char_error_rate"} <= set(row)
    assert not any(k.startswith("eval/") for k in row)
    assert list((sharded_run / "plots" / f"test_{STEPS}").glob("alignment_*.png"))


def test_eval_mode_scores_the_split_it_is_given(tmp_path, data_dir, sharded_run):
    workdir = tmp_path / "eval_test"
    shutil.copytree(sharded_run, workdir)
    run(workdir, data_dir, "--mode=eval", "--config.eval.split=test", devices=1)
    [row] = [json.loads(line) for line in (workdir / "eval" / "metrics.jsonl").open()]
    assert row["mode"] == "eval" and row["step"] == STEPS
    assert "test/exact_match" in row and not any(k.startswith("eval/") for k in row)
    assert (workdir / "eval" / "plots" / f"test_step_{STEPS}").is_dir()
    # The newest checkpoint is the best one here: training's test row scored the same.
    [training] = [m for m in metrics(workdir) if "test/loss" in m]
    np.testing.assert_allclose(row["test/loss"], training["test/loss"], rtol=EVAL_LOSS_RTOL)


# Cross-mesh tolerances, measured on this experiment over 8 seeds (1 device against
# 8 devices and against 2 processes x 4 devices, 10 pairs): rounding from another
# reduction order moved the step-20 train loss by at most 3.9e-6 and the final
# eval loss by at most 9.0e-5 (Adam's normalised updates enlarge it over 20
# steps); one lost training step (19 steps instead of 20) moved the eval loss by
# 7.5e-4 to 1.1e-2, and another batch moves the train loss by 0.3% to 3%.
TRAIN_LOSS_RTOL = 1e-4  # 25x the worst rounding, 30x under the smallest bug.
EVAL_LOSS_RTOL = 3e-4  # 3x the worst rounding, 2.5x under the smallest bug.


def test_same_loss_on_one_device_and_a_sharded_mesh(sharded_run, single_device_run):
    np.testing.assert_allclose(
        train_loss(single_device_run), train_loss(sharded_run), rtol=TRAIN_LOSS_RTOL
    )


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_dir):
    """The tiny experiment in 2 local processes of 4 devices each (jax.distributed, gloo)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    workdir = tmp_path_factory.mktemp("two_processes")
    processes = [
        subprocess.Popen(
            command(
                workdir,
                data_dir,
                extra=(
                    "--distributed",
                    f"--coordinator_address=localhost:{port}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ),
            ),
            env=cpu_env(4),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    return workdir


def test_same_loss_in_two_processes_as_in_one(two_process_run, single_device_run):
    # Every process reads its rows of the same global batches, so two
    # processes of 4 devices train exactly as one process of 1 device.
    workdir = two_process_run
    np.testing.assert_allclose(
        train_loss(workdir), train_loss(single_device_run), rtol=TRAIN_LOSS_RTOL
    )
    final = {name: final_metrics(name) for name in (workdir, single_device_run)}
    np.testing.assert_allclose(
        final[workdir]["eval/loss"], final[single_device_run]["eval/loss"], rtol=EVAL_LOSS_RTOL
    )
    # Counts: every evaluation example read once, by one of the processes.
    for key in ("eval/exact_match", "eval/decoded_examples", "test/exact_match"):
        assert final[workdir][key] == final[single_device_run][key], key
    assert (workdir / "checkpoints" / str(STEPS)).is_dir()


def resume(workdir, copy_to, data_dir, *overrides, devices=1):
    """Copies a finished run and trains it 2 steps further on `devices` devices."""
    shutil.copytree(workdir, copy_to)
    result = run(
        copy_to, data_dir, f"--config.train.steps={STEPS + 2}", *overrides, devices=devices
    )
    assert f"Resumed from step {STEPS}" in result.stderr
    assert (copy_to / "checkpoints" / str(STEPS + 2)).is_dir()
    return result


def test_checkpoint_written_on_eight_devices_restores_on_one(tmp_path, data_dir, sharded_run):
    resume(sharded_run, tmp_path / "resumed", data_dir)


def test_a_warm_start_begins_from_another_runs_parameters(tmp_path, data_dir, sharded_run):
    # Adam's first step moves no parameter by more than the learning rate, so at
    # 1e-9 the new run's first checkpoint holds the source's step-20 parameters
    # to 1e-8: read (from 8 devices onto 1), not initialised (those differ by ~0.1).
    workdir = tmp_path / "warm"
    result = run(
        workdir,
        data_dir,
        f"--config.train.warm_start_dir={sharded_run}",
        f"--config.train.warm_start_step={STEPS}",
        "--config.train.steps=1",
        "--config.checkpoint.every_steps=1",
        "--config.train.learning_rate=1e-9",
        "--config.train.schedule=constant",
        "--config.train.warmup_steps=0",
        devices=1,
    )
    assert f"parameter arrays from step {STEPS} of {sharded_run}" in result.stderr
    warm, source = saved_params(workdir, step=1), saved_params(sharded_run)
    assert jax.tree.structure(warm) == jax.tree.structure(source)
    for got, want in zip(jax.tree.leaves(warm), jax.tree.leaves(source), strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
    # The token ids of the source's rows: its vocabulary, copied, not rebuilt.
    assert filecmp.cmp(
        workdir / "vocab" / "tokenizer.json", sharded_run / "vocab" / "tokenizer.json", False
    )


def test_two_process_checkpoint_resumes_in_one_process_at_the_same_batch(
    tmp_path, data_dir, two_process_run, single_device_run
):
    # The iterator positions of 2 processes do not fit 1 process: the data is
    # repositioned by the step, at the batch the 1-process run reads next.
    every_step = "--config.train.log_every_steps=1"
    moved = resume(two_process_run, tmp_path / "moved", data_dir, every_step)
    assert "Data repositioned at global batch 20" in moved.stderr
    resume(single_device_run, tmp_path / "stayed", data_dir, every_step)
    # Step 21's loss is that of the step-20 parameters on the batch each run
    # reads next. The two runs' parameters differ by rounding (8 devices sum in
    # another order than 1, and Adam's normalised updates enlarge it), which
    # moves this loss by up to ~5e-5 (measured 4.6e-5); another batch moves it
    # by 0.3% to 3% (measured with three other data orders).
    np.testing.assert_allclose(
        train_loss(tmp_path / "moved", STEPS + 1),
        train_loss(tmp_path / "stayed", STEPS + 1),
        rtol=5e-4,
    )


def test_sigkill_at_a_random_step_then_restart_is_bit_identical(
    tmp_path, data_dir, single_device_run
):
    workdir = tmp_path / "killed"
    overrides = ("--config.checkpoint.every_steps=2",)
    kill_after = int(np.random.default_rng().integers(3, 12))
    process = subprocess.Popen(
        command(workdir, data_dir, *overrides),
        env=cpu_env(1),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        saved = [int(p.name) for p in checkpoints.glob("*") if p.name.isdigit()]
        if saved and max(saved) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    run(workdir, data_dir, *overrides, devices=1)
    got, want = saved_params(workdir), saved_params(single_device_run)
    for path_got, path_want in zip(
        sorted(_flat(got).items()), sorted(_flat(want).items()), strict=True
    ):
        assert path_got[0] == path_want[0]
        np.testing.assert_array_equal(path_got[1], path_want[1], err_msg=path_got[0])


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: np.asarray(tree)}


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, data_dir):
    workdir = tmp_path / "preempted"
    process = subprocess.Popen(
        command(
            workdir,
            data_dir,
            "--config.train.steps=100000",
            "--config.checkpoint.every_steps=100000",
        ),
        env=cpu_env(1),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    log = workdir / "metrics.jsonl"
    while time.time() < deadline and not (log.exists() and log.read_text().strip()):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-4000:]
    saved = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    assert len(saved) == 1 and 10 <= saved[0] < 100000
    assert "Preempted or interrupted: saved step" in err


def test_visualize_mode_plots_a_restored_checkpoint(tmp_path, data_dir, sharded_run):
    workdir = tmp_path / "visualize"
    shutil.copytree(sharded_run, workdir)
    record = (workdir / "metrics.jsonl").read_text()
    run(workdir, data_dir, "--mode=visualize", devices=1)
    assert list((workdir / "visualize" / "plots" / f"step_{STEPS}").glob("alignment_*.png"))
    # It never touches the training record (a sweep's table reads its last eval/bleu).
    assert (workdir / "metrics.jsonl").read_text() == record
    assert not (workdir / "visualize" / "metrics.jsonl").exists()


def test_hard_attention_captioner_trains_with_reinforce_end_to_end(tmp_path):
    # Show, Attend and Tell's hard attention through the whole loop: the
    # REINFORCE terms and the baseline are logged, and the baseline is in the
    # checkpoint (it is part of the train state).
    digits = tmp_path / "tfds"
    prepare.prepare("digit_captions", str(digits))
    workdir = tmp_path / "hard"
    result = preloaded.run(
        [
            sys.executable,
            "-m",
            "attnx.main",
            "--config=experiments/digits_spatial.py:hard,tiny",
            f"--workdir={workdir}",
            f"--config.task.data_dir={digits}",
        ],
        env=cpu_env(2),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    logged = [m for m in metrics(workdir) if "train/reinforce" in m]
    assert [m["step"] for m in logged] == [10, 20]
    for m in logged:
        assert all(np.isfinite(m[k]) for k in ("train/reinforce", "train/entropy"))
        assert m["train/entropy"] > 0
        # Started at 0, the baseline follows log p(y | s, a) < 0.
        assert m["train/baseline"] < 0
    assert logged[1]["train/baseline"] < logged[0]["train/baseline"]
    assert any(m["step"] == 20 and "eval/bleu4" in m for m in metrics(workdir))
    restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "20" / "state")
    assert float(restored["extra"]["baseline"]) == pytest.approx(
        logged[1]["train/baseline"], abs=1e-6
    )
