"""--mode=compile: the real steps compiled for a TPU topology on this CPU (libtpu, no TPU)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import preloaded
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOPOLOGY = "v5e:2x2"


def _needs_libtpu():
    pytest.importorskip("libtpu", reason="--mode=compile needs libtpu: pip install -e '.[aot]'")


@pytest.fixture(autouse=True)
def tpu_matmul_precision():
    """The matmul precision a TPU run has, not conftest's 'highest'.

    'highest' is for the CPU tests' f32 references; on TPU it turns every
    matmul into six bf16 passes, which a real run does not do and which makes
    the TPU compiler several times slower (the tiny captioner: 121 s against
    33 s on data=4, and over half an hour with 14 GiB on data=2 x tensor=2).
    """
    import jax

    with jax.default_matmul_precision("default"):
        yield


def _config(experiment: str, **overrides):
    spec = importlib.util.spec_from_file_location(
        f"experiment_{experiment}", ROOT / "experiments" / f"{experiment}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.compile.topology = TOPOLOGY
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _main(*args: str) -> subprocess.CompletedProcess:
    return preloaded.run(
        [sys.executable, "-m", "attnx.main", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=900,
    )


# One experiment per architecture; each compiles its training step on two meshes of
# the four v5e chips, so that data, fsdp and tensor parallelism all appear.
ARCHITECTURES = {
    "transformer": "wmt14_transformer_base",
    "rnn": "wmt14_rnnsearch",
    "convs2s": "wmt14_convs2s",
    "captioner": "coco_spatial",
}
MESHES = [{"data": 2, "fsdp": 1, "tensor": 2}, {"data": 1, "fsdp": 4, "tensor": 1}]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m.values())))
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_every_architecture_training_step_compiles_for_tpu(architecture, mesh, capsys):
    _needs_libtpu()
    from attnx.training import compile_mode
    from attnx.training.config import validate

    config = _config(
        ARCHITECTURES[architecture],
        **{f"mesh.{axis}": size for axis, size in mesh.items()},
        **{"compile.steps": "train"},
    )
    assert config.model.name == architecture
    validate(config, device_count=4)
    (line,) = compile_mode.compile_run(config, None)
    assert json.loads(capsys.readouterr().out) == line
    assert line["step"] == "train" and line["topology"] == TOPOLOGY
    assert line["device_kind"] == "TPU v5 lite" and line["devices"] == 4
    assert line["mesh"] == mesh
    assert line["fits"] and 0 < line["total_bytes"] <= line["hbm_bytes"] == 16 * 2**30
    assert line["flops_per_step"] > 0 and line["bytes_per_step"] > 0
    assert line["tokens_per_step"] == config.train.batch_size * config.task.max_target_length
    assert line["roofline_step_s"] > 0 and line["bound"] in ("compute", "memory")
    # The state is donated: its buffers come back as the new state's.
    assert line["alias_bytes"] > 0


def test_the_command_line_prints_train_eval_and_decode():
    _needs_libtpu()
    result = _main(
        "--config=experiments/wmt14_transformer_base.py:tiny",
        "--mode=compile",
        f"--config.compile.topology={TOPOLOGY}",
        "--config.mesh.tensor=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["step"] for line in lines] == ["train", "eval", "decode"]
    for line in lines:
        assert line["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} and line["fits"]
        assert line["vocab_source"] == "config.task.vocab_size" and line["vocab_size"] == 1000
    # Beam search is one while loop over the output positions.
    assert lines[2]["while_loops"] >= 1


def test_a_step_that_does_not_fit_names_the_bytes_and_the_knobs(tmp_path):
    _needs_libtpu()
    result = _main(
        "--config=experiments/wmt14_transformer_base.py:tiny",
        f"--workdir={tmp_path / 'none'}",
        "--mode=compile",
        f"--config.compile.topology={TOPOLOGY}",
        "--config.compile.steps=train",
        # 2**20 rows of 32 target tokens: logits alone are 2**20 x 32 x 1000 floats.
        "--config.train.batch_size=1048576",
    )
    assert result.returncode == 1
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["fits"] is False and line["total_bytes"] > line["hbm_bytes"]
    (fatal,) = [line for line in result.stderr.splitlines() if line.startswith("FATAL")]
    assert f"{line['total_bytes'] / 2**30:.2f} GiB per chip" in fatal
    assert "the chip has 16.00 GiB" in fatal
    assert "largest: activations and temporaries" in fatal
    assert "--config.train.grad_accum_steps=K" in fatal and "--config.mesh.fsdp=N" in fatal
    # A read-only mode: nothing is written, not even the workdir.
    assert not (tmp_path / "none").exists()


def test_an_unknown_topology_is_one_line():
    _needs_libtpu()
    result = _main(
        "--config=experiments/wmt14_transformer_base.py:tiny",
        "--mode=compile",
        "--config.compile.topology=v5e:3x7x9",
    )
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("FATAL config.compile.topology='v5e:3x7x9'")


def test_without_libtpu_compile_says_how_to_install_it():
    # Runs with or without libtpu installed: the import is made to fail.
    code = (
        "import sys; sys.modules['libtpu'] = None; "
        "sys.argv = ['attnx', '--config=experiments/wmt14_transformer_base.py:tiny', "
        "'--mode=compile', '--config.compile.topology=v5e:2x2']; "
        "from attnx import main; main.run()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert result.returncode == 1
    fatal = result.stderr.strip().splitlines()[-1]
    assert (
        fatal.startswith("FATAL --mode=compile needs libtpu") and "pip install -e '.[aot]'" in fatal
    )
