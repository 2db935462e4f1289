"""`preloaded.run` gives what `subprocess.run` gives, for the commands the end-to-end tests run.

The reference is the plain subprocess: the same command both ways, with the
same status, stdout and log lines (timestamps and process ids aside).
"""

import os
import pathlib
import re
import subprocess
import sys

import preloaded
import pytest
from command_env import cpu_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=experiments/dates_transformer.py:tiny"
# What differs between two runs of one command: absl's prefix (level, date, time, thread
# id), objects' addresses and the numbers in the lines (durations, sizes).
_ABSL_PREFIX = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_NUMBER = re.compile(r"\d+(\.\d+)?")


def both(*argv: str, **kwargs) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    command = [sys.executable, "-m", "attnx.main", *argv]
    options = dict(capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)
    return preloaded.run(command, **options), subprocess.run(command, **options)


def log_lines(stderr: str) -> list[str]:
    lines = (_ADDRESS.sub("", _ABSL_PREFIX.sub(r"\1 ", line)) for line in stderr.splitlines())
    return [_NUMBER.sub("N", line) for line in lines]


@pytest.mark.parametrize(
    "argv",
    [
        [TINY, "--config.train.stepz=3", "--workdir=/nonexistent/run"],
        ["--config=experiments/no_such.py", "--workdir=/nonexistent/run"],
        [TINY, "--config.model.attention.score=location", "--workdir=/nonexistent/run"],
        ["--workdir=/nonexistent/run", "stray"],
    ],
    ids=["unknown key", "missing file", "bad choice", "stray argument"],
)
def test_a_mistake_reads_the_same_both_ways(argv):
    forked, plain = both(*argv, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert forked.returncode == plain.returncode == 1
    assert forked.stderr == plain.stderr and forked.stderr.startswith("FATAL ")
    assert forked.stdout == plain.stdout == ""


@pytest.mark.parametrize("verbosity", ["0", "1"])
def test_a_summary_prints_and_logs_the_same_both_ways(verbosity):
    # One device, as most end-to-end tests ask: XLA_FLAGS is read in the child.
    env = cpu_env()
    forked, plain = both(TINY, "--mode=summary", f"--verbosity={verbosity}", env=env)
    assert forked.returncode == plain.returncode == 0, forked.stderr[-2000:]
    assert forked.stdout == plain.stdout and "total:" in forked.stdout
    # With -v 1 the libraries' INFO lines show, each once, those of their imports too:
    # such a command runs as a plain subprocess.
    assert log_lines(forked.stderr) == log_lines(plain.stderr)
    assert bool(forked.stderr.strip()) == (verbosity == "1")


def test_the_child_has_the_devices_its_xla_flags_ask_for():
    def summary(devices: int) -> subprocess.CompletedProcess:
        return preloaded.run(
            [sys.executable, "-m", "attnx.main", TINY, "--mode=summary", "--config.mesh.data=2"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=cpu_env(devices),
        )

    one = summary(1)
    assert one.returncode == 1 and "needs 2 devices, but there are 1" in one.stderr
    assert summary(2).returncode == 0


def test_a_timeout_kills_the_command_and_the_next_one_runs():
    command = [sys.executable, "-m", "attnx.main", TINY, "--mode=summary"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    with pytest.raises(subprocess.TimeoutExpired):
        preloaded.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=0.01)
    after = preloaded.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert after.returncode == 0 and "total:" in after.stdout
