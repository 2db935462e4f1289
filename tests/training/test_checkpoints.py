"""Orbax checkpoints: bit-exact resume, other meshes, retention, corrupt steps, SIGTERM."""

import gc
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from command_env import cpu_env
from flax import struct
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from attnx.errors import RunError
from attnx.training import checkpoint_integrity
from attnx.training.checkpoint_items import config_hash
from attnx.training.checkpoints import (
    Checkpointer,
    CheckpointSaveError,
    CorruptCheckpointError,
)


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


@jax.jit
def _init_state(step: jax.Array) -> TrainState:
    """A tiny MLP + Adam state after one update (non-trivial moments); one compile."""
    k1, k2, k3 = jax.random.split(jax.random.fold_in(jax.random.key(0), step), 3)
    params = {
        "dense1": {"kernel": jax.random.normal(k1, (8, 16)), "bias": jnp.zeros(16)},
        "dense2": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jnp.full(4, 0.5)},
    }
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.sin(p) + 1.0, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(params, opt_state, step, k3)


def _make_state(mesh, step: int = 7) -> TrainState:
    """`_init_state(step)` sharded on `mesh`."""
    state = _init_state(jnp.int32(step))
    return jax.device_put(state, _shardings(state, mesh, P("data", "model")))


def _shardings(state, mesh, matrix_spec):
    """Matrices split by `matrix_spec`, vectors split on the first mesh axis, rest replicated."""

    def one(leaf):
        if leaf.ndim == 2:
            return NamedSharding(mesh, matrix_spec)
        if leaf.ndim == 1 and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return NamedSharding(mesh, P(mesh.axis_names[0]))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state)


def _target(state, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def _assert_bit_identical(restored, expected):
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    np.testing.assert_array_equal(
        jax.random.key_data(restored.rng), jax.random.key_data(expected.rng)
    )
    assert restored.rng.dtype == expected.rng.dtype
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True):
        if jax.dtypes.issubdtype(want.dtype, jax.dtypes.prng_key):
            continue
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.fixture(scope="module")
def mesh8():
    return jax.make_mesh((4, 2), ("data", "model"))


@pytest.fixture(scope="module")
def state(mesh8):
    return _make_state(mesh8)


def _steps_on_disk(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_restore_is_bit_exact_on_the_saving_mesh(tmp_path, state):
    with Checkpointer(tmp_path, keep=2, config_hash="abc") as ckpt:
        assert ckpt.save(7, state, {"epoch": 1, "position": [3, 4]})
        ckpt.wait()
        restored, data = ckpt.restore(target=state)
    _assert_bit_identical(restored, state)
    assert data == {"epoch": 1, "position": [3, 4]}
    # Restored leaves live where the target asked.
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)


def test_checkpoint_from_8_devices_restores_on_1_device_and_on_another_mesh(tmp_path, state):
    with Checkpointer(tmp_path, keep=2) as ckpt:
        ckpt.save(7, state, {"epoch": 2})
    one_device = SingleDeviceSharding(jax.devices()[0])
    other_mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"))
    targets = {
        "1 device": _target(state, jax.tree.map(lambda _: one_device, state)),
        "2x4 mesh": _target(state, _shardings(state, other_mesh, P("tensor", "fsdp"))),
    }
    with Checkpointer(tmp_path, keep=2) as ckpt:  # a fresh process would do this
        for name, target in targets.items():
            restored, data = ckpt.restore(target=target)
            _assert_bit_identical(restored, state)
            assert data == {"epoch": 2}
            for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True):
                assert got.sharding.is_equivalent_to(want.sharding, got.ndim), name
    assert len(jax.tree.leaves(restored)[0].sharding.device_set) == 8


def test_keeps_the_latest_and_the_best(tmp_path, state):
    accuracies = {1: 0.9, 2: 0.1, 3: 0.5, 4: None, 5: 0.3, 6: 0.2}
    with Checkpointer(tmp_path, keep=2, best_metric="eval/acc", keep_best=1) as ckpt:
        for step, acc in accuracies.items():
            metrics = {"train/loss": 1.0} if acc is None else {"eval/acc": acc}
            ckpt.save(step, state, {}, metrics=metrics)
        ckpt.wait()
        # Latest 2 = {5, 6}; best 1 by max accuracy = step 1.
        assert ckpt.all_steps() == [1, 5, 6]
        assert ckpt.best_step() == 1
    assert _steps_on_disk(tmp_path) == [1, 5, 6]
    # A restarted run reads the stored metrics back and keeps ranking by them.
    with Checkpointer(tmp_path, keep=2, best_metric="eval/acc", keep_best=1) as ckpt:
        ckpt.save(7, state, {}, metrics={"eval/acc": 0.95})
        ckpt.save(8, state, {}, metrics={"eval/acc": 0.0})
    assert _steps_on_disk(tmp_path) == [7, 8]

    min_dir = tmp_path / "min"
    with Checkpointer(
        min_dir, keep=1, best_metric="eval/loss", best_mode="min", keep_best=2
    ) as ckpt:
        for step, loss in {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 4.0}.items():
            ckpt.save(step, state, {}, metrics={"eval/loss": loss})
    # Latest 1 = {5}; best 2 by min loss = {4, 2}.
    assert _steps_on_disk(min_dir) == [2, 4, 5]


def test_every_steps_force_and_repeated_steps(tmp_path, state):
    with Checkpointer(tmp_path, keep=5, every_steps=10, async_save=False) as ckpt:
        assert ckpt.save(10, state, {})
        assert not ckpt.save(13, state, {})
        assert ckpt.save(13, state, {}, force=True)
        # A preemption save at an already saved step is skipped, not an error.
        assert not ckpt.save(13, state, {}, force=True)
        assert ckpt.save(20, state, {})
        assert ckpt.latest_step() == 20
    assert _steps_on_disk(tmp_path) == [10, 13, 20]


def test_no_checkpoint_restores_to_none(tmp_path, state):
    with Checkpointer(tmp_path / "empty", keep=1) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.restore(target=state) is None


def _truncate_files(directory):
    for path in directory.rglob("*"):
        if path.is_file() and path.name != "commit_success.txt":
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)


def _largest_array_file(step_dir):
    # The array bytes (an OCDBT data file), so the metadata still reads fine.
    return max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=os.path.getsize)


def _truncate_array_data(step_dir):
    for data_dir in (step_dir / "state").rglob("d"):
        _truncate_files(data_dir)


def _garbage_same_size(step_dir):
    # Same size, other bytes: only the checksum can tell.
    path = _largest_array_file(step_dir)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(255 - b for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))


# Each corruption and what the log must name (the file, or the marker).
CORRUPTIONS = {
    "truncated state files": (lambda d: _truncate_files(d / "state"), "/2/state/"),
    "truncated array data": (_truncate_array_data, "/2/state/"),
    "garbage in the array data": (_garbage_same_size, "fails its checksum"),
    "deleted data iterator state": (
        lambda d: (d / "data" / "process_0-of-1.json").unlink(),
        "data/process_0-of-1.json is missing",
    ),
    "truncated meta json": (lambda d: _truncate_files(d / "meta"), "/2/meta/metadata"),
    "missing item": (lambda d: (d / "meta" / "commit_success.txt").unlink(), "item 'meta'"),
    "no commit marker": (lambda d: (d / "commit_success.txt").unlink(), "no commit marker"),
    "unreadable step metadata": (
        lambda d: (d / "_CHECKPOINT_METADATA").write_text("{not json"),
        "_CHECKPOINT_METADATA is not readable JSON",
    ),
}


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, mesh8):
    """Pristine copies of steps 1 and 2 (different states) to corrupt in each test."""
    directory = tmp_path_factory.mktemp("pristine")
    states = {1: _make_state(mesh8, step=1), 2: _make_state(mesh8, step=2)}
    with Checkpointer(directory, keep=5) as ckpt:
        for step, s in states.items():
            ckpt.save(step, s, {"position": step})
    return directory, states


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(
    tmp_path, two_checkpoints, corruption, caplog
):
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    damage, named = CORRUPTIONS[corruption]
    damage(directory / "2")
    caplog.set_level(logging.WARNING)
    with Checkpointer(directory, keep=5) as ckpt:
        restored, data = ckpt.restore(target=states[1])
        assert ckpt.latest_step() == 1
    _assert_bit_identical(restored, states[1])
    assert data == {"position": 1}
    # Moved aside, not deleted; the log names the step, the file and the fallback.
    assert _steps_on_disk(directory) == [1]
    aside = [p.name for p in directory.iterdir() if p.name.startswith("2.corrupt-")]
    assert len(aside) == 1
    log = caplog.text
    assert ("step 2 is broken" in log or "step 2 is half-written" in log) and named in log
    assert "fell back to step 1" in log
    # Decided from the files: Orbax never read the broken step (its reader
    # threads then print "Event loop is closed" tracebacks).
    assert "Traceback" not in log


def test_every_committed_step_lists_its_files_with_checksums(two_checkpoints):
    pristine, _ = two_checkpoints
    unlisted = {"commit_success.txt", "_CHECKPOINT_METADATA", checkpoint_integrity.MANIFEST}
    for step in (1, 2):
        step_dir = pristine / str(step)
        listed = json.loads((step_dir / checkpoint_integrity.MANIFEST).read_text())["files"]
        on_disk = {
            str(p.relative_to(step_dir))
            for p in step_dir.rglob("*")
            if p.is_file() and str(p.relative_to(step_dir)) not in unlisted
        }
        assert set(listed) == on_disk and any(name.startswith("state/") for name in on_disk)
        for relative, (size, crc) in listed.items():
            data = (step_dir / relative).read_bytes()
            assert size == len(data) and crc == zlib.crc32(data), relative


def test_unfinished_save_directory_is_moved_aside(tmp_path, two_checkpoints, caplog):
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    # What a run killed mid-save leaves: Orbax's temporary directory for step 3.
    _copy(directory / "2", directory / "3.orbax-checkpoint-tmp-1700000000")
    (directory / "3.orbax-checkpoint-tmp-1700000000" / "commit_success.txt").unlink()
    caplog.set_level(logging.WARNING)
    with Checkpointer(directory, keep=5) as ckpt:
        restored, _ = ckpt.restore(target=states[2])
    _assert_bit_identical(restored, states[2])
    names = sorted(p.name for p in directory.iterdir() if not p.name.isdigit())
    assert any(n.startswith("3.corrupt-") for n in names), names
    assert not any("orbax-checkpoint-tmp" in n for n in names)
    assert "step 3 is half-written" in caplog.text
    assert "fell back to step 2" in caplog.text


def test_explicit_corrupt_step_raises_and_moves_nothing(tmp_path, two_checkpoints):
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    _truncate_array_data(directory / "2")
    with Checkpointer(directory, keep=5) as ckpt:
        with pytest.raises(CorruptCheckpointError, match="step 2: "):
            ckpt.restore(2, target=states[2])
        restored, _ = ckpt.restore(1, target=states[1])
    _assert_bit_identical(restored, states[1])
    assert _steps_on_disk(directory) == [1, 2]


def test_a_restore_error_on_a_whole_step_is_raised_and_moves_nothing(
    tmp_path, two_checkpoints, monkeypatch
):
    # A bug or a path problem is not corruption: the files pass their checksums.
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    with Checkpointer(directory, keep=5) as ckpt:

        def broken_reader(*args, **kwargs):
            raise ValueError("Checkpoint path should be absolute. Got rel/checkpoints/2")

        monkeypatch.setattr(ckpt._manager, "restore", broken_reader)
        with pytest.raises(ValueError, match="should be absolute"):
            ckpt.restore(target=states[2])
    assert _steps_on_disk(directory) == [1, 2]
    assert not [p for p in directory.iterdir() if "corrupt" in p.name]


# Orbax's reader of a broken step leaves callbacks on a closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_step_without_checksums_that_fails_is_a_run_error(tmp_path, two_checkpoints):
    # Written by an older attnx (no manifest): attnx cannot tell damage from a bug.
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    (directory / "2" / checkpoint_integrity.MANIFEST).unlink()
    _truncate_array_data(directory / "2")
    with Checkpointer(directory, keep=5) as ckpt:
        with pytest.raises(RunError, match=r"step 2 .* without checksums .* move .*/2 aside"):
            ckpt.restore(target=states[2])
    assert _steps_on_disk(directory) == [1, 2]
    time.sleep(0.5)  # Let Orbax's reader threads finish inside this test (see the mark).
    gc.collect()


def test_read_only_skips_broken_and_unfinished_steps_and_moves_nothing(
    tmp_path, two_checkpoints, caplog
):
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    _garbage_same_size(directory / "2")
    _copy(directory / "1", directory / "3.orbax-checkpoint-tmp")
    before = sorted(p.name for p in directory.iterdir())
    caplog.set_level(logging.WARNING)
    with Checkpointer(directory, keep=5, read_only=True) as ckpt:
        restored, _ = ckpt.restore(target=states[1])
        with pytest.raises(RuntimeError, match="read-only"):
            ckpt.save(4, states[1], {})
    _assert_bit_identical(restored, states[1])
    assert sorted(p.name for p in directory.iterdir()) == before
    assert "skipping it (read-only" in caplog.text


def test_a_failed_save_stops_with_the_path_and_the_cause(tmp_path, state, monkeypatch):
    from attnx.training import checkpoint_items

    def disk_full(self, directory, args):
        raise OSError(28, "No space left on device", str(directory))

    with Checkpointer(tmp_path / "ckpt", keep=5) as ckpt:
        assert ckpt.save(1, state, {"position": 1})
        ckpt.wait()
        monkeypatch.setattr(checkpoint_items.ProcessJsonHandler, "save", disk_full)
        with pytest.raises(CheckpointSaveError) as error:
            # The error surfaces in save (a synchronous item) or in a later poll.
            ckpt.save(2, state, {"position": 2})
            for _ in range(1000):  # What the loop does after every step.
                ckpt.poll()
                time.sleep(0.01)
        message = str(error.value)
        assert f"saving step 2 to {tmp_path / 'ckpt' / '2'} failed" in message
        assert "No space left on device" in message and "newest checkpoint: step 1" in message
        assert "\n" not in message
        monkeypatch.undo()
        # Nothing of step 1 was lost; the failed step is not a checkpoint.
        assert ckpt.all_steps() == [1]
        restored, data = ckpt.restore(target=state)
    _assert_bit_identical(restored, state)
    assert data == {"position": 1}


def test_a_target_that_does_not_match_is_an_error_not_corruption(tmp_path, two_checkpoints):
    pristine, states = two_checkpoints
    directory = _copy(pristine, tmp_path / "run")
    wider = states[1].replace(
        params={**states[1].params, "dense2": {"kernel": jnp.zeros((16, 5)), "bias": jnp.zeros(5)}}
    )
    with Checkpointer(directory, keep=5) as ckpt:
        with pytest.raises(ValueError, match=r"params\.dense2\.bias.*float32\[4\].*float32\[5\]"):
            ckpt.restore(target=wider)
        extra = states[1].replace(params={**states[1].params, "new": jnp.zeros(2)})
        with pytest.raises(ValueError, match=r"only in the target: \['params\.new'\]"):
            ckpt.restore(target=extra)
    assert _steps_on_disk(directory) == [1, 2]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.keep must be >= 1"):
        Checkpointer(tmp_path, keep=0)
    with pytest.raises(ValueError, match="checkpoint.best_mode"):
        Checkpointer(tmp_path, keep=1, best_mode="avg")
    with pytest.raises(ValueError, match="checkpoint.keep_best"):
        Checkpointer(tmp_path, keep=1, best_metric="eval/bleu", keep_best=0)
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_sigterm_sets_the_stop_flag_and_close_restores_the_handler(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.install_sigterm_handler()
    assert not ckpt.should_stop(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.should_stop(1)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_a_first_ctrl_c_stops_after_the_step_and_a_second_interrupts(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    ckpt = Checkpointer(tmp_path, keep=1)
    ckpt.install_sigterm_handler()
    os.kill(os.getpid(), signal.SIGINT)
    assert ckpt.should_stop(1)  # Saved and stopped by the loop, not interrupted.
    # The second is called directly: a signal's handler runs between bytecodes,
    # possibly inside a garbage-collection callback that swallows its exception.
    with pytest.raises(KeyboardInterrupt):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    ckpt.close()
    assert signal.getsignal(signal.SIGINT) == previous


_PREEMPTED_LOOP = textwrap.dedent(
    """
    import sys, time
    import jax, jax.numpy as jnp
    from attnx.training.checkpoints import Checkpointer

    ckpt = Checkpointer(sys.argv[1], keep=2, every_steps=1000)
    ckpt.install_sigterm_handler()
    state = {"w": jnp.zeros(4), "step": jnp.int32(0)}
    update = jax.jit(lambda s: {"w": s["w"] + 1.0, "step": s["step"] + 1})
    step = 0
    while step < 10**6:
        state = update(state)
        step += 1
        ckpt.save(step, state, {"position": step})
        if step == 5:
            print("running", flush=True)
        if ckpt.should_stop(step):
            ckpt.save(step, state, {"position": step}, force=True)
            ckpt.close()
            print("stopped at", step, flush=True)
            sys.exit(0)
        time.sleep(0.002)
    sys.exit(3)
    """
)


def test_sigterm_saves_a_final_checkpoint_and_exits_cleanly(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(_PREEMPTED_LOOP)
    directory = tmp_path / "ckpt"
    env = cpu_env()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "running"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    stopped_at = int(out.split()[-1])
    assert 5 <= stopped_at < 1000  # before any regular save
    target = {
        "w": jax.ShapeDtypeStruct(
            (4,), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[0])
        ),
        "step": jax.ShapeDtypeStruct(
            (), jnp.int32, sharding=SingleDeviceSharding(jax.devices()[0])
        ),
    }
    with Checkpointer(directory, keep=2) as ckpt:
        assert ckpt.all_steps() == [stopped_at]
        restored, data = ckpt.restore(target=target)
    assert int(restored["step"]) == stopped_at
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.full(4, float(stopped_at)))
    assert data == {"position": stopped_at}


_TWO_PROCESS_RUN = textwrap.dedent(
    """
    import os, sys
    process_id, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    import jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    from attnx.training.checkpoints import Checkpointer

    mesh = jax.make_mesh((8,), ("data",))
    split, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    make = jax.jit(
        lambda step: {"w": jnp.arange(16.0) * step, "step": step, "rng": jax.random.key(step)},
        out_shardings={"w": split, "step": replicated, "rng": replicated},
    )
    with Checkpointer(directory, keep=3) as ckpt:
        for step in (1, 2):
            ckpt.save(step, make(jnp.int32(step)), {"position": 10 * step + process_id})
    if process_id == 0:  # step 2 loses its commit marker
        os.remove(os.path.join(directory, "2", "commit_success.txt"))
    with Checkpointer(directory, keep=3) as ckpt:
        restored, data = ckpt.restore(target=make(jnp.int32(0)))
        w = multihost_utils.process_allgather(restored["w"], tiled=True)
        print("RESULT", int(restored["step"]), data["position"], w.tolist(), flush=True)
    """
)


def test_two_processes_save_their_data_state_and_fall_back_together(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    script = tmp_path / "run.py"
    script.write_text(_TWO_PROCESS_RUN)
    env = cpu_env(devices=4)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    for process_id, out in enumerate(outputs):
        line = next(line for line in out.splitlines() if line.startswith("RESULT"))
        _, step, position, w = line.split(" ", 3)
        assert (int(step), int(position)) == (1, 10 + process_id)
        assert w == str([float(i) for i in range(16)])
    assert sorted(
        p.name.split("-")[0] for p in (tmp_path / "ckpt").iterdir() if p.name[0].isdigit()
    ) == [
        "1",
        "2.corrupt",
    ]
