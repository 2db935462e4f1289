"""Warm starts: which step of the source, parameters placed on this run's mesh, clear errors."""

import json
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import struct
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from attnx.errors import RunError
from attnx.training import warm_start
from attnx.training.checkpoints import Checkpointer


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: Any


def _state(seed: int, mesh) -> TrainState:
    """A state whose parameter values depend on `seed`, matrices split over `mesh`."""
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {
        "embed": {"value": jax.random.normal(keys[0], (8, 4))},
        "out": {"bias": {"value": jnp.full((4,), float(seed))}},
    }
    matrix = NamedSharding(mesh, P("data", "model"))
    params = jax.device_put(
        params, jax.tree.map(lambda x: matrix if x.ndim == 2 else NamedSharding(mesh, P()), params)
    )
    return TrainState(
        step=jnp.int32(seed),
        params=params,
        opt_state={"mu": jax.tree.map(jnp.zeros_like, params)},
        rng=jax.random.key(seed),
        extra={"baseline": jnp.float32(seed)},
    )


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A finished run: steps 10, 20, 30 with validation scores 0.5, 0.9, 0.7; its config.json."""
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    workdir = tmp_path_factory.mktemp("source")
    (workdir / "config.json").write_text(
        json.dumps({"checkpoint": {"best_metric": "eval/acc", "best_mode": "max"}})
    )
    (workdir / "vocab").mkdir()
    (workdir / "vocab" / "tokenizer.json").write_text('{"tokens": ["a", "b"]}')
    with Checkpointer(workdir / "checkpoints", keep=3, best_metric="eval/acc") as ckpt:
        for step, score in ((10, 0.5), (20, 0.9), (30, 0.7)):
            ckpt.save(step, _state(step, mesh), {}, metrics={"eval/acc": score}, force=True)
    return workdir


def config(workdir, step=0):
    """The two keys `find_source` reads."""
    return ml_collections.ConfigDict(
        {"train": {"warm_start_dir": workdir and str(workdir), "warm_start_step": step}}
    )


def test_the_source_runs_best_step_is_taken_unless_a_step_is_given(source, tmp_path):
    own = str(tmp_path / "checkpoints")
    assert warm_start.find_source(config(source), own).step == 20  # Best eval/acc, not newest.
    assert warm_start.find_source(config(source, step=30), own).step == 30
    # A source without a best metric in its config: its newest step.
    (tmp_path / "other").mkdir()
    other = tmp_path / "other"
    (other / "checkpoints").symlink_to(source / "checkpoints")
    assert warm_start.find_source(config(other), own).step == 30


def test_a_run_with_checkpoints_of_its_own_resumes_instead(source, tmp_path):
    own = tmp_path / "checkpoints" / "5"
    own.mkdir(parents=True)
    (own / "commit_success.txt").write_text("")
    assert warm_start.find_source(config(source), str(tmp_path / "checkpoints")) is None
    assert warm_start.find_source(config(""), str(tmp_path / "none")) is None


@pytest.mark.parametrize(
    "problem, expected",
    [
        ("empty", "no committed checkpoint in"),
        ("step", "warm_start_step=25: no such step"),
        ("itself", "is this run's own workdir"),
        ("required", "warm_start_dir is required by this experiment"),
    ],
)
def test_a_wrong_source_is_named_before_anything_is_built(source, tmp_path, problem, expected):
    workdir, step, own = source, 0, str(tmp_path / "checkpoints")
    if problem == "empty":
        workdir = tmp_path / "empty"
        (workdir / "checkpoints").mkdir(parents=True)
    elif problem == "step":
        step = 25
    elif problem == "required":
        workdir = None  # An experiment's placeholder, not set on the command line.
    else:
        workdir = tmp_path  # This run's own workdir, with no checkpoint yet.
        (workdir / "checkpoints").mkdir()
    with pytest.raises(RunError, match=expected):
        warm_start.find_source(config(workdir, step), own)


def test_parameters_come_back_bit_exact_on_another_mesh(source):
    target = jax.device_put(
        _state(1, jax.make_mesh((2, 4), ("data", "model"))).params,
        SingleDeviceSharding(jax.devices()[3]),
    )
    restored = warm_start.restore_params(warm_start.Source(str(source), 20), target)
    expected = _state(20, jax.make_mesh((4, 2), ("data", "model"))).params
    assert jax.tree.structure(restored) == jax.tree.structure(target)
    for got, want, placed in zip(
        jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(target), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding == placed.sharding  # This run's placement, not the source's.


def test_other_parameters_are_an_error_naming_the_parameter(source):
    params = _state(1, jax.make_mesh((4, 2), ("data", "model"))).params
    wider = dict(params, embed={"value": jnp.zeros((8, 6))})
    with pytest.raises(
        RunError, match=r"'embed.value' is float32\[8, 4\] there but float32\[8, 6\]"
    ):
        warm_start.restore_params(warm_start.Source(str(source), 20), wider)
    extra = dict(params, gate={"value": jnp.zeros(3)})
    with pytest.raises(RunError, match=r"only in this model: \['gate.value'\]"):
        warm_start.restore_params(warm_start.Source(str(source), 20), extra)


def test_a_damaged_source_step_is_refused(source, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    arrays = sorted(
        (copy / "checkpoints" / "20" / "state").rglob("*"), key=lambda p: p.stat().st_size
    )
    biggest = [p for p in arrays if p.is_file()][-1]
    biggest.write_bytes(b"\0" * biggest.stat().st_size)
    target = _state(1, jax.make_mesh((4, 2), ("data", "model"))).params
    with pytest.raises(RunError, match="step 20 is damaged"):
        warm_start.restore_params(warm_start.Source(str(copy), 20), target)


def test_the_source_vocabulary_is_copied_and_a_different_one_refused(source, tmp_path):
    src = warm_start.Source(str(source), 20)
    vocab = tmp_path / "vocab"
    warm_start.adopt_vocabulary(src, str(vocab))
    assert (vocab / "tokenizer.json").read_text() == '{"tokens": ["a", "b"]}'
    warm_start.adopt_vocabulary(src, str(vocab))  # The same one again: kept.
    (vocab / "tokenizer.json").write_text('{"tokens": ["b", "a"]}')
    with pytest.raises(RunError, match="differs from the source's"):
        warm_start.adopt_vocabulary(src, str(vocab))
    assert (vocab / "tokenizer.json").read_text() == '{"tokens": ["b", "a"]}'  # Not replaced.
