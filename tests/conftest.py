"""Shared test set-up: every test sees 8 simulated CPU devices, compiled quickly.

XLA reads its flags once, when the backend starts, so they must be set before
anything imports jax. The flags (`command_env.py`) also turn down XLA's LLVM
optimisation, most of the time of a compile that a test runs for a step or two.

The end-to-end tests run `python -m attnx.main` in subprocesses; most of
their time is XLA compiling the same tiny models again. They share one
persistent compilation cache, made for this test run and removed after it
(compiled programs are the same with or without it, so no check is lost).
The commands themselves are forked from a Python that has already imported
their libraries (`preloaded.py`, imported by the test files from this
directory). The bundled datasets are prepared once per run and shared by the
test files and xdist workers that need them (`dates_data_dir`, ...), and so is
the tiny trained runs that several files read (`dates_tiny_run`, `digits_tiny_run`).
"""

import fcntl
import os
import pathlib
import shutil
import sys
import tempfile

import pytest

# `import preloaded` in the test files (pytest's importlib mode adds no directory to the path).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from command_env import QUICK_COMPILE, cpu_env  # noqa: E402

os.environ["XLA_FLAGS"] = " ".join(
    (os.environ.get("XLA_FLAGS", ""), QUICK_COMPILE, "--xla_force_host_platform_device_count=8")
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The allocator `python -m attnx.main` runs with (attnx/host_memory.py), before JAX
# starts its threads; the end-to-end subprocesses set it themselves.
from attnx import host_memory  # noqa: E402

host_memory.keep_freed_memory()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Set after jax is imported, so only the subprocesses (which inherit it) use the cache.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), f"attnx-tests-{_RUN}", "jax-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", COMPILATION_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session, exitstatus):
    if "PYTEST_XDIST_WORKER" not in os.environ:  # The controller, after every worker.
        shutil.rmtree(os.path.dirname(COMPILATION_CACHE), ignore_errors=True)


def _prepared(name: str) -> str:
    """The bundled dataset `name`, prepared once for the whole test run (all xdist workers)."""
    from attnx.data import prepare

    shared = os.path.join(tempfile.gettempdir(), f"attnx-tests-{_RUN}")
    os.makedirs(shared, exist_ok=True)
    directory = os.path.join(shared, "tfds")
    with open(os.path.join(shared, "tfds.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # One xdist worker prepares; the others wait.
        prepare.prepare(name, directory)
    return directory


@pytest.fixture(scope="session")
def dates_data_dir() -> str:
    """A data_dir holding the bundled `dates` task."""
    return _prepared("dates")


@pytest.fixture(scope="session")
def numbers_data_dir() -> str:
    """A data_dir holding the bundled `number_words/en_de` task (and whatever else is there)."""
    return _prepared("number_words/en_de")


@pytest.fixture(scope="session")
def numbers_fr_data_dir() -> str:
    """A data_dir holding the bundled `number_words/en_fr` task (and whatever else is there)."""
    return _prepared("number_words/en_fr")


@pytest.fixture(scope="session")
def digits_data_dir() -> str:
    """A data_dir holding the bundled `digit_captions` task (and whatever else is there)."""
    return _prepared("digit_captions")


def _shared_run(name: str, experiment: str, data_dir: str, *flags: str, devices: int = 1):
    """`experiment` trained into a workdir `name` shared by the whole test run (all xdist workers).

    Read by the test files that need a trained run (`attnx.load`, decoding
    one's own inputs, which writes nothing into the workdir): a test that
    changes a run copies it first.
    """
    import preloaded

    shared = pathlib.Path(tempfile.gettempdir(), f"attnx-tests-{_RUN}")
    shared.mkdir(parents=True, exist_ok=True)
    workdir = shared / name
    done = shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # One xdist worker trains; the others wait.
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # A run cut short: start again.
            root = pathlib.Path(__file__).resolve().parents[1]
            result = preloaded.run(
                [
                    sys.executable,
                    "-m",
                    "attnx.main",
                    f"--config={root}/experiments/{experiment}",
                    f"--workdir={workdir}",
                    f"--config.task.data_dir={data_dir}",
                    *flags,
                ],
                cwd=root,
                env=cpu_env(devices),
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            done.touch()
    return workdir


@pytest.fixture(scope="session")
def dates_tiny_run(dates_data_dir) -> pathlib.Path:
    """`dates_transformer.py:tiny` trained on a 2-device mesh (fsdp=2), once per test run."""
    return _shared_run(
        "dates_tiny_run",
        "dates_transformer.py:tiny",
        dates_data_dir,
        "--config.mesh.fsdp=2",
        devices=2,
    )


@pytest.fixture(scope="session")
def digits_tiny_run(digits_data_dir) -> pathlib.Path:
    """`digits_spatial.py:tiny` (the soft captioner) trained on one device, once per test run."""
    return _shared_run("digits_tiny_run", "digits_spatial.py:tiny", digits_data_dir)
