"""attnx.sweep: trial lists, names, launch commands, one-line errors and a tiny local sweep."""

import datetime
import itertools
import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import textwrap

import preloaded
import pytest
from command_env import cpu_env

from attnx import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_sweep(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = cpu_env()  # trials on one CPU device: the fastest on a small machine
    return preloaded.run(
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
    names = ["train.learning_rate=0.001", "train.learning_rate=0.002"]
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


# --------------------------------------------------------------------------- experiment files

# The tiny dates Transformer of experiments/dates_transformer.py, as a user's own file.
_TINY_EXPERIMENT = """\
from attnx.sweep import product
from attnx.training.config import base_config, smoke_run
{imports}

def get_config(arg=None):
    config = base_config()
    config.task.dataset = "dates"
    config.task.tokenizer = "char"
    config.task.max_source_length = 40
    config.task.max_target_length = 12
    config.model.name = "transformer"
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.d_ff = 64
    config.model.num_encoder_layers = 1
    config.model.num_decoder_layers = 1
    config.model.max_length = 64
    smoke_run(config)
    return config
{rest}
"""


def write_experiment(
    tmp_path: pathlib.Path, sweep_body: str | None, *, imports: str = "", rest: str = ""
) -> pathlib.Path:
    """experiments-style file in tmp_path; `sweep_body` (None: no sweep()) is sweep()'s body."""
    if sweep_body is not None:
        rest += f"\n\ndef sweep(arg=None):\n    {sweep_body}\n"
    path = tmp_path / "my_experiment.py"
    path.write_text(_TINY_EXPERIMENT.format(imports=imports, rest=rest))
    return path


# --------------------------------------------------------------------------- one-line errors

_DATES = "--config=experiments/dates_transformer.py:tiny"
_NO_SWEEP = object()  # an experiment file without sweep()

# (experiment: a sweep() body written into a tmp experiment file, _NO_SWEEP, or None for
# experiments/dates_transformer.py:tiny; the command line ({config}, {root}); what the one
# line must name ({file}: the tmp experiment file)).
ONE_LINE_ERRORS = {
    "missing experiment file": (
        None,
        ["--config=experiments/no_such_experiment.py", "--workdir={root}"],
        "experiments/no_such_experiment.py",
    ),
    "missing --workdir": (None, ["{config}"], "--workdir"),
    "bucket URL as workdir": (
        None,
        ["{config}", "--workdir=gs://bucket/sweeps", "--run=print", "--tpu_name=t"],
        "gs://bucket/sweeps",
    ),
    "--run=print without --tpu_name": (
        None,
        ["{config}", "--workdir={root}", "--run=print"],
        "--tpu_name",
    ),
    "unknown key on the command line": (
        None,
        ["{config}", "--workdir={root}", "--config.train.no_such=1"],
        "train.no_such",
    ),
    "wrong type on the command line": (
        None,
        ["{config}", "--workdir={root}", "--config.train.steps=many"],
        "train.steps",
    ),
    "invalid value on the command line": (
        None,
        ["{config}", "--workdir={root}", "--config.train.batch_size=0"],
        "config.train.batch_size",
    ),
    "experiment without sweep()": (_NO_SWEEP, ["{config}", "--workdir={root}"], "{file}"),
    "sweep() returns a dict": (
        'return {"train.steps": 5}',
        ["{config}", "--workdir={root}"],
        "{file}",
    ),
    "sweep() raises": (
        'return product({"train.steps": 5})',  # a value, not a list of values
        ["{config}", "--workdir={root}"],
        "{file}:",
    ),
    "unknown key in sweep()": (
        'return product({"train.no_such": [1, 2]})',
        ["{config}", "--workdir={root}"],
        "train.no_such",
    ),
    "wrong type in sweep()": (
        'return product({"train.steps": ["many"]})',
        ["{config}", "--workdir={root}"],
        "train.steps",
    ),
    # The config takes True for an int; the trial's --config.train.steps=true would fail.
    "a value its command line cannot carry": (
        'return product({"train.steps": [True]})',
        ["{config}", "--workdir={root}"],
        "train.steps=true",
    ),
    "a trial that fails validate": (
        'return product({"train.batch_size": [16, 0]})',
        ["{config}", "--workdir={root}"],
        "train.batch_size=0",
    ),
    "two trials with the same name": (
        'return [{"train.steps": 5}, {"train.steps": 5}]',
        ["{config}", "--workdir={root}"],
        "train.steps=5",
    ),
}


@pytest.mark.parametrize("case", list(ONE_LINE_ERRORS))
def test_every_user_error_is_one_fatal_line_and_writes_nothing(case, tmp_path):
    experiment, args, expected = ONE_LINE_ERRORS[case]
    config, file = _DATES, ""
    if experiment is not None:
        path = write_experiment(tmp_path, None if experiment is _NO_SWEEP else experiment)
        config, file = f"--config={path}", str(path)
    root = tmp_path / "root"
    result = run_sweep(*(a.format(config=config, root=root) for a in args), timeout=120)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("FATAL "), lines[0]
    assert expected.format(file=file) in lines[0], lines[0]
    assert result.stdout == ""
    assert not root.exists() or not any(root.iterdir())
    assert not (ROOT / "gs:").exists()  # a URL never became a local directory


def test_an_experiment_with_its_own_tfds_builder_sweeps(tmp_path):
    # ml_collections has imported the file (and registered the builder) for --config;
    # executing it a second time for sweep() would register the builder again and fail.
    builder = textwrap.dedent(
        """
        class SweepTestOwnBuilder(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples()}

            def _generate_examples(self):
                yield 0, {"text": "a"}
        """
    )
    path = write_experiment(
        tmp_path,
        'return product({"train.learning_rate": [0.5, 1.0]})',
        imports="import tensorflow_datasets as tfds\n",
        rest=builder,
    )
    result = run_sweep(
        f"--config={path}", "--workdir=/mnt/sweeps/own", "--run=print", "--tpu_name=t", timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, name in zip(
        lines, ["train.learning_rate=0.5", "train.learning_rate=1.0"], strict=True
    ):
        assert f"--workdir=/mnt/sweeps/own/{name}" in line


def test_load_sweep_executes_the_experiment_file_once(tmp_path):
    counter = tmp_path / "imports.txt"
    path = write_experiment(
        tmp_path,
        'return product({"train.learning_rate": [0.5, 1.0]})',
        rest=f"\nwith open({str(counter)!r}, 'a') as f:\n    f.write('x')\n",
    )
    first = sweep.load_sweep(f"{path}:tiny")
    second = sweep.load_sweep(str(path))
    assert first == second == [{"train.learning_rate": 0.5}, {"train.learning_rate": 1.0}]
    assert counter.read_text() == "x"


# --------------------------------------------------------------------------- failed trials


def test_failed_trials_are_named_with_their_cause_and_the_sweep_fails(tmp_path):
    # A live process (this test) holds every trial's workdir, so each trial refuses at
    # once, before compiling anything (the writer.lock contract of attnx.training.workdir).
    names = ["train.learning_rate=0.001", "train.learning_rate=0.002"]
    lock = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "pytest tests/test_sweep.py",
    }
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "writer.lock").write_text(json.dumps(lock))
    result = run_sweep(
        "--config=experiments/dates_transformer.py:tiny",
        f"--workdir={tmp_path}",
        "--run=local",
        timeout=300,
    )
    assert result.returncode != 0
    cause = f"being written by pid {os.getpid()}"
    for name in names:
        (line,) = [line for line in result.stdout.splitlines() if f"FAILED {name}:" in line]
        assert "exit 1" in line and cause in line and f"{tmp_path / name / 'train.log'}" in line
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("FATAL 2 of 2 trials failed: "), result.stderr[-3000:]
    assert all(f"{name} (FATAL workdir" in last for name in names)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").open()]
    assert [row["trial"] for row in rows] == names
    for row in rows:
        assert row["status"] == "failed (exit 1)"
        assert row["cause"].startswith("FATAL workdir") and cause in row["cause"]
    for name in names:  # the lock is still the test's: the trials did not take it over
        assert json.loads((tmp_path / name / "writer.lock").read_text()) == lock


def test_failure_cause_is_this_runs_last_fatal_line_else_its_last_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("FATAL an earlier run's error\n")
    offset = log.stat().st_size
    with log.open("a") as f:
        f.write("I1201 starting\nFATAL the first problem\nW1201 a warning\n\n")
    assert sweep.failure_cause(str(log), offset) == "FATAL the first problem"
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\n  ...\nValueError: " + "x" * 400 + "\n")
    offset = log.stat().st_size - 420
    cause = sweep.failure_cause(str(log), offset)
    assert cause.startswith("ValueError: xxx") and len(cause) == 300
    assert sweep.failure_cause(str(tmp_path / "missing.log")).startswith("no log")
    assert sweep.failure_cause(str(log), log.stat().st_size) == "no output"


# --------------------------------------------------------------------------- results


def test_final_metrics_reads_only_the_training_record(tmp_path):
    rows = [
        {"step": 10, "train/loss": 2.0},
        {"step": 20, "train/loss": 1.5, "eval/exact_match": 0.5},
        # A read-only mode of an older attnx wrote here; it is not the training run's result.
        {"step": 20, "mode": "eval", "eval/exact_match": 0.9, "eval/bleu": 80.0},
        [1, 2],
        7,
    ]
    text = "\n".join(json.dumps(row) for row in rows) + '\n\n{"step": 30, "train/lo'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert sweep.final_metrics(str(tmp_path)) == {
        "step": 20,
        "train/loss": 1.5,
        "eval/exact_match": 0.5,
    }
    assert sweep.final_metrics(str(tmp_path / "no_such_trial")) == {}


def test_a_sweep_varies_the_architecture_and_the_attention():
    # Each trial switches model.name (every field of the new architecture, at the
    # experiment's size) and sets an attention key; all 15 are built and validated.
    result = run_sweep(
        "--config=experiments/dates_transformer.py:axes,tiny",
        "--workdir=/tmp/unused_axes_root",
        "--run=print",
        "--tpu_name=t",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 15
    for name in ("transformer", "rnn", "convs2s"):
        for normalizer in ("softmax", "sparsemax", "entmax15"):
            assert any(
                f"--config.model.attention.normalizer={normalizer} --config.model.name={name}"
                in line
                for line in lines
            ), (name, normalizer)


def test_the_axes_sweep_crosses_five_attention_types_with_three_normalizers():
    """experiments/dates_transformer.py:axes: issue 14's table, every cell a valid trial."""
    module = ROOT / "experiments/dates_transformer.py"
    trials = sweep.load_sweep(f"{module}:axes")
    assert len(trials) == 15
    cells = {
        (
            trial.get("model.name"),
            trial.get("model.variant", "bahdanau" if trial.get("model.name") == "rnn" else None),
            trial.get("model.attention.local"),
            trial["model.attention.normalizer"],
        )
        for trial in trials
    }
    assert len(cells) == 15
    assert {cell[3] for cell in cells} == {"softmax", "sparsemax", "entmax15"}
    assert {cell[:3] for cell in cells} == {
        ("transformer", None, None),
        ("rnn", "bahdanau", None),
        ("rnn", "luong", "none"),
        ("rnn", "luong", "local_p"),
        ("convs2s", None, None),
    }
    # Every trial builds and validates (keys, types, the architecture's choices).
    import importlib.util

    spec = importlib.util.spec_from_file_location("dates_transformer_axes", module)
    experiment = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(experiment)
    names = sweep.check_trials(experiment.get_config("axes"), trials, check_mesh=False)
    assert len(set(names)) == 15
