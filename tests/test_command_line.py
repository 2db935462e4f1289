"""Every mistake a user can make at `attnx.main`'s command line ends in one line, early.

Each case runs `python -m attnx.main` as a user would and asserts: exit status
1; stderr holds exactly one non-empty line, `FATAL ...`, naming the flag, key,
file, path or process; and nothing heavy ran (no vocabulary, checkpoint or
metrics was written anywhere). `attnx.sweep`'s own table is in test_sweep.py.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import preloaded
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/dates_transformer.py:tiny"


def _unwritable(path: pathlib.Path) -> pathlib.Path | None:
    """A directory this process cannot write into, even as root; None if none can be made."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        return path
    # Root writes through permission bits; the immutable attribute stops it (ext4, xfs).
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        return path
    return None


def _live_lock(workdir: pathlib.Path) -> None:
    workdir.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now", "command": "x"}
    (workdir / "writer.lock").write_text(json.dumps(holder))


def _empty_run(workdir: pathlib.Path) -> None:
    workdir.mkdir()


# name: (arguments, what the one line must contain); {tmp} is the test's directory.
CASES = {
    "missing experiment file": (
        ["--config=experiments/no_such.py", "--workdir={tmp}/run"],
        ["--config=experiments/no_such.py: no such experiment file", "dates_transformer.py"],
    ),
    "experiment arg it does not know": (
        ["--config=experiments/dates_rnn.py:bogus", "--workdir={tmp}/run"],
        ["--config=experiments/dates_rnn.py:bogus", "unknown arg 'bogus'"],
    ),
    "no --config": (["--workdir={tmp}/run"], ["--config is required"]),
    "unknown config key": (
        [TINY, "--config.train.stepz=3", "--workdir={tmp}/run"],
        [
            "--config.train.stepz=3: config.train.stepz is not a config key",
            'Did you mean "train.steps"',
        ],
    ),
    "wrong type": (
        [TINY, "--config.train.steps=abc", "--workdir={tmp}/run"],
        ["config.train.steps", "abc"],
    ),
    "attention value an architecture cannot take": (
        [TINY, "--config.model.attention.score=location", "--workdir={tmp}/run"],
        [
            "config.model.attention.score='location' is not available in the transformer",
            "['scaled_dot', 'dot']",
        ],
    ),
    "unknown attention key": (
        [TINY, "--config.model.attention.norm=sparsemax", "--workdir={tmp}/run"],
        [
            "config.model.attention.norm is not a config key",
            'Did you mean "model.attention.normalizer"',
        ],
    ),
    "unknown attention value": (
        [TINY, "--config.model.attention.normalizer=softermax", "--workdir={tmp}/run"],
        ["config.model.attention.normalizer='softermax'", "'entmax15'"],
    ),
    "image model on a text task": (
        [TINY, "--config.model.name=captioner", "--workdir={tmp}/run"],
        ["config.model.name='captioner' reads image sources", "config.task.dataset='dates'"],
    ),
    "a loss term of another architecture": (
        [TINY, "--config.train.attention_penalty=1.0", "--workdir={tmp}/run"],
        [
            "config.train.attention_penalty=1.0 is read by the captioner's loss terms",
            "config.model.name='transformer' has none",
        ],
    ),
    "an interpret metric that does not exist": (
        [TINY, "--config.interpret.head_metric=best", "--workdir={tmp}/run"],
        ["config.interpret.head_metric='best'", "'worst_field_accuracy'"],
    ),
    "unknown architecture": (
        [TINY, "--config.model.name=lstm", "--workdir={tmp}/run"],
        ["config.model.name='lstm'", "'convs2s'"],
    ),
    "a field of another architecture": (
        [TINY, "--config.model.hidden_dim=64", "--workdir={tmp}/run"],
        ["--config.model.hidden_dim=64", "config.model.hidden_dim is not a config key"],
    ),
    "a model value its checks refuse": (
        [TINY, "--config.model.num_heads=3", "--workdir={tmp}/run"],
        ["d_model=32 is not divisible by num_heads=3"],
    ),
    "invalid value": (
        [TINY, "--config.mesh.data=3", "--workdir={tmp}/run"],
        ["Config error: config.mesh"],
    ),
    "unknown flag": ([TINY, "--wokdir={tmp}/run"], ["wokdir"]),
    "bad --mode": ([TINY, "--workdir={tmp}/run", "--mode=evaluate"], ["--mode", "evaluate"]),
    "stray argument": ([TINY, "--workdir={tmp}/run", "train"], ["unexpected arguments ['train']"]),
    "no --workdir": ([TINY], ["--workdir is required for --mode=train"]),
    "bucket URL as workdir": ([TINY, "--workdir=gs://bucket/run"], ["gs://bucket/run", "gcsfuse"]),
    "bucket URL as data_dir": (
        [TINY, "--workdir={tmp}/run", "--config.task.data_dir=gs://b/tfds"],
        ["config.task.data_dir=gs://b/tfds", "gcsfuse"],
    ),
    "workdir is a file": (
        [TINY, "--workdir={tmp}/notes.txt"],
        ["{tmp}/notes.txt", "not a directory"],
    ),
    "workdir under a file": (
        [TINY, "--workdir={tmp}/notes.txt/run"],
        ["{tmp}/notes.txt", "is not a directory"],
    ),
    "eval: workdir and its parent missing": (
        [TINY, "--workdir={tmp}/missing/run", "--mode=eval"],
        ["--mode=eval", "{tmp}/missing/run", "does not exist"],
    ),
    "eval: a workdir without a checkpoint": (
        [TINY, "--workdir={tmp}/empty", "--mode=eval"],
        ["--mode=eval needs a checkpoint in {tmp}/empty/checkpoints"],
    ),
    "decode: a workdir without a checkpoint": (
        [TINY, "--workdir={tmp}/empty", "--mode=decode"],
        ["--mode=decode needs a checkpoint"],
    ),
    "a workdir another live run is training": (
        [TINY, "--workdir={tmp}/locked"],
        ["workdir {tmp}/locked is being written by pid {pid} on host " + socket.gethostname()],
    ),
    "unwritable workdir": (
        [TINY, "--workdir={tmp}/readonly/run"],
        ["{tmp}/readonly", "not writable"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_command_line_mistake_is_one_line_before_anything_runs(case, tmp_path):
    arguments, wanted = CASES[case]
    (tmp_path / "notes.txt").write_text("mine")
    _empty_run(tmp_path / "empty")
    if case == "a workdir another live run is training":
        # Train before the lock is checked would build a vocabulary here.
        _live_lock(tmp_path / "locked")
    readonly = None
    if case == "unwritable workdir":
        readonly = _unwritable(tmp_path / "readonly")
        if readonly is None:
            pytest.skip("cannot make an unwritable directory here (no chattr as root)")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    fill = {"tmp": str(tmp_path), "pid": str(os.getpid())}
    try:
        result = preloaded.run(
            [sys.executable, "-m", "attnx.main", *(a.format(**fill) for a in arguments)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
            timeout=300,
        )
    finally:
        if readonly is not None and os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(readonly)], check=True)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("FATAL "), result.stderr[-3000:]
    for text in wanted:
        assert text.format(**fill) in lines[0], lines[0]
    assert result.stdout == ""
    # Nothing ran: no file appeared (no workdir, vocabulary, checkpoint or metrics).
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not (ROOT / "gs:").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_summary_counts_the_vocabulary_of_the_workdir(tmp_path):
    from attnx.data.tokenizers import CharacterTokenizer

    CharacterTokenizer("0123456789-").save(tmp_path / "run" / "vocab")  # 4 specials + 11
    result = preloaded.run(
        [sys.executable, "-m", "attnx.main", TINY, f"--workdir={tmp_path}/run", "--mode=summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.splitlines()[-1]
    assert last.endswith(
        f"(vocabulary 15: the run's vocabulary, {tmp_path}/run/vocab/tokenizer.json)"
    )
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:-1]}
    assert rows["source_embedding/embedding"][1:3] == ["(15,", "32)"]
    # Without a workdir it says that its size is a placeholder.
    result = preloaded.run(
        [sys.executable, "-m", "attnx.main", TINY, "--mode=summary"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        timeout=300,
    )
    assert "(vocabulary 256: a placeholder" in result.stdout.splitlines()[-1]
    shutil.rmtree(tmp_path / "run")


def test_third_party_info_lines_are_off_by_default_and_on_with_verbosity():
    # JAX logs at INFO that it found no TPU, every time its backend starts.
    def stderr(*flags: str) -> str:
        result = preloaded.run(
            [sys.executable, "-m", "attnx.main", TINY, "--mode=summary", *flags],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=dict(os.environ, JAX_PLATFORMS=""),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "xla_bridge.py" not in stderr()
    assert "xla_bridge.py" in stderr("--verbosity=1")
