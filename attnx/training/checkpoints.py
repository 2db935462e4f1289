"""Checkpoints: an Orbax `CheckpointManager` that a killed run can always resume from.

A checkpoint is one directory per step, `DIR/<step>/`, holding three items:

  state   the TrainState pytree (parameters, optimizer state, step, RNG key
          and any model-specific arrays), written by Orbax's standard pytree
          handler: every process writes its own shards; restoring reads them
          onto whatever shardings the *target* asks for, so a checkpoint written
          on an 8-device mesh restores on 1 device or onto another mesh.
  data    the data iterator's position (`BatchIterator.get_state()`), one JSON
          file per process, because every process reads its own shard of the
          data and so has its own position.
  meta    JSON: step, attnx version, a hash of the experiment config, and the
          number of processes that wrote the checkpoint.

Retention keeps the union of the last `keep` checkpoints and the best
`keep_best` by a metric (Orbax `LatestN` or `BestN` preservation policies).

Orbax commits a step atomically: it writes into `<step>.orbax-checkpoint-tmp-*`,
drops a `commit_success.txt` marker in it, then renames it to `<step>`. A run
killed mid-save leaves the temporary directory behind; a disk or copy error can
leave a committed directory with missing or truncated files. `restore` checks
the newest step first, moves anything broken aside as `<step>.corrupt-<time>`
(never deleting it), logs why, and falls back to the newest good step.

Preemption: `install_sigterm_handler()` turns SIGTERM into a flag that the loop
polls with `should_stop(step)`; the loop then saves with `force=True`, calls
`close()` (which waits for the asynchronous save) and exits normally.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)
# Orbax writes this marker into a step directory (and each item directory)
# before committing it, on local disks and on object stores alike.
COMMIT_MARKER = "commit_success.txt"
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_MARKER = ".corrupt-"


# --- per-process JSON item (data iterator positions) -------------------------------------------


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Each process saves and restores its own JSON dict: `process_<i>-of-<n>.json`."""

    def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file_name()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> Any:
        """This process's dict, or None when another number of processes wrote it."""
        path = epath.Path(directory) / _process_file_name()
        if path.exists():
            return json.loads(path.read_text())
        written = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
        if not written:
            raise FileNotFoundError(f"no per-process JSON files in {directory}")
        # Another process count's positions mean nothing to this process's
        # iterator; the caller repositions the data by the step instead.
        logging.warning(
            "checkpoint: the data iterator state in %s was written by other processes (%s); "
            "this run has %d processes.",
            directory,
            written[0],
            jax.process_count(),
        )
        return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


def _process_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


# --- helpers -------------------------------------------------------------------------------------


def config_hash(config: Any) -> str:
    """A short, stable hash of an experiment config (ConfigDict or mapping)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(as_dict, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _attnx_version() -> str:
    try:
        return importlib.metadata.version("attnx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _path_name(path: tuple[Any, ...]) -> str:
    """Orbax's name for a pytree leaf: its keys joined by dots (`opt_state.0.mu.w`)."""
    parts = []
    for key in path:
        for field in ("key", "name", "idx"):
            if hasattr(key, field):
                parts.append(str(getattr(key, field)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def _abstract(leaf: Any) -> jax.ShapeDtypeStruct:
    """The restore target of one leaf: shape, dtype and the sharding to place it on."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"restore: every target leaf needs a sharding (got {leaf!r}); pass jax.Arrays or "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
        )
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _stored_shape_dtype(leaf: jax.ShapeDtypeStruct) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype as Orbax stores the leaf (typed PRNG keys are stored as key data)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def _agree(ok: bool) -> bool:
    """True only if `ok` holds on every process (so all processes take the same branch)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class CorruptCheckpointError(RuntimeError):
    """A step directory that cannot be restored (half-written, truncated, missing files)."""


# --- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores TrainState + data iterator state with Orbax.

    Args:
      directory: where step directories go (created if missing).
      keep: how many of the latest checkpoints to keep (>= 1).
      best_metric: a key of the `metrics` passed to `save` (e.g. 'eval/bleu'); with it the
        best `keep_best` checkpoints by that metric are kept too. None: keep only the latest.
      best_mode: 'max' or 'min': which end of `best_metric` is best.
      keep_best: how many best checkpoints to keep (>= 1 when `best_metric` is set).
      every_steps: `save(step, ...)` writes only when `step` is a multiple of this,
        unless `force=True`.
      async_save: write in a background thread; `save` returns once the arrays are copied
        off the devices.
      config_hash: stored in each checkpoint's meta; a restore under another hash warns.

    All processes must call `save`, `restore`, `wait` and `close`; Orbax decides which
    process writes what.
    """

    def __init__(
        self,
        directory: str | epath.PathLike,
        *,
        keep: int = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        every_steps: int = 1,
        async_save: bool = True,
        config_hash: str | None = None,
    ):
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        if best_mode not in ("max", "min"):
            raise ValueError(f"checkpoint.best_mode must be 'max' or 'min', got {best_mode!r}")
        if best_metric and keep_best < 1:
            raise ValueError(
                f"checkpoint.keep_best must be >= 1 when checkpoint.best_metric is set "
                f"({best_metric!r}), got {keep_best}"
            )
        if every_steps < 1:
            raise ValueError(f"checkpoint.every_steps must be >= 1, got {every_steps}")
        self.directory = epath.Path(directory)
        self.best_metric = best_metric or None
        self.config_hash = config_hash
        self._stop_requested = threading.Event()
        self._previous_sigterm_handler: Any = None

        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=keep)]
        best_fn = None
        if self.best_metric:
            best_fn = self._metric_value
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    # BestN keeps the tail of the ascending order; reversed for 'min'.
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for name, save_args, restore_args in (
            (STATE, ocp.args.StandardSave, ocp.args.StandardRestore),
            (DATA, ProcessJsonSave, ProcessJsonRestore),
            (META, ocp.args.JsonSave, ocp.args.JsonRestore),
        ):
            registry.add(name, save_args)
            registry.add(name, restore_args)
        policies_lib = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            # Multiples of every_steps, and (with several processes) the step all agree to
            # stop at after a preemption notice. No extra save at the first step.
            save_decision_policy=policies_lib.AnySavePolicy(
                [
                    policies_lib.FixedIntervalPolicy(every_steps),
                    policies_lib.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # best_fn makes Orbax store the metrics with each step (and rank by them).
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            # Half-written steps are moved aside by `restore`, not deleted.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=registry
        )

    def _metric_value(self, metrics: Mapping[str, Any]) -> float:
        return float(metrics[self.best_metric])

    # --- saving ---

    def save(
        self,
        step: int,
        train_state: Any,
        data_state: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts an (asynchronous) save of step `step`; returns whether one was started.

        Args:
          step: the training step the state belongs to.
          train_state: any pytree of jax.Arrays (typed PRNG keys included).
          data_state: this process's data iterator position, a JSON-serialisable dict.
          metrics: scalar metrics of this step; those with `best_metric` rank the step
            among the best. Steps without it are kept only while among the latest.
          force: save even if `step` is not a multiple of `every_steps`.
        """
        step = int(step)
        if step in self._manager.all_steps():
            # e.g. a preemption save right after a regular save of the same step.
            logging.info("checkpoint: step %d is already saved; not saving it again", step)
            return False
        tracked = None
        if self.best_metric and metrics is not None and self.best_metric in metrics:
            tracked = {self.best_metric: float(metrics[self.best_metric])}
        meta = {
            "step": step,
            "attnx_version": _attnx_version(),
            "config_hash": self.config_hash,
            "process_count": jax.process_count(),
        }
        args = ocp.args.Composite(
            **{
                STATE: ocp.args.StandardSave(train_state),
                DATA: ProcessJsonSave(dict(data_state)),
                META: ocp.args.JsonSave(meta),
            }
        )
        saved = self._manager.save(step, args=args, metrics=tracked, force=force)
        if saved:
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    # --- restoring ---

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, Any] | None:
        """Restores `(train_state, data_state)` onto `target`'s shardings; None if no checkpoint.

        Args:
          step: a given step, or None for the newest good one. A given step that is
            broken raises CorruptCheckpointError (nothing is moved aside).
          target: a pytree like the saved train state whose leaves are jax.Arrays or
            jax.ShapeDtypeStruct with shardings (e.g. from `jax.eval_shape` plus
            `state_shardings`); the result has its structure, dtypes and shardings.

        Returns:
          `(train_state, data_state)`; `data_state` is None when the checkpoint was
          written by a different number of processes (the data restarts).
        """
        abstract = jax.tree.map(_abstract, target)
        self.wait()
        half_written = self._move_aside_uncommitted() if step is None else []
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(
                    f"checkpoint: no step {step} in {self.directory}; steps: {sorted(steps)}"
                )
            return self._restore_step(int(step), abstract)
        newest = max(steps[:1] + half_written, default=None)
        for candidate in steps:
            try:
                restored = self._restore_step(candidate, abstract)
            except CorruptCheckpointError as error:
                logging.warning("checkpoint: unusable checkpoint, %s", error)
                self._move_aside(candidate)
                continue
            if candidate != newest:
                logging.warning(
                    "checkpoint: fell back to step %d, the newest good checkpoint in %s "
                    "(newer steps were moved aside)",
                    candidate,
                    self.directory,
                )
            return restored
        return None

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, Any]:
        """Restores one step; CorruptCheckpointError if its files are broken or missing."""
        problem = self._missing_files(step)
        metadata = None
        if problem is None:
            try:
                metadata = self._manager.item_metadata(step)[STATE]
            except Exception as error:  # any read error means a broken step
                problem = f"cannot read its metadata: {type(error).__name__}: {str(error)[:500]}"
        if not _agree(problem is None):
            raise CorruptCheckpointError(
                f"step {step}: {problem or 'another process could not read it'}"
            )
        # A target that does not match is the caller's error (e.g. a changed model),
        # not a broken checkpoint: raise it plainly so nothing gets moved aside.
        self._check_target(step, abstract, metadata)
        problem = None
        restored = None
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(abstract),
                        DATA: ProcessJsonRestore(),
                        META: ocp.args.JsonRestore(),
                    }
                ),
            )
        except Exception as error:
            problem = f"restoring failed: {type(error).__name__}: {str(error)[:500]}"
        if not _agree(problem is None):
            raise CorruptCheckpointError(
                f"step {step}: {problem or 'restoring failed on another process'}"
            )
        meta = restored[META]
        if self.config_hash and meta.get("config_hash") not in (None, self.config_hash):
            logging.warning(
                "checkpoint: step %d was written under config hash %s; this run's is %s",
                step,
                meta.get("config_hash"),
                self.config_hash,
            )
        logging.info("checkpoint: restored step %d from %s", step, self.directory)
        return restored[STATE], restored[DATA]

    def _missing_files(self, step: int) -> str | None:
        """Why the directory of `step` is incomplete, or None if every item is committed."""
        path = self.directory / str(step)
        if not (path / COMMIT_MARKER).exists():
            return f"{path} has no commit marker ({COMMIT_MARKER}): it was never fully written"
        for item in ITEMS:
            if not (path / item / COMMIT_MARKER).exists():
                return f"item '{item}' is missing or uncommitted in {path}"
        return None

    def _check_target(self, step: int, abstract: Any, metadata: Any) -> None:
        stored = {
            leaf.name: leaf
            for leaf in jax.tree.leaves(metadata.tree)
            if hasattr(leaf, "name") and hasattr(leaf, "shape")
        }
        wanted = {_path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(abstract)}
        missing = sorted(set(wanted) - set(stored))
        extra = sorted(set(stored) - set(wanted))
        if missing or extra:
            raise ValueError(
                f"checkpoint step {step} does not match the restore target: leaves only in "
                f"the target: {missing[:5]}; only in the checkpoint: {extra[:5]}"
            )
        for name, leaf in wanted.items():
            shape, dtype = _stored_shape_dtype(leaf)
            have = stored[name]
            if tuple(have.shape) != shape or np.dtype(have.dtype) != dtype:
                raise ValueError(
                    f"checkpoint step {step}: '{name}' is {have.dtype}{list(have.shape)} in "
                    f"the checkpoint but {dtype}{list(shape)} in the restore target"
                )

    def _move_aside_uncommitted(self) -> list[int]:
        """Moves half-written steps (Orbax temporary dirs, dirs without marker) aside."""
        moved = []
        if jax.process_index() == 0 and self.directory.exists():
            for path in sorted(self.directory.iterdir()):
                name = path.name
                if not path.is_dir() or CORRUPT_MARKER in name:
                    continue
                step = name.split(".")[0]
                if not step.isdigit():
                    continue
                if TMP_MARKER in name:
                    reason = f"{name} is an unfinished save (Orbax never committed it)"
                elif name == step and not (path / COMMIT_MARKER).exists():
                    reason = f"{name} has no commit marker ({COMMIT_MARKER})"
                else:
                    continue
                logging.warning("checkpoint: step %s is half-written: %s", step, reason)
                self._rename_aside(path, int(step))
                moved.append(int(step))
        _sync("attnx_checkpoint_move_aside_uncommitted")
        return moved  # on process 0 only: it alone looked (for the log)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            self._rename_aside(self.directory / str(step), step)
        _sync(f"attnx_checkpoint_move_aside_{step}")
        self._manager.reload()

    def _rename_aside(self, path: epath.Path, step: int) -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        target = path.parent / f"{step}{CORRUPT_MARKER}{stamp}"
        path.rename(target)
        logging.warning("checkpoint: moved %s aside to %s (not deleted)", path, target)

    # --- bookkeeping ---

    def latest_step(self) -> int | None:
        """The newest committed step (not yet checked for corruption), or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The best step by `best_metric` (the latest if no metric is tracked)."""
        return self._manager.best_step()

    def wait(self) -> None:
        """Blocks until the asynchronous save in flight (if any) is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, releases Orbax's threads and the SIGTERM handler."""
        self._manager.wait_until_finished()
        self._manager.close()
        if self._previous_sigterm_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- preemption ---

    def install_sigterm_handler(self) -> None:
        """Makes SIGTERM set the stop flag instead of killing the process (main thread only).

        With several processes and JAX's preemption service on (the default), JAX already
        listens for SIGTERM and picks a step at which all processes stop; `should_stop`
        asks it, and installing a Python handler would take SIGTERM away from it.
        """
        if _use_preemption_service():
            logging.info("checkpoint: several processes; SIGTERM goes to JAX's preemption service")
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            del signum, frame
            logging.warning("checkpoint: SIGTERM received; stopping after this step")
            self._stop_requested.set()

        self._previous_sigterm_handler = signal.signal(signal.SIGTERM, on_sigterm)

    def should_stop(self, step: int) -> bool:
        """True once a preemption (SIGTERM) was received; call after every step.

        With several processes all must call this at every step: it turns True on all of
        them at the same step (JAX's preemption sync point, or an all-gather of the flag
        when the preemption service is off).
        """
        if _use_preemption_service():
            return multihost_utils.reached_preemption_sync_point(int(step))
        return not _agree(not self._stop_requested.is_set())


def _use_preemption_service() -> bool:
    return jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
