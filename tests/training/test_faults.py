"""Fault injection: whatever happens to a training run, nothing is lost and it resumes exactly.

Each test breaks a run of the tiny dates experiment the way real runs break
(SIGKILL while an asynchronous save is in flight or just before its commit,
a damaged file in the newest checkpoint, a torn last line in metrics.jsonl,
a full disk, two runs on one workdir, a relative workdir through every mode),
then runs the same command again and checks that

  * every checkpoint and every line of metrics.jsonl is still there, or was
    moved aside (never deleted), and what was moved is named in the log;
  * the run resumed at the step it should, and its parameters at step 20 are
    bit-identical to those of a run that was never interrupted.

Every run is a real `python -m attnx.main` subprocess on one CPU device;
faults that need a precise moment come from `fault_runner.py`, which patches
Orbax or attnx in that subprocess only.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import preloaded
import pytest
from command_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = pathlib.Path(__file__).with_name("fault_runner.py")
EXPERIMENT = f"--config={ROOT}/experiments/dates_transformer.py:tiny"
STEPS = 20
# A checkpoint every 5 steps, and none deleted by retention, so that a lost one would show.
CADENCE = ("--config.checkpoint.every_steps=5", "--config.checkpoint.keep=100")


def main_argv(workdir, data_dir, *overrides) -> list[str]:
    return [
        EXPERIMENT,
        f"--workdir={workdir}",
        f"--config.task.data_dir={data_dir}",
        *CADENCE,
        *overrides,
    ]


def run(argv, *, cwd=ROOT, ok=True, env=None, limit_file_size_kb=None, timeout=900):
    command = [sys.executable, "-m", "attnx.main", *argv]
    if limit_file_size_kb is not None:
        command = ["bash", "-c", f'ulimit -f {limit_file_size_kb} && exec "$@"', "-", *command]
    result = preloaded.run(
        command,
        cwd=cwd,
        env=env or cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if ok:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def start(argv, *, cwd=ROOT, fault=None) -> subprocess.Popen:
    prefix = [sys.executable, "-m", "attnx.main"]
    if fault is not None:
        prefix = [sys.executable, str(RUNNER), *fault, "--"]
    return subprocess.Popen(
        [*prefix, *argv],
        cwd=cwd,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, process, timeout=600):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"exited {process.returncode}: {process.stderr.read()[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.communicate()


def steps_on_disk(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def moved_aside(workdir) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if ".corrupt-" in p.name)


def params(workdir, step=STEPS):
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    return _flat(state["params"])


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}/{key}"))
        return out
    return {prefix: np.asarray(tree)}


def assert_bit_identical(got, want):
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def metric_lines(workdir) -> list[str]:
    """Every line of metrics.jsonl and of the files its lines were moved into."""
    lines = []
    for path in sorted(workdir.glob("metrics.jsonl*")):
        lines += path.read_text().splitlines()
    return lines


def record(workdir) -> list[dict]:
    """metrics.jsonl, which must parse line by line with steps in order."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted(r["step"] for r in rows)
    return rows


def checkpoint_files(workdir) -> dict[str, bytes]:
    """The bytes of every committed checkpoint file (what must never change or go)."""
    out = {}
    for step in steps_on_disk(workdir):
        step_dir = workdir / "checkpoints" / str(step)
        for path in step_dir.rglob("*"):
            if path.is_file() and path.name != "_CHECKPOINT_METADATA":
                out[str(path.relative_to(workdir))] = path.read_bytes()
    return out


def assert_no_tracebacks(stderr: str):
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Event loop is closed" not in stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dates_data_dir):
    """A run that was never interrupted: steps 5, 10, 15, 20 saved."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    run(main_argv(workdir, dates_data_dir))
    assert steps_on_disk(workdir) == [5, 10, 15, 20]
    return workdir


def halfway(reference, to):
    """The reference as a run stopped right after step 10 leaves it."""
    shutil.copytree(reference, to)
    for step in (15, 20):
        shutil.rmtree(to / "checkpoints" / str(step))
    rows = [line for line in (to / "metrics.jsonl").read_text().splitlines()]
    kept = [line for line in rows if json.loads(line)["step"] <= 10]
    (to / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    shutil.rmtree(to / "plots")
    return to


@pytest.mark.parametrize("fault", ["in_flight", "before_commit"])
def test_sigkill_during_a_save_loses_nothing(tmp_path, reference, dates_data_dir, fault):
    workdir = halfway(reference, tmp_path / "run")
    kept = checkpoint_files(workdir)
    marker = tmp_path / "marker"
    process = start(main_argv(workdir, dates_data_dir), fault=(fault, "15", str(marker)))
    wait_for(marker.exists, process)
    kill(process)
    unfinished = workdir / "checkpoints" / "15.orbax-checkpoint-tmp"
    assert unfinished.is_dir() and steps_on_disk(workdir) == [5, 10]
    if fault == "before_commit":  # Complete, checksums included, but never committed.
        assert (unfinished / "attnx_checksums.json").is_file()
    lines_at_kill = metric_lines(workdir)

    result = run(main_argv(workdir, dates_data_dir))
    assert "step 15 is half-written" in result.stderr
    assert "Resumed from step 10." in result.stderr
    assert_no_tracebacks(result.stderr)
    assert_bit_identical(params(workdir), params(reference))
    assert steps_on_disk(workdir) == [5, 10, 15, 20]
    assert len(moved_aside(workdir)) == 1 and moved_aside(workdir)[0].startswith("15.corrupt-")
    for name, data in kept.items():
        assert (workdir / name).read_bytes() == data, name
    assert set(lines_at_kill) <= set(metric_lines(workdir))
    assert record(workdir)[-1]["step"] == STEPS


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)


def _garbage(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_a_damaged_newest_step_is_moved_aside_and_the_run_resumes_before_it(
    tmp_path, reference, dates_data_dir, damage
):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    state_files = [p for p in (workdir / "checkpoints" / "20" / "state").rglob("d/*")]
    damaged = max(state_files, key=lambda p: p.stat().st_size)
    damage(damaged)
    result = run(main_argv(workdir, dates_data_dir))
    relative = damaged.relative_to(workdir / "checkpoints" / "20")
    assert f"step 20 is broken: {workdir}/checkpoints/20/{relative}" in result.stderr
    assert "Resumed from step 15." in result.stderr
    assert_no_tracebacks(result.stderr)
    assert_bit_identical(params(workdir), params(reference))
    (aside,) = moved_aside(workdir)
    assert (workdir / "checkpoints" / aside / relative).is_file()  # Kept, damage and all.
    assert set(metric_lines(reference)) <= set(metric_lines(workdir))


def test_a_torn_last_line_of_metrics_is_kept_aside(tmp_path, reference, dates_data_dir):
    workdir = halfway(reference, tmp_path / "run")
    os.chmod(workdir / "metrics.jsonl", 0o640)
    torn = '{"step": 13, "train/lo'
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write(torn)  # The process died in the middle of a write.
    before = metric_lines(workdir)
    result = run(main_argv(workdir, dates_data_dir))
    assert "Resumed from step 10." in result.stderr and "metrics.jsonl.dropped-" in result.stderr
    (dropped,) = workdir.glob("metrics.jsonl.dropped-*")
    assert dropped.read_text() == torn + "\n"
    assert set(before) <= set(metric_lines(workdir))
    assert record(workdir)[-1]["step"] == STEPS
    assert (workdir / "metrics.jsonl").stat().st_mode & 0o777 == 0o640
    assert_bit_identical(params(workdir), params(reference))


def test_a_full_disk_stops_the_run_in_one_line_and_it_resumes(tmp_path, reference, dates_data_dir):
    workdir = halfway(reference, tmp_path / "run")
    kept = checkpoint_files(workdir)
    lines = metric_lines(workdir)

    # Files may grow to 100 kB: enough for logs, plots and metrics, not for the
    # checkpoint's array data (~250 kB). Writes beyond fail with EFBIG, as on a full
    # disk (Python ignores SIGXFSZ, so the writer sees the error). bash sets the
    # limit: a preexec_fn would fork this multithreaded (JAX) process.
    result = run(
        main_argv(workdir, dates_data_dir, "--config.train.steps=40"),
        ok=False,
        # No compilation cache: its entries would hit the limit too.
        env=cpu_env(JAX_ENABLE_COMPILATION_CACHE="false"),
        limit_file_size_kb=100,
    )
    assert result.returncode == 1
    fatal = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert len(fatal) == 1  # (Orbax's background threads may still log after it.)
    assert f"saving step 15 to {workdir}/checkpoints/15 failed" in fatal[0]
    assert "File too large" in fatal[0] and "newest checkpoint: step 10" in fatal[0]
    assert_no_tracebacks(result.stderr)
    # The save of step 15 runs in the background while training goes on; the run
    # stops as soon as it knows, at the latest at the next save (step 20), not at 40.
    assert max(r["step"] for r in record(workdir)) <= 20
    assert steps_on_disk(workdir) == [5, 10]
    for name, data in kept.items():
        assert (workdir / name).read_bytes() == data, name
    assert set(lines) <= set(metric_lines(workdir))

    result = run(main_argv(workdir, dates_data_dir))
    assert "Resumed from step 10." in result.stderr
    assert_bit_identical(params(workdir), params(reference))


def test_a_second_training_run_on_a_live_workdir_refuses(tmp_path, reference, dates_data_dir):
    workdir = halfway(reference, tmp_path / "run")
    lock = workdir / "writer.lock"
    first = start(main_argv(workdir, dates_data_dir))
    wait_for(lock.exists, first)
    second = run(main_argv(workdir, dates_data_dir), ok=False, timeout=300)
    assert second.returncode == 1
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.splitlines() if line.strip()
    ]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"FATAL workdir {workdir} is being written by pid {first.pid} on ")
    assert socket.gethostname() in line
    # A read-only mode may run beside it: it reads a whole step and moves nothing.
    beside = run([*main_argv(workdir, dates_data_dir), "--mode=eval"])
    assert re.search(r"--mode=eval on step (10|15|20) ", beside.stderr), beside.stderr
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-3000:]
    assert_bit_identical(params(workdir), params(reference))
    assert not lock.exists()

    # A writer that died (SIGKILL leaves its lock) is taken over, with a warning.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(dead.stdout)
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "x"}))
    result = run(main_argv(workdir, dates_data_dir))
    assert f"pid {pid} on host {socket.gethostname()}" in result.stderr
    assert "no longer running" in result.stderr
    assert list(workdir.glob("writer.lock.stale-*"))


def test_a_relative_workdir_through_train_kill_resume_and_every_mode(
    tmp_path, reference, dates_data_dir
):
    # `--workdir=runs/exp1` as most people type it, its parent missing, from another cwd.
    cwd = tmp_path / "project"
    cwd.mkdir()
    relative = "runs/exp1"
    workdir = cwd / relative
    argv = main_argv(relative, dates_data_dir)

    first = start(argv, cwd=cwd)
    wait_for(lambda: (workdir / "checkpoints" / "10").is_dir(), first)
    kill(first)
    lines_at_kill = metric_lines(workdir)
    result = run(argv, cwd=cwd)  # Resume.
    assert set(lines_at_kill) <= set(metric_lines(workdir))
    assert "Resumed from step" in result.stderr
    # A quiet log: attnx's own lines, no third-party INFO (Orbax, TFDS, JAX).
    assert not [
        line
        for line in result.stderr.splitlines()
        if line.startswith("I")
        and any(
            name in line
            for name in (
                "checkpoint_manager.py",
                "atomicity.py",
                "dataset_info.py",
                "xla_bridge.py",
            )
        )
    ]
    assert len(result.stderr.splitlines()) < 30, result.stderr
    assert_bit_identical(params(workdir), params(reference))
    assert steps_on_disk(workdir) == [5, 10, 15, 20]

    # The read-only modes write only under WORKDIR/<mode>/: the training record stays as it is.
    record_files = checkpoint_files(workdir)
    lines = (workdir / "metrics.jsonl").read_text()
    for mode in ("eval", "decode", "visualize", "summary"):
        result = run([*argv, f"--mode={mode}"], cwd=cwd)
        assert_no_tracebacks(result.stderr)
        assert (workdir / "metrics.jsonl").read_text() == lines, mode
        assert checkpoint_files(workdir) == record_files, mode
    assert [json.loads(r)["mode"] for r in (workdir / "eval" / "metrics.jsonl").open()] == ["eval"]
    rows = (workdir / "decode" / f"predictions_step_{STEPS}.tsv").read_text().splitlines()
    assert rows[0] == "source\treference\thypothesis\tscore" and len(rows) > 100
    assert list((workdir / "visualize" / "plots" / f"step_{STEPS}").glob("*.png"))
    assert not (workdir / "visualize" / "metrics.jsonl").exists()

    # Training again goes on from step 20 and keeps everything it had.
    result = run([*argv, "--config.train.steps=25"], cwd=cwd)
    assert "Resumed from step 20." in result.stderr
    assert steps_on_disk(workdir) == [5, 10, 15, 20, 25]
    assert (workdir / "metrics.jsonl").read_text().startswith(lines)
    assert record(workdir)[-1]["step"] == 25
    assert not list(workdir.glob("metrics.jsonl.dropped-*"))
