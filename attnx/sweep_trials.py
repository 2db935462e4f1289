"""What a trial of a sweep is, and whether it is valid: everything short of running it.

- trial lists: `product` and `zip_`, which an experiment's `sweep()` returns;
- names and values: `trial_name` (the trial's directory), `format_value` and
  `override_flags` (its `--config.k=v` flags);
- `load_sweep`: the experiment file's `sweep()`, the file imported once per process;
- `check_trials`: every trial's config built, checked to survive its own command
  line and validated before anything runs; `SweepError` for what the user can fix;
- `trial_command` and `tpu_command`: the command lines that launch a trial.

`attnx.sweep` (the command line, running trials, the results table) builds on
this module and re-exports its public names; this module never imports it.
"""

import copy
import hashlib
import importlib.util
import itertools
import os
import re
import shlex
import sys
import traceback
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import ml_collections
from ml_collections.config_flags import config_path

from attnx import cli
from attnx.errors import RunError

Overrides = dict[str, Any]

# Characters kept in trial names; anything else becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
# Longest trial name (a directory name; most file systems allow 255 bytes).
_MAX_NAME = 120


# --------------------------------------------------------------------------- trial lists


def _axes(positional: Mapping[str, Sequence[Any]] | None, named: Mapping[str, Sequence[Any]]):
    axes = {**(positional or {}), **named}
    for key, values in axes.items():
        if isinstance(values, str | bytes) or not isinstance(values, Sequence):
            raise TypeError(
                f"sweep axis {key!r} must be a list of values, got {type(values).__name__} "
                f"{values!r}"
            )
        if not values:
            raise ValueError(f"sweep axis {key!r} has no values")
    return axes


def product(
    axes: Mapping[str, Sequence[Any]] | None = None, /, **more: Sequence[Any]
) -> list[Overrides]:
    """Every combination of the axes' values (the first axis varies slowest).

    Axes are given as a dict (dotted keys are not Python names) or as keyword
    arguments: `product({"train.learning_rate": [0.5, 1.0], "model.d_model": [64, 128]})`
    gives 4 trials.
    """
    axes = _axes(axes, more)
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*axes.values())]


def zip_(
    axes: Mapping[str, Sequence[Any]] | None = None, /, **more: Sequence[Any]
) -> list[Overrides]:
    """The i-th trial takes the i-th value of every axis; all axes must be equally long.

    `zip_({"model.d_model": [64, 128], "model.d_ff": [256, 512]})` gives 2 trials.
    """
    axes = _axes(axes, more)
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zip_: the axes have different lengths {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values, strict=True)) for values in zip(*axes.values(), strict=True)]


# --------------------------------------------------------------------------- names and values


def format_value(value: Any) -> str:
    """A config value as `--config.k=VALUE` expects it (absl / ml_collections parsers)."""
    if value is None:
        raise ValueError("a sweep cannot set a config value to None from the command line")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return repr(tuple(value))
    return str(value)


def _name_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "x".join(_name_value(v) for v in value)
    return format_value(value)


def trial_name(overrides: Mapping[str, Any]) -> str:
    """A readable, file-system-safe name: 'train.learning_rate=0.001,model.d_model=64'.

    Characters other than letters, digits and `._=,+-` become '_'; a name
    longer than 120 characters is cut and ends in a hash of the overrides, so
    it stays unique. No overrides: 'default'.
    """
    if not overrides:
        return "default"
    text = ",".join(f"{key}={_name_value(value)}" for key, value in overrides.items())
    name = _UNSAFE.sub("_", text)
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(text.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
    """['--config.k=v', ...] of `overrides`."""
    return [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]


# --------------------------------------------------------------------------- trials


class SweepError(RunError):
    """A sweep the user can fix: the experiment's `sweep()`, a trial's overrides or config.

    A `RunError`, so `python -m attnx.sweep` prints it as one `FATAL` line.
    """


def _line_in(error: BaseException, path: str) -> str:
    """'PATH:LINE' of the innermost frame of `error`'s traceback in the file `path`."""
    real = os.path.realpath(path)
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if os.path.realpath(frame.filename) == real
    ]
    return f"{path}:{lines[-1]}" if lines else path


def _experiment_module(path: str) -> ModuleType:
    """The experiment file `path` as a module, executed at most once per process.

    `python -m attnx.sweep`'s --config flag has already imported the file
    (ml_collections registers it in `sys.modules`); executing it again would
    run its module-level code twice, and a TFDS builder class defined there
    would then fail to register a second time. So look for it first, by the
    file's real path; load it (and register it) only when nobody has.
    """
    real = os.path.realpath(path)
    base = os.path.basename(real)
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        # The base name first: realpath costs system calls, and sys.modules is large.
        if isinstance(file, str) and os.path.basename(file) == base:
            if os.path.realpath(file) == real:
                return module
    name = f"attnx_experiment_{hashlib.sha256(real.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SweepError(f"{path}: cannot load it as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except FileNotFoundError:
        del sys.modules[name]
        raise SweepError(f"{path}: no such experiment file") from None
    except Exception as error:
        del sys.modules[name]
        raise SweepError(
            f"{_line_in(error, path)}: importing it raised {type(error).__name__}: {error}"
        ) from error
    return module


def load_sweep(config_arg: str) -> list[Overrides]:
    """Calls `sweep(arg)` of the experiment file named by 'PATH[:ARG]'.

    Uses the module that the --config flag already imported, if any (see
    `_experiment_module`). Raises `SweepError` naming the file when it has no
    `sweep()`, when `sweep()` raises, or when it returns anything but a
    non-empty list of dicts with string keys.
    """
    path, _, arg = config_arg.partition(":")
    module = _experiment_module(path)
    sweep_fn = getattr(module, "sweep", None)
    if not callable(sweep_fn):
        raise SweepError(
            f"{path} defines no sweep(); add `def sweep(arg=None)` returning a list of overrides"
        )
    call = f"sweep({arg or None!r})"
    try:
        trials = sweep_fn(arg or None)
    except Exception as error:
        raise SweepError(
            f"{_line_in(error, path)}: {call} raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(trials, list) or not trials:
        raise SweepError(
            f"{path}: {call} returned {_short(trials)}; it must return a non-empty list of "
            "dicts (e.g. product(...))"
        )
    for index, trial in enumerate(trials):
        if not isinstance(trial, Mapping):
            raise SweepError(
                f"{path}: {call} trial {index} is {_short(trial)}; every trial must be a dict "
                "of dotted config keys -> values"
            )
        bad = [key for key in trial if not isinstance(key, str) or not key]
        if bad:
            raise SweepError(
                f"{path}: {call} trial {index} has key {bad[0]!r}; keys are dotted config "
                "keys such as 'train.learning_rate'"
            )
    return [dict(trial) for trial in trials]


def _short(value: Any, limit: int = 80) -> str:
    text = f"{type(value).__name__} {value!r}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_compared(value: Any) -> Any:
    # A list set through the config and a tuple parsed from the flag are the same trial.
    if isinstance(value, list | tuple):
        return tuple(_as_compared(v) for v in value)
    if isinstance(value, ml_collections.ConfigDict):
        return value.to_dict()
    return value


def _check_command_line(
    name: str,
    config: ml_collections.ConfigDict,
    trial_config: ml_collections.ConfigDict,
    overrides: Overrides,
) -> None:
    """Raises SweepError unless the trial's `--config.k=v` flags rebuild `trial_config`.

    A trial runs from its command line, not from this process's objects: a
    value the config accepts but the flag parser reads differently (True for
    an int field: `--config.train.steps=true`) would fail, or change, only once
    the trial runs. So parse the flags here as `attnx.main` will.
    """
    from attnx.training.config_overrides import apply_overrides

    parsed_config = copy.deepcopy(config)
    texts = {key: format_value(value) for key, value in overrides.items()}
    try:
        apply_overrides(parsed_config, texts, from_text=True)
    except ValueError as error:
        raise SweepError(
            f"trial {name}: its command line does not parse: {cli.one_line(error)}"
        ) from None
    for key, value in overrides.items():
        wanted = config_path.get_value(key, trial_config)
        parsed = config_path.get_value(key, parsed_config)
        if _as_compared(parsed) != _as_compared(wanted):
            raise SweepError(
                f"trial {name}: config.{key}={value!r} would reach the trial as {parsed!r} "
                f"(--config.{key}={texts[key]}); give a {type(wanted).__name__} value"
            )


def check_trials(
    config: ml_collections.ConfigDict, trials: Sequence[Overrides], *, check_mesh: bool = True
) -> list[str]:
    """Builds and validates every trial's config; returns the trial names.

    Raises `SweepError` naming the trial and the key when an override names no
    field, has the wrong type, does not survive its own command line (see
    `_check_command_line`) or breaks `validate`, and when two trials get the
    same name. `check_mesh=False` skips the check of the mesh against this
    machine's devices (for trials launched elsewhere).
    """
    from attnx.training.config import validate
    from attnx.training.config_overrides import apply_overrides

    names = []
    for index, overrides in enumerate(trials):
        for key, value in overrides.items():
            try:
                format_value(value)  # the trial's name and command line need it
            except ValueError as error:
                raise SweepError(f"trial {index} {overrides}: config.{key}: {error}") from None
        name = trial_name(overrides)
        trial_config = copy.deepcopy(config)
        trial_config.lock()  # an unknown key is an error, never a new field
        try:
            # As `attnx.main` sets them: a new model.name first (its own fields), then the rest.
            apply_overrides(trial_config, overrides)
        except ValueError as error:
            raise SweepError(f"trial {name}: {cli.one_line(error)}") from None
        _check_command_line(name, config, trial_config, overrides)
        try:
            validate(trial_config)
        except ValueError as error:
            # validate checks the mesh last, so skipping its error skips nothing else.
            device_error = str(error).startswith("config.mesh") and "devices" in str(error)
            if check_mesh or not device_error:
                raise SweepError(f"trial {name}: {cli.one_line(error)}") from None
        if name in names:
            raise SweepError(
                f"two trials have the same name {name}: {overrides}; make their overrides differ"
            )
        names.append(name)
    return names


def trial_command(config_arg: str, workdir: str, overrides: Mapping[str, Any]) -> list[str]:
    """The argv of `python -m attnx.main` for one trial."""
    return [
        "python",
        "-m",
        "attnx.main",
        f"--config={config_arg}",
        f"--workdir={workdir}",
        *override_flags(overrides),
    ]


def tpu_command(
    main_argv: Sequence[str],
    tpu_name: str,
    zone: str | None,
    remote_dir: str = "attnx",
) -> str:
    """One shell line that runs `main_argv` in `remote_dir` on every worker of a TPU VM."""
    remote = f"cd {shlex.quote(remote_dir)} && {shlex.join(main_argv)}"
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name]
    if zone:
        argv.append(f"--zone={zone}")
    argv += ["--worker=all", f"--command={remote}"]
    return shlex.join(argv)
