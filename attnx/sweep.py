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
and then its own. Before anything runs, every trial's config is built,
checked to survive its own command line and validated, so a misspelt key, a
wrong type or a bad value stops the sweep at once. Every mistake of that kind
(and of the flags) ends the sweep with one line on stderr, `FATAL ...`, naming
the key, file or trial, and nothing written under ROOT.

  --run=local  runs the trials one after another, each in its own
               `python -m attnx.main` subprocess (isolated: its own JAX
               runtime and memory), its output in `ROOT/<trial>/train.log`.
               A trial that fails gets one line naming it, its exit status and
               its cause (the last `FATAL` line of its log, else its last line);
               the others still run. Then writes `ROOT/results.md` and
               `ROOT/results.jsonl` with the final value of every metric of
               every trial (the last value of each key in the trial's
               `metrics.jsonl`) and exits with status 1 and one `FATAL` line
               listing the failed trials, if any.
  --run=print  prints one command per trial that launches it on every worker
               of a TPU VM (`gcloud compute tpus tpu-vm ssh ... --worker=all`);
               ROOT is then a shared mount (gcsfuse), the same path on all workers.
               Collect the table afterwards with `--run=results`.
  --run=results  only (re)writes the results table from the trials' metrics.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from attnx import cli
from attnx.sweep_trials import (
    Overrides,
    SweepError,
    check_trials,
    format_value,
    load_sweep,
    override_flags,
    product,
    tpu_command,
    trial_command,
    trial_name,
    zip_,
)

# What a trial is and whether it is valid lives in `attnx.sweep_trials`; its public
# names are re-exported so that `from attnx.sweep import product, zip_` (experiment
# files) and `sweep.trial_name` etc. keep working.
__all__ = [
    "Overrides",
    "SweepError",
    "check_trials",
    "failure_cause",
    "final_metrics",
    "format_value",
    "load_sweep",
    "main",
    "override_flags",
    "product",
    "run_local",
    "tpu_command",
    "trial_command",
    "trial_name",
    "write_results",
    "zip_",
]

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


# --------------------------------------------------------------------------- results


def final_metrics(workdir: str) -> dict[str, Any]:
    """The last value of every key in `workdir/metrics.jsonl` ('step': the last step).

    Only the training run's own rows count: a row with a "mode" key came from
    a read-only mode (`eval`, `decode`, `visualize`) of an older attnx, which
    wrote into the training record (today they write `workdir/<mode>/`), and
    would otherwise pass for the training run's final evaluation. Lines cut
    short by a killed run and rows that are not JSON objects are skipped.
    """
    path = os.path.join(workdir, "metrics.jsonl")
    final: dict[str, Any] = {}
    if not os.path.exists(path):
        return final
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed run
            if not isinstance(record, dict) or "mode" in record:
                continue
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

    Each row has 'trial', 'overrides', 'status', 'seconds' and 'metrics', and
    may have 'cause' and 'log' (a failed trial's reason and log file).
    Table columns: trial, status, the swept keys, step, then every metric
    (eval/ before train/); failed trials' causes follow the table. Returns the
    Markdown text.
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
    causes = [row for row in rows if row.get("cause")]
    if causes:
        lines.append("")
        lines += [f"- {row['trial']}: {row['cause']} ({row.get('log')})" for row in causes]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text)
    return text


# --------------------------------------------------------------------------- runs

# A failure's cause in one line: long enough for a FATAL message, short enough to read.
_MAX_CAUSE = 300


def failure_cause(log_path: str, offset: int = 0) -> str:
    """Why a trial failed, from its log from byte `offset` on (this run's part).

    The last line starting with `FATAL` (attnx's one-line errors), else the
    last non-empty line (an exception's last traceback line), cut to 300
    characters.
    """
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"no log ({error.strerror})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("FATAL")]
    cause = (fatal or lines or ["no output"])[-1]
    return cause if len(cause) <= _MAX_CAUSE else cause[: _MAX_CAUSE - 3] + "..."


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


def _wait(process: subprocess.Popen) -> tuple[int, bool]:
    """The trial's exit code, and whether the user pressed Ctrl-C meanwhile.

    Ctrl-C in a terminal reaches the trial too (same process group), so the
    first one waits for it to stop by itself; a second sends SIGTERM (the
    trial saves a checkpoint and exits), a third kills it.
    """
    presses = 0
    while True:
        try:
            return process.wait(), presses > 0
        except KeyboardInterrupt:
            presses += 1
            if presses == 2:
                process.terminate()
            elif presses > 2:
                process.kill()


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
    A failed trial gets one line (name, exit status, seconds, cause, log) and
    the next trial runs; Ctrl-C stops the sweep after the current trial, whose
    row then has the status 'interrupted' and is the last one.
    """
    rows = []
    for index, name in enumerate(names):
        workdir = os.path.join(root, name)
        os.makedirs(workdir, exist_ok=True)
        argv = trial_command(config_file, workdir, commands[index])
        argv[0] = sys.executable  # the interpreter running the sweep
        log_path = os.path.join(workdir, "train.log")
        print(f"[{index + 1}/{len(names)}] {name}", flush=True)
        start = time.time()
        with open(log_path, "ab") as log:
            # The log grows across reruns; this run's cause is after this offset.
            offset = log.tell()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
            code, interrupted = _wait(process)
        seconds = round(time.time() - start, 1)
        cause = None
        if interrupted:
            status = "interrupted"
            print(f"    interrupted {name} after {seconds} s (log: {log_path})", flush=True)
        elif code == 0:
            status = "ok"
            print(f"    ok in {seconds} s (log: {log_path})", flush=True)
        else:
            status = f"failed ({_exit_status(code)})"
            cause = failure_cause(log_path, offset)
            print(
                f"    FAILED {name}: {_exit_status(code)} after {seconds} s: {cause} "
                f"(log: {log_path})",
                flush=True,
            )
        rows.append(
            dict(
                trial=name,
                overrides=own_overrides[index],
                status=status,
                seconds=seconds,
                cause=cause,
                log=log_path,
                metrics=final_metrics(workdir),
            )
        )
        if interrupted:
            break
    return rows


def _join(root: str, name: str) -> str:
    # ROOT is a path on the TPU VM's workers, which are POSIX machines.
    return f"{root.rstrip('/')}/{name}"


def _check_flags(root: str) -> None:
    """The flag mistakes that need no experiment: one FATAL line, nothing written."""
    if not root:
        cli.fatal("--workdir is empty: give ROOT, the directory that holds the trials")
    if "://" in root:
        cli.fatal(
            f"--workdir={root}: trials write their workdirs with ordinary file I/O; "
            "mount the bucket (gcsfuse, BUILD.md) and pass the mounted path"
        )
    if os.path.exists(root) and not os.path.isdir(root):
        cli.fatal(f"--workdir={root} is a file, not a directory")
    if FLAGS.run == "results" and not os.path.isdir(root):
        cli.fatal(f"--run=results: --workdir={root} does not exist; nothing ran there")
    if FLAGS.run == "print" and not FLAGS.tpu_name:
        cli.fatal("--run=print needs --tpu_name (and usually --zone)")


def main(argv: list[str]) -> None:
    del argv  # cli.parse_flags refused arguments that are not flags
    # 'experiments/NAME.py[:ARG]' as given; FLAGS.config is its config with the
    # command line's overrides applied (a bad key or type failed already).
    config_file = config_flags.get_config_filename(FLAGS["config"])
    common = cli.config_overrides()
    root = FLAGS.workdir
    _check_flags(root)
    own_overrides = load_sweep(config_file)
    try:
        # Printed trials run on the TPU VM's devices, not on this machine's.
        names = check_trials(FLAGS.config, own_overrides, check_mesh=FLAGS.run != "print")
    except SweepError as error:
        cli.fatal(f"--config={config_file}: {error}")
    # The sweep command line's overrides apply to every trial; a trial's own win.
    commands = [{**common, **own} for own in own_overrides]

    if FLAGS.run == "print":
        for name, overrides in zip(names, commands, strict=True):
            command = trial_command(config_file, _join(root, name), overrides)
            if FLAGS.distributed:
                command.append("--distributed")
            print(tpu_command(command, FLAGS.tpu_name, FLAGS.zone, FLAGS.remote_dir))
        return
    try:
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
        print(write_results(root, rows), end="", flush=True)
    except OSError as error:
        # A full disk or a directory the user may not write: the path says which.
        cli.fatal(f"--workdir={root}: {error}")
    if rows and rows[-1]["status"] == "interrupted":
        done = len(rows) - 1
        cli.fatal(
            f"interrupted during trial {rows[-1]['trial']} ({done} of {len(names)} trials "
            "done); run the same command again to resume it from its checkpoint"
        )
    failed = [row for row in rows if row["status"].startswith("failed")]
    if failed:
        causes = "; ".join(f"{row['trial']} ({row['cause']})" for row in failed)
        cli.fatal(f"{len(failed)} of {len(rows)} trials failed: {causes}")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
