"""`python -m attnx.main ...` for the end-to-end tests, without paying Python's imports each time.

A command the tests run costs about 5 s on 2 cores before it does anything:
3.5 s of it is importing JAX, Flax, TensorFlow Datasets, grain and Orbax.
The suite runs dozens of such commands, many of them mistakes that must
end in one line before anything heavy runs, so the imports were most of
their time. `run` has `subprocess.run`'s signature and result; for
`[sys.executable, "-m", MODULE, ...]` it forks the command from a server
process (one per xdist worker, started on first use) that has imported those
libraries but started nothing: no JAX backend, no device (importing jaxlib
leaves one idle native thread, which the fork does not copy). The child then
is what `python -m MODULE` would be after its imports: its own working
directory, environment, argv, stdin, stdout and stderr files, `__main__`
module, flag parsing, backend, and normal shutdown (threads joined, atexit
handlers run) before it exits with the command's status.

What the server has imported was configured from its own environment, so a
command whose environment differs from the server's anywhere but in
`XLA_FLAGS` (read when the backend starts, in the child), `ATTNX_*` or
`PYTEST_*` (pytest names the current test there) runs as a real subprocess
instead; so does a command with a verbosity flag (`-v 1` shows the lines the
libraries log as they are imported, which the server logged, not the
child), and everything that is not such a command.
Commands that the tests signal or run side by side use `subprocess.Popen`.
"""

from __future__ import annotations

import atexit
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

# What the server imports: what `attnx.main` reaches while it validates a config, and
# what training imports after.
PRELOAD = (
    "absl.logging",
    "absl.flags",
    "ml_collections.config_flags",
    "attnx.cli",
    "jax",
    "jax.numpy",
    "flax.nnx",
    "optax",
    "orbax.checkpoint",
    "grain",
    "tensorflow_datasets",
    "attnx.models",
    "attnx.training.config",
)
MODULES = ("attnx.main", "attnx.sweep")
# Read after the imports (XLA_FLAGS when the backend starts) or by no library at all.
_SERVED_DIFFERENCES = ("XLA_FLAGS",)
_SERVED_PREFIXES = ("ATTNX_", "PYTEST_")

_server: subprocess.Popen | None = None
_server_env: dict[str, str] | None = None
_lock = threading.Lock()


def _same_imports(env: dict[str, str]) -> bool:
    """True if a command with `env` would import its libraries exactly as the server did."""
    assert _server_env is not None
    keys = set(env) | set(_server_env)
    return all(
        env.get(key) == _server_env.get(key)
        for key in keys
        if key not in _SERVED_DIFFERENCES and not key.startswith(_SERVED_PREFIXES)
    )


def _shows_library_logs(argument: str) -> bool:
    """True for a verbosity flag: it would show the lines libraries log as they are imported,
    which the server logged when it imported them, not the command."""
    return argument == "-v" or argument.startswith(("-v=", "--v=", "--verbosity"))


def _start_server() -> None:
    global _server, _server_env
    _server_env = dict(os.environ)
    _server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_server_env,
    )
    atexit.register(_stop_server)
    ready = _server.stdout.readline()
    if ready.strip() != "ready":
        raise RuntimeError(f"the preloaded command server did not start: {ready!r}")


def _stop_server() -> None:
    if _server is not None and _server.poll() is None:
        _server.stdin.close()
        _server.wait(timeout=30)


def run(args, *, input=None, capture_output=False, timeout=None, check=False, **kwargs):
    """`subprocess.run(args, ...)`, forked from the preloaded server where that is the same."""
    env = kwargs.get("env")
    env = dict(os.environ if env is None else env)
    served = (
        isinstance(args, (list, tuple))
        and len(args) >= 3
        and args[0] == sys.executable
        and args[1] == "-m"
        and args[2] in MODULES
        and capture_output
        and set(kwargs) <= {"env", "cwd", "text"}
        and not any(_shows_library_logs(str(a)) for a in args[3:])
    )
    if served:
        with _lock:
            if _server is None:
                _start_server()
            served = _same_imports(env)
    if not served:
        return subprocess.run(
            args, input=input, capture_output=capture_output, timeout=timeout, check=check, **kwargs
        )
    text = bool(kwargs.get("text"))
    with tempfile.TemporaryDirectory(prefix="attnx-preloaded-") as files:
        paths = {name: os.path.join(files, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w" if text else "wb") as f:
            f.write(input if input is not None else ("" if text else b""))
        request = {
            "module": args[2],
            "argv": [str(a) for a in args[3:]],
            "cwd": os.fspath(kwargs.get("cwd") or os.getcwd()),
            "env": env,
            **paths,
        }
        with _lock:
            returncode = _serve_one(request, timeout, args)
        outputs = []
        for name in ("stdout", "stderr"):
            with open(paths[name], "rb") as f:
                data = f.read()
            # As `text=True` reads a pipe: the locale's encoding, universal newlines.
            outputs.append(io.TextIOWrapper(io.BytesIO(data)).read() if text else data)
    result = subprocess.CompletedProcess(list(args), returncode, *outputs)
    if check:
        result.check_returncode()
    return result


def _serve_one(request: dict, timeout: float | None, args) -> int:
    _server.stdin.write(json.dumps(request) + "\n")
    _server.stdin.flush()
    pid = int(_server.stdout.readline())
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # It exited as the time ran out.
            pass

    # The server answers with the status once the child has exited (and reaps it).
    timer = threading.Timer(timeout, kill) if timeout is not None else None
    if timer:
        timer.start()
    returncode = int(_server.stdout.readline())
    if timer:
        timer.cancel()
    if killed.is_set():
        raise subprocess.TimeoutExpired(list(args), timeout)
    return returncode


# --- the server ---------------------------------------------------------------------------------


def _child(request: dict) -> None:
    """Becomes `python -m MODULE ARGV...` in this forked process; never returns."""
    import runpy

    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, name, flags in (
            (0, "stdin", os.O_RDONLY),
            (1, "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(request[name], flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        # What `python -m` puts first on the path: the directory it starts in.
        sys.path[0] = os.getcwd()
        sys.argv = [request["module"], *request["argv"]]
        try:
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit:
            if exit.code is None:
                code = 0
            elif isinstance(exit.code, int):
                code = exit.code
            else:
                print(exit.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        # The interpreter's own shutdown, in its order: join threads, then atexit.
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def _serve() -> None:
    """Imports PRELOAD, then forks one child per request line on stdin, answering with
    the child's pid and, once it has exited, its status."""
    from absl import logging as absl_logging

    from attnx import host_memory

    # What `attnx.main.run()` does before JAX starts its threads, done here once.
    host_memory.keep_freed_memory()

    # `attnx.main` imports the libraries after absl's app.run has put its log handler
    # on the root logger; without it, the first absl log call of an import (Orbax
    # logs as it is imported) would install Python's default handler instead.
    absl_logging.use_absl_handler()
    for name in PRELOAD:
        importlib.import_module(name)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        sys.stdout.write(f"{pid}\n")
        sys.stdout.flush()
        _, status = os.waitpid(pid, 0)
        sys.stdout.write(f"{os.waitstatus_to_exitcode(status)}\n")
        sys.stdout.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
