"""A run's workdir: its path resolved once, checked before anything heavy, and one writer.

Layout of `WORKDIR` (every path absolute, resolved at start):

  writer.lock        who is training here (JSON: pid, host, start time, command)
  config.json        the experiment config of the latest training start
  checkpoints/       Orbax step directories (`attnx.training.checkpoints`)
  vocab/             the run's tokenizer
  metrics.jsonl      the training record (train/ and eval/ rows), `tensorboard/`, `plots/`
  eval/ decode/ visualize/
                     what the read-only modes write; they never touch the rest

Only a training run writes the training record, and only one at a time: it
holds `writer.lock` while it runs. A second training run on the same workdir
refuses to start while the holder lives; a lock whose holder is gone (killed,
its host rebooted) is taken over with a warning. On the holder's own host
"alive" is checked on the process itself (its pid and start time, so a reused
pid does not count); a holder on another host (a shared gcsfuse workdir)
proves it is alive by touching the lock every `HEARTBEAT_SECONDS`, and counts
as gone after `STALE_AFTER_SECONDS` without a touch. Read-only modes take no
lock and may run beside training.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

from attnx.errors import RunError

LOCK_FILE = "writer.lock"
CONFIG_FILE = "config.json"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 600.0
READ_ONLY_MODES = ("eval", "decode", "visualize", "interpret")


# --- paths --------------------------------------------------------------------------------------


def resolve(path: str, *, what: str) -> str:
    """`path` as an absolute, symlink-free path (`~` expanded), resolved once at start.

    Orbax needs absolute paths (a relative one fails inside its background
    save thread), and a run that changes directory must keep writing where it
    started; so every path a user gives is resolved here, against the
    directory the command was started in.

    Raises:
      RunError: for a URL (`gs://...`), which ordinary file I/O would turn into
        a local directory named `gs:`.
    """
    if "://" in path:
        raise RunError(
            f"{what}={path}: attnx writes with ordinary file I/O; mount the bucket "
            "(gcsfuse, BUILD.md) and pass the mounted path"
        )
    if not path:
        raise RunError(f"{what} is empty; give a directory")
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


PATH_SUFFIXES = ("_dir", "_path", "_file")


def resolve_config_paths(config: Any) -> None:
    """Resolves (in place) every set config field named `*_dir`, `*_path` or `*_file`.

    E.g. `--config.task.data_dir=data` becomes the absolute path of `./data`
    at start, so every process and every later chdir sees the same directory.
    """

    def visit(section: Any, prefix: str) -> None:
        for key in list(section.keys()):
            value = section[key]
            if hasattr(value, "keys"):
                visit(value, f"{prefix}{key}.")
            elif isinstance(value, str) and value and key.endswith(PATH_SUFFIXES):
                section[key] = resolve(value, what=f"config.{prefix}{key}")

    visit(config, "")


def timestamp() -> str:
    """The current local time as used in the names of moved-aside files."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")


def move_aside(path: str, reason: str) -> str | None:
    """Renames an existing file or directory to `PATH.moved-TIME`; returns the new path.

    Used where attnx would otherwise replace something a user has (an older
    predictions file, a config that differs): it is kept, under a new name.
    """
    if not os.path.lexists(path):
        return None
    target = f"{path}.moved-{timestamp()}"
    os.rename(path, target)
    logging.warning("%s: moved %s aside to %s (not deleted)", reason, path, target)
    return target


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_writable(directory: str, what: str) -> None:
    """Creates and removes a probe file: the only test that holds for root and read-only mounts."""
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".attnx-write-test-")
    except OSError as error:
        raise RunError(
            f"{what}={directory} is not writable ({error.strerror or error}); "
            "choose a directory you can write to"
        ) from None
    os.close(fd)
    os.remove(probe)


def prepare_workdir(workdir: str, mode: str, *, writes: bool = True) -> str:
    """Resolves and checks `workdir` for `mode`; creates it for training. Cheap (no JAX).

    `train` creates the workdir (and missing parents) after checking that the
    nearest existing ancestor is a writable directory. The read-only modes need
    an existing workdir holding a checkpoint and the run's vocabulary, and a
    writable workdir for their own outputs (`writes=False`: a mode that only
    prints, such as decoding the user's inputs, may read a read-only mount).

    Returns:
      The resolved absolute path.

    Raises:
      RunError: naming the path and what is wrong with it.
    """
    path = resolve(workdir, what="--workdir")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise RunError(f"--workdir={workdir}: {path} exists and is not a directory")
    if mode == "train":
        if not os.path.isdir(path):
            ancestor = _nearest_existing(os.path.dirname(path))
            if not os.path.isdir(ancestor):
                raise RunError(
                    f"--workdir={workdir}: cannot create {path}: {ancestor} is not a directory"
                )
            _check_writable(ancestor, "--workdir")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as error:
                raise RunError(
                    f"--workdir={workdir}: cannot create {path}: {error.strerror or error}"
                ) from None
            logging.info("Created the workdir %s", path)
        _check_writable(path, "--workdir")
        return path
    if not os.path.isdir(path):
        raise RunError(
            f"--mode={mode} reads a trained run, but --workdir={workdir} ({path}) does not "
            f"exist (the nearest existing directory is {_nearest_existing(path)})"
        )
    checkpoints = os.path.join(path, "checkpoints")
    steps = (
        [name for name in os.listdir(checkpoints) if name.isdigit()]
        if os.path.isdir(checkpoints)
        else []
    )
    if not steps:
        raise RunError(
            f"--mode={mode} needs a checkpoint in {checkpoints}; there is none "
            "(train first, with --mode=train and the same --workdir)"
        )
    vocab = os.path.join(path, "vocab", "tokenizer.json")
    if not os.path.isfile(vocab):
        raise RunError(f"--mode={mode}: {path} has checkpoints but no vocabulary ({vocab})")
    if writes:
        _check_writable(path, "--workdir")
    return path


# --- the run's config ----------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def record_config(workdir: str, config: Any) -> None:
    """Writes the config of this training start to WORKDIR/config.json.

    A different config of an earlier start is kept (moved aside) and the keys
    that changed are logged, so a resumed run says what it now does differently.
    """
    as_dict = json.loads(json.dumps(config.to_dict(), default=repr))
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
        if previous == as_dict:
            return
        if isinstance(previous, dict):
            old, new = _flatten(previous), _flatten(as_dict)
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:10])
            more = f" and {len(changed) - 10} more" if len(changed) > 10 else ""
            logging.warning("The config differs from the previous start's: %s%s", shown, more)
        move_aside(path, "config.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(as_dict, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# --- one writer ---------------------------------------------------------------------------------


def _process_start_ticks(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return int(fields[19])  # Field 22 overall: starttime.
    except (IndexError, ValueError):
        return None


def _alive_here(pid: int, start_ticks: int | None) -> bool:
    """Whether process `pid` of this host is the one that wrote the lock."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # Alive, owned by another user.
    if start_ticks is not None:
        now = _process_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # The pid was reused by a newer process.
    return True


class WorkdirLockedError(RunError):
    """Another live training run holds the workdir."""


class WriterLock:
    """The workdir's single-writer lock (see the module docstring); use as a context manager.

    Args:
      workdir: the resolved workdir.
      clock: seconds since the epoch (injectable for tests).
    """

    def __init__(self, workdir: str, *, clock=time.time):
        self.path = os.path.join(workdir, LOCK_FILE)
        self._clock = clock
        self._held = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "start_ticks": _process_start_ticks(os.getpid()),
            "command": shlex.join(sys.argv),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
            return holder if isinstance(holder, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # Unreadable: written half by a process that died.

    def _holder_is_alive(self, holder: Mapping[str, Any]) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return _alive_here(holder["pid"], holder.get("start_ticks"))
        try:
            age = self._clock() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return False
        return age < STALE_AFTER_SECONDS

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the live holder."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:
                    continue  # Released between our two looks.
                if self._holder_is_alive(holder):
                    raise WorkdirLockedError(
                        f"workdir {os.path.dirname(self.path)} is being written by pid "
                        f"{holder.get('pid')} on host {holder.get('host')} (since "
                        f"{holder.get('started')}: {holder.get('command')}); wait for it "
                        f"to finish or stop it, or use another --workdir"
                    ) from None
                # Rename, not remove: of two runs taking over at once, only one succeeds.
                stale = f"{self.path}.stale-{timestamp()}-{os.getpid()}"
                try:
                    os.rename(self.path, stale)
                except FileNotFoundError:
                    continue
                logging.warning(
                    "workdir lock: pid %s on host %s (since %s) is no longer running; "
                    "taking the workdir over (its lock is kept as %s)",
                    holder.get("pid"),
                    holder.get("host"),
                    holder.get("started"),
                    stale,
                )
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._record(), f)
                f.write("\n")
            self._held = True
            self._heartbeat = threading.Thread(
                target=self._beat, name="attnx_writer_lock_heartbeat", daemon=True
            )
            self._heartbeat.start()
            return
        raise WorkdirLockedError(
            f"workdir {os.path.dirname(self.path)}: could not take {self.path} "
            "(other runs keep taking it)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError as error:
                logging.warning("workdir lock: cannot touch %s: %s", self.path, error)

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if not self._held:
            return
        self._held = False
        holder = self._read()
        if (
            holder
            and holder.get("pid") == os.getpid()
            and holder.get("host") == socket.gethostname()
        ):
            os.remove(self.path)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.release()
