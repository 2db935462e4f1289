"""Hyperparameter sweeps over an experiment file.

  python -m attnx.sweep --config=experiments/NAME.py[:ARG] --workdir=ROOT
      [--config.any.key=value ...] [--run=local|print|results]
      [--tpu_name=NAME --zone=ZONE]

An experiment defines the trials with a `sweep(arg=None)` function next to
`get_config`, returning a list of overrides (dicts of dotted config keys ->
values); `product` and `zip_` build such lists:

  def sweep(arg=None):
      return product(**{"train.learning_rate": [0.5, 1.0], "model.d_model": [64, 128]})

Every trial trains in `ROOT/<trial name>` (see `trial_name`), with the
overrides of the sweep command line (`--config.k=v`, applied to every trial)
and then its own. Before anything runs, every trial's config is built and
validated, so a misspelt key or a wrong type stops the sweep at once.

  --run=local  runs the trials one after another, each in its own
               `python -m attnx.main` subprocess (isolated: its own JAX
               runtime and memory), its output in `ROOT/<trial>/train.log`;
               then writes `ROOT/results.md` and `ROOT/results.jsonl` with the
               final value of every metric of every trial (the last value of
               each key in the trial's `metrics.jsonl`).
  --run=print  prints one command per trial that launches it on every worker
               of a TPU VM (`gcloud compute tpus tpu-vm ssh ... --worker=all`);
               ROOT is then a shared mount (gcsfuse), the same path on all workers.
               Collect the table afterwards with `--run=results`.
  --run=results  only (re)writes the results table from the trials' metrics.
"""

import copy
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

Overrides = dict[str, Any]

FLAGS = flags.FLAGS


def _define_flags() -> None:
    # Defined only when run as a program: experiment files import this module
    # for `product` / `zip_`, and `attnx.main` defines its own --config.
    config_flags.DEFINE_config_file("config", None, "Experiment file: experiments/NAME.py[:ARG].")
    flags.DEFINE_string("workdir", None, "ROOT: each trial runs in ROOT/<trial name>.")
    flags.DEFINE_enum("run", "local", ["local", "print", "results"], "What to do with the trials.")
    flags.DEFINE_string("tpu_name", None, "--run=print: the TPU VM's name.")
    flags.DEFINE_string("zone", None, "--run=print: the TPU VM's zone (else gcloud's default).")
    flags.DEFINE_string("remote_dir", "attnx", "--run=print: the attnx checkout on the TPU VM.")
    flags.DEFINE_bool(
        "distributed",
        False,
        "--run=print: add --distributed (multi-host pod slices) to each command.",
    )
    flags.mark_flags_as_required(["config", "workdir"])


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


def load_sweep(config_arg: str) -> list[Overrides]:
    """Calls `sweep(arg)` of the experiment file named by 'PATH[:ARG]'."""
    path, _, arg = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("attnx_experiment", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"--config={config_arg}: cannot load {path!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "sweep"):
        raise ValueError(
            f"{path} defines no sweep(); add `def sweep(arg=None)` returning a list of overrides"
        )
    trials = module.sweep(arg or None)
    if not isinstance(trials, list) or not trials:
        raise ValueError(f"{path}: sweep({arg or None!r}) must return a non-empty list of dicts")
    for trial in trials:
        if not isinstance(trial, Mapping):
            raise TypeError(f"{path}: sweep() returned {trial!r}; every trial must be a dict")
    return [dict(trial) for trial in trials]


def check_trials(config, trials: Sequence[Overrides], *, check_mesh: bool = True) -> list[str]:
    """Builds and validates every trial's config; returns the trial names.

    Raises ValueError / TypeError / KeyError naming the trial and the key when
    an override names no field, has the wrong type or breaks `validate`, and
    when two trials get the same name. `check_mesh=False` skips the check of
    the mesh against this machine's devices (for trials launched elsewhere).
    """
    from attnx.training.config import validate

    names = []
    for overrides in trials:
        name = trial_name(overrides)
        trial_config = copy.deepcopy(config)
        for key, value in overrides.items():
            try:
                config_path.set_value(key, trial_config, value)
            except (AttributeError, KeyError) as error:
                raise KeyError(f"trial {name}: config.{key} does not exist ({error})") from None
            except TypeError as error:
                raise TypeError(f"trial {name}: config.{key}={value!r}: {error}") from None
        try:
            validate(trial_config)
        except ValueError as error:
            # validate checks the mesh last, so skipping its error skips nothing else.
            device_error = str(error).startswith("config.mesh") and "devices" in str(error)
            if check_mesh or not device_error:
                raise ValueError(f"trial {name}: {error}") from None
        if name in names:
            raise ValueError(f"two trials have the same name {name!r}; make their overrides differ")
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


def _join(root: str, name: str) -> str:
    # ROOT is a path on the TPU VM's workers, which are POSIX machines.
    return f"{root.rstrip('/')}/{name}"


# --------------------------------------------------------------------------- results


def final_metrics(workdir: str) -> dict[str, float]:
    """The last value of every key in `workdir/metrics.jsonl` ('step': the last step)."""
    path = os.path.join(workdir, "metrics.jsonl")
    final: dict[str, float] = {}
    if not os.path.exists(path):
        return final
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            final.update(record)
    return final


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return ""
    return str(value).replace("|", "\\|")


def write_results(root: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes ROOT/results.jsonl (one object per trial) and ROOT/results.md (a table).

    Each row has 'trial', 'overrides', 'status', 'seconds' and 'metrics'.
    Table columns: trial, status, the swept keys, step, then every metric
    (eval/ before train/). Returns the Markdown text.
    """
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(dict(row), sort_keys=True) + "\n")
    swept = list(dict.fromkeys(key for row in rows for key in row["overrides"]))
    metric_keys = sorted(
        {key for row in rows for key in row["metrics"] if key != "step"},
        key=lambda k: (not k.startswith("eval/"), k),
    )
    header = ["trial", "status", "seconds", *swept, "step", *metric_keys]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [row["trial"], row["status"], _cell(row.get("seconds"))]
        # Swept values as the command line set them (1.0 stays 1.0, not 1).
        cells += [
            format_value(row["overrides"][key]) if key in row["overrides"] else "" for key in swept
        ]
        cells.append(_cell(row["metrics"].get("step")))
        cells += [_cell(row["metrics"].get(key)) for key in metric_keys]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text)
    return text


# --------------------------------------------------------------------------- runs


def run_local(
    config_file: str,
    root: str,
    names: Sequence[str],
    own_overrides: Sequence[Overrides],
    commands: Sequence[Overrides],
) -> list[dict[str, Any]]:
    """Runs the trials one after another in subprocesses; returns the result rows.

    `own_overrides` are each trial's own (they label the results table),
    `commands` what its command line sets (the sweep's common overrides too).
    """
    rows = []
    for index, name in enumerate(names):
        workdir = os.path.join(root, name)
        os.makedirs(workdir, exist_ok=True)
        argv = trial_command(config_file, workdir, commands[index])
        argv[0] = sys.executable  # the interpreter running the sweep
        print(f"[{index + 1}/{len(names)}] {name}", flush=True)
        start = time.time()
        with open(os.path.join(workdir, "train.log"), "ab") as log:
            code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
        seconds = round(time.time() - start, 1)
        status = "ok" if code == 0 else f"failed (exit {code})"
        print(f"    {status} in {seconds} s (log: {workdir}/train.log)", flush=True)
        rows.append(
            dict(
                trial=name,
                overrides=own_overrides[index],
                status=status,
                seconds=seconds,
                metrics=final_metrics(workdir),
            )
        )
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # 'experiments/NAME.py[:ARG]' as given; FLAGS.config is its config with the
    # command line's overrides applied (a bad key or type failed already).
    config_file = config_flags.get_config_filename(FLAGS["config"])
    common = dict(config_flags.get_override_values(FLAGS["config"]))
    own_overrides = load_sweep(config_file)
    # Printed trials run on the TPU VM's devices, not on this machine's.
    names = check_trials(FLAGS.config, own_overrides, check_mesh=FLAGS.run != "print")
    # The sweep command line's overrides apply to every trial; a trial's own win.
    commands = [{**common, **own} for own in own_overrides]
    root = FLAGS.workdir
    if "://" in root:
        raise app.UsageError(
            f"--workdir={root}: trials write their workdirs with ordinary file I/O; "
            "mount the bucket (gcsfuse, BUILD.md) and pass the mounted path"
        )

    if FLAGS.run == "print":
        if not FLAGS.tpu_name:
            raise app.UsageError("--run=print needs --tpu_name (and usually --zone)")
        for name, overrides in zip(names, commands, strict=True):
            command = trial_command(config_file, _join(root, name), overrides)
            if FLAGS.distributed:
                command.append("--distributed")
            print(tpu_command(command, FLAGS.tpu_name, FLAGS.zone, FLAGS.remote_dir))
        return
    if FLAGS.run == "results":
        rows = [
            dict(
                trial=name,
                overrides=own,
                status="",
                seconds=None,
                metrics=final_metrics(os.path.join(root, name)),
            )
            for name, own in zip(names, own_overrides, strict=True)
        ]
    else:
        rows = run_local(config_file, root, names, own_overrides, commands)
    print(write_results(root, rows), end="")
    failed = [row["trial"] for row in rows if row["status"].startswith("failed")]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(rows)} trials failed: {failed}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
