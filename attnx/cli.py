"""What `attnx.main` and `attnx.sweep` share at the command line: flags, errors, logs.

* `parse_flags` is absl's flag parser with every mistake a user can make on
  the command line (a missing or broken experiment file, an unknown flag or
  `--config.*` key, a wrong type or choice, stray arguments) reported as one
  line, `FATAL <what> ...`, naming the flag, key or file, with no traceback.
  The `--config.*` values are applied by `config_overrides.apply_overrides`,
  the function a sweep uses for its trials (`config_overrides()` returns them).
* `run(main)` runs an absl main under that parser and turns `RunError`s (a
  workdir, lock or checkpoint problem the user can fix) into the same one line.
* `QuietThirdPartyLogs`: by default a run's log holds attnx's own lines and
  the warnings of the libraries under it (Orbax, TFDS, JAX), each as one line;
  their INFO lines and tracebacks come back with `--verbosity=1` (`-v 1`).
"""

from __future__ import annotations

import logging as python_logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging

from attnx.errors import RunError

FLAGS = flags.FLAGS
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def one_line(text: object) -> str:
    """`text` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def fatal(message: object) -> NoReturn:
    """Exits with status 1 after writing `FATAL <message>` as one line to stderr."""
    sys.stderr.write(f"FATAL {one_line(message)}\n")
    sys.stderr.flush()
    # os._exit would skip flushing; SystemExit(1) runs the usual clean-up.
    raise SystemExit(1)


# --- flags --------------------------------------------------------------------------------------


def _config_argument(argv: list[str]) -> str | None:
    """The value of --config=... (or `--config VALUE`) in argv, if given."""
    for index, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _check_experiment_file(argv: list[str]) -> None:
    """A missing experiment file, named before ml_collections tries to import it."""
    value = _config_argument(argv)
    if value is None:
        fatal("--config is required: --config=experiments/NAME.py[:ARG]")
    path = value.split(":", 1)[0]
    if not path:
        fatal(f"--config={value}: give an experiment file, e.g. experiments/NAME.py[:ARG]")
    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
        hint = ""
        folder = os.path.dirname(path) or "."
        if os.path.isdir(folder):
            names = sorted(n for n in os.listdir(folder) if n.endswith(".py"))
            if names:
                hint = f"; {folder} has: {', '.join(names)}"
        fatal(f"--config={value}: no such experiment file {path}{where}{hint}")


def _innermost(error: BaseException) -> BaseException:
    """The exception that started a chain (flags wrap the config file's own errors)."""
    while True:
        cause = error.__cause__ or error.__context__
        if cause is None:
            return error
        error = cause


def _config_file_error(message: str) -> str | None:
    """The last line of a traceback that ml_collections embedded in a flag error."""
    if "Error whilst parsing config file" not in message:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else None


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str, str]]]:
    """argv without its `--config.KEY=VALUE` flags, and those as (flag, key, value) text.

    `--config.KEY VALUE` and a bare boolean `--config.KEY` are read too.
    """
    rest, overrides = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if index > 0 and arg.startswith("--config."):
            key, equals, value = arg[len("--config.") :].partition("=")
            if not equals:
                following = argv[index + 1] if index + 1 < len(argv) else None
                if following is not None and not following.startswith("--"):
                    value = following
                    index += 1
                else:
                    value = "true"
            overrides.append((arg if equals else f"--config.{key}={value}", key, value))
        else:
            rest.append(arg)
        index += 1
    return rest, overrides


_CONFIG_OVERRIDES: dict[str, Any] = {}


def config_overrides() -> dict[str, Any]:
    """The `--config.*` values of this command line, typed, in their order."""
    return dict(_CONFIG_OVERRIDES)


def _apply_config_overrides(overrides: list[tuple[str, str, str]]) -> None:
    """Sets the command line's `--config.*` values on FLAGS.config; one line per mistake."""
    from attnx.training.config_overrides import apply_overrides

    config = FLAGS["config"].value
    flags_of = {key: flag for flag, key, _ in overrides}
    try:
        applied = apply_overrides(
            config, {key: value for _, key, value in overrides}, from_text=True
        )
    except ValueError as error:
        message = str(error)
        key = re.match(r"config\.([\w.]+)", message)
        flag = flags_of.get(key.group(1)) if key else None
        fatal(f"Flags parsing error: {flag + ': ' if flag else ''}{message}")
    _CONFIG_OVERRIDES.clear()
    _CONFIG_OVERRIDES.update(applied)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every command-line mistake reported in one line.

    Returns argv without the flags (the program name first). Exits with status 1
    and one `FATAL ...` line on a missing experiment file, an experiment whose
    `get_config` rejects its arg, an unknown flag or config key, a wrong type or
    choice, or arguments that are not flags.
    """
    # Before anything else: a malformed flag must not leave third-party INFO lines above it.
    QuietThirdPartyLogs.install()
    if not any(arg in ("--help", "--helpfull", "--helpshort", "-h", "-?") for arg in argv):
        _check_experiment_file(argv)
    # The --config.* values are set by attnx itself (config_overrides.py), after
    # the experiment is loaded: a new model.name must rebuild the model section
    # before the new architecture's fields can be set.
    argv, overrides = _split_config_overrides(argv)
    # ml_collections reads its overrides from sys.argv itself, not from FLAGS(argv).
    saved_argv, sys.argv = sys.argv, list(argv)
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        message = str(error)
        embedded = _config_file_error(message)
        if embedded is not None:
            fatal(f"--config={_config_argument(argv)}: {embedded}")
        fatal(f"Flags parsing error: {message}")
    except (OSError, ValueError, TypeError) as error:
        # An experiment file that fails while it is imported or builds its config.
        inner = _innermost(error)
        fatal(f"--config={_config_argument(argv)}: {type(inner).__name__}: {inner}")
    finally:
        sys.argv = saved_argv
    if "config" in FLAGS:
        config = FLAGS["config"].value
        if type(config).__name__ == "_ErrorConfig":
            # ml_collections defers an OSError raised while loading the file.
            error = object.__getattribute__(config, "_error")
            fatal(f"--config={_config_argument(argv)}: {type(error).__name__}: {error}")
    if len(rest) > 1:
        fatal(f"unexpected arguments {rest[1:]}: every argument is a --flag (see --helpshort)")
    if overrides:
        if "config" not in FLAGS:
            fatal(f"{overrides[0][0]}: this command has no --config")
        _apply_config_overrides(overrides)
    return rest


def run(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with `parse_flags`, and `RunError`s reported in one line."""

    def guarded(argv: list[str]) -> None:
        try:
            main(argv)
        except RunError as error:
            fatal(error)

    app.run(guarded, flags_parser=parse_flags)


# --- logs ---------------------------------------------------------------------------------------


def _verbosity() -> int:
    return FLAGS["verbosity"].value if "verbosity" in FLAGS else 0


def _quiet_unraisable(previous: Callable) -> Callable:
    """Drops the 'Event loop is closed' errors of Orbax's reader and writer threads.

    When a save or a restore fails, TensorStore still completes callbacks on
    Orbax's event loop after it closed; each prints a traceback that reads
    like a crash, though attnx has reported the failure itself.
    """

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if (
            _verbosity() < 1
            and isinstance(error, RuntimeError)
            and "Event loop is closed" in str(error)
        ):
            return
        previous(unraisable)

    hook._attnx_quiet = True
    return hook


class QuietThirdPartyLogs(python_logging.Filter):
    """Keeps attnx's log lines and third-party warnings (one line each); drops the rest.

        At absl's `--verbosity` 0 (the default) a record from outside the attnx
        package passes only at WARNING or above, with its message cut to its first
        line and without its traceback (Orbax logs every background failure with
        one, which attnx then reports itself) and cut to 300 characters. At
    `--verbosity=1` and above every
        record passes untouched.
    """

    @classmethod
    def install(cls) -> None:
        """Adds the filter to absl's handler (once per process)."""
        handler = absl_logging.get_absl_handler()
        if not any(isinstance(f, cls) for f in handler.filters):
            handler.addFilter(cls())
        # The same failure leaves Orbax coroutines unawaited at exit.
        warnings.filterwarnings("ignore", r"coroutine .* was never awaited", RuntimeWarning)
        if not getattr(sys.unraisablehook, "_attnx_quiet", False):
            sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
        # TFDS draws progress bars straight onto stderr; attnx logs data preparation itself.
        try:
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
        except ImportError:  # pragma: no cover - tfds is a dependency
            pass

    def filter(self, record: python_logging.LogRecord) -> bool:
        if _verbosity() >= 1:
            return True
        if os.path.abspath(record.pathname).startswith(_PACKAGE_DIR + os.sep):
            return True
        if record.levelno < python_logging.WARNING:
            return False
        message = record.getMessage()
        if record.name == "asyncio" and "never retrieved" in message:
            return False  # Orbax's tasks after a failed save, which Orbax and attnx report.
        first = message.strip().splitlines()[0] if message.strip() else message
        if len(first) > 300:
            first = first[:300] + " ... (-v 1 for all of it)"
        if record.exc_info and record.exc_info[1] is not None:
            first = f"{first} ({type(record.exc_info[1]).__name__}: {one_line(record.exc_info[1])[:150]})"
        record.msg, record.args = first, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True
