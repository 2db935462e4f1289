"""attnx.training.workdir: paths resolved once, checks before anything runs, one writer."""

import json
import os
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from attnx.errors import RunError
from attnx.training import workdir


def test_relative_home_and_symlinked_paths_resolve_to_one_absolute_path(tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert workdir.resolve("link/run", what="--workdir") == str(real / "run")
    assert workdir.resolve("~/link/run", what="--workdir") == str(real / "run")
    assert workdir.resolve("./real/../real/run", what="--workdir") == str(real / "run")
    with pytest.raises(RunError, match=r"--workdir=gs://b/run: .*gcsfuse"):
        workdir.resolve("gs://b/run", what="--workdir")


def test_config_paths_are_resolved_in_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = ml_collections.ConfigDict(
        {"task": {"data_dir": "data", "dataset": "dates", "vocab_file": None, "name_dir": ""}}
    )
    workdir.resolve_config_paths(config)
    assert config.task.data_dir == str(tmp_path / "data")
    assert config.task.dataset == "dates" and config.task.vocab_file is None


def test_training_creates_missing_parents_of_a_relative_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = workdir.prepare_workdir("runs/exp1", "train")
    assert path == str(tmp_path / "runs" / "exp1") and os.path.isdir(path)
    assert os.listdir(path) == []  # The write probe leaves nothing behind.


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_workdir_under_a_file_or_that_is_a_file_is_named(tmp_path, mode):
    (tmp_path / "notes.txt").write_text("mine")
    for given in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "run"):
        with pytest.raises(RunError, match=str(tmp_path / "notes.txt")):
            workdir.prepare_workdir(str(given), mode)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_read_only_modes_need_a_workdir_with_a_checkpoint_and_a_vocabulary(tmp_path):
    with pytest.raises(RunError, match=r"--mode=eval .* does not exist .*nearest existing"):
        workdir.prepare_workdir(str(tmp_path / "missing" / "run"), "eval")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RunError, match=r"--mode=decode needs a checkpoint in .*checkpoints"):
        workdir.prepare_workdir(str(run), "decode")
    (run / "checkpoints" / "20").mkdir(parents=True)
    with pytest.raises(RunError, match="no vocabulary"):
        workdir.prepare_workdir(str(run), "visualize")
    (run / "vocab").mkdir()
    (run / "vocab" / "tokenizer.json").write_text("{}")
    assert workdir.prepare_workdir(str(run), "eval") == str(run)
    assert not (run / "eval").exists()  # Checking writes nothing.


def test_config_changes_between_starts_are_logged_and_the_old_one_kept(tmp_path, caplog):
    config = ml_collections.ConfigDict({"train": {"steps": 20, "seed": 0}})
    workdir.record_config(str(tmp_path), config)
    workdir.record_config(str(tmp_path), config)  # The same: nothing moves.
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    config.train.steps = 30
    workdir.record_config(str(tmp_path), config)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 30
    (aside,) = [n for n in os.listdir(tmp_path) if n.startswith("config.json.moved-")]
    assert json.loads((tmp_path / aside).read_text())["train"]["steps"] == 20
    assert "train.steps: 20 -> 30" in caplog.text


def _lock_file(directory, **holder):
    (directory / workdir.LOCK_FILE).write_text(json.dumps(holder))


def test_a_live_writer_on_this_host_refuses_a_second_one(tmp_path):
    with workdir.WriterLock(str(tmp_path)):
        with pytest.raises(workdir.WorkdirLockedError) as error:
            workdir.WriterLock(str(tmp_path)).acquire()
        message = str(error.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in message
        assert str(tmp_path) in message and "\n" not in message
    assert not (tmp_path / workdir.LOCK_FILE).exists()  # Released.
    workdir.WriterLock(str(tmp_path)).acquire()


def test_a_dead_writer_is_taken_over_with_a_warning(tmp_path, caplog):
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead = int(finished.stdout)
    _lock_file(tmp_path, pid=dead, host=socket.gethostname(), started="earlier", command="x")
    lock = workdir.WriterLock(str(tmp_path))
    lock.acquire()
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {dead} on host {socket.gethostname()}" in caplog.text
    assert "no longer running" in caplog.text
    # The stale lock is kept, not deleted.
    assert [n for n in os.listdir(tmp_path) if n.startswith(f"{workdir.LOCK_FILE}.stale-")]
    lock.release()


def test_a_reused_pid_is_not_the_writer(tmp_path, caplog):
    # This process's pid, but another start time: the writer died and the pid came back.
    ticks = workdir._process_start_ticks(os.getpid())
    assert ticks is not None
    _lock_file(tmp_path, pid=os.getpid(), host=socket.gethostname(), start_ticks=ticks - 1)
    with workdir.WriterLock(str(tmp_path)):
        assert "no longer running" in caplog.text


def test_a_writer_on_another_host_is_alive_while_it_touches_the_lock(tmp_path):
    _lock_file(tmp_path, pid=1, host="tpu-worker-0", started="now", command="x")
    with pytest.raises(workdir.WorkdirLockedError, match="pid 1 on host tpu-worker-0"):
        workdir.WriterLock(str(tmp_path)).acquire()
    # No touch for longer than STALE_AFTER_SECONDS: that host is gone.
    old = time.time() - workdir.STALE_AFTER_SECONDS - 1
    os.utime(tmp_path / workdir.LOCK_FILE, (old, old))
    with workdir.WriterLock(str(tmp_path)):
        pass


def test_the_heartbeat_keeps_a_long_run_alive(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir, "HEARTBEAT_SECONDS", 0.05)
    with workdir.WriterLock(str(tmp_path)):
        path = tmp_path / workdir.LOCK_FILE
        os.utime(path, (0, 0))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5


def test_a_half_written_lock_of_a_dead_process_is_taken_over(tmp_path):
    (tmp_path / workdir.LOCK_FILE).write_text('{"pid": 12')
    old = time.time() - workdir.STALE_AFTER_SECONDS - 1
    os.utime(tmp_path / workdir.LOCK_FILE, (old, old))
    with workdir.WriterLock(str(tmp_path)):
        pass


def test_move_aside_keeps_what_it_replaces(tmp_path):
    path = tmp_path / "predictions_step_20.tsv"
    assert workdir.move_aside(str(path), "test") is None
    path.write_text("old")
    os.chmod(path, 0o640)
    moved = workdir.move_aside(str(path), "test")
    assert not path.exists() and open(moved).read() == "old"
    assert os.stat(moved).st_mode & 0o777 == 0o640
