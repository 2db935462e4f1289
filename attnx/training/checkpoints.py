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

and a checksum manifest of all its files (`checkpoint_integrity.py`).

Retention keeps the union of the last `keep` checkpoints and the best
`keep_best` by a metric (Orbax `LatestN` or `BestN` preservation policies);
older steps are deleted by that policy, which the config sets.

Orbax commits a step atomically: it writes into `<step>.orbax-checkpoint-tmp`,
and attnx's finalize writes the manifest, then Orbax drops a
`commit_success.txt` marker in it and renames it to `<step>`. A run killed
mid-save leaves the temporary directory behind. `restore` moves such leftovers
aside as `<step>.corrupt-<time>` (never deleting them), checks the newest step
against its manifest, moves it aside too if a file is missing, truncated or
fails its checksum (naming the file), and falls back to the newest whole step.
Whether a step is broken is decided from its files only: a restore that fails
on a whole step is raised as the error it is, and nothing is moved.

A save that fails (a full disk, a permission) stops the run: `poll`, `save`,
`wait` and `close` raise `CheckpointSaveError` naming the step, the path and
the cause, once the save in flight has ended. A read-only `Checkpointer`
(`read_only=True`, for eval/decode/visualize beside a live training run)
saves nothing and moves nothing: it skips what is unfinished or broken.

Preemption: `install_sigterm_handler()` turns SIGTERM (and a first Ctrl-C) into
a flag that the loop polls with `should_stop(step)`; the loop then saves with
`force=True`, calls `close()` (which waits for the asynchronous save) and exits
normally.
"""

from __future__ import annotations

import datetime
import logging as python_logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from attnx.errors import RunError
from attnx.training import checkpoint_integrity as integrity
from attnx.training.checkpoint_items import (
    ProcessJsonRestore,
    ProcessJsonSave,
    abstract_target,
    attnx_version,
    check_target,
)
from attnx.training.multihost import all_agree, sync
from attnx.training.preemption import StopRequests

STATE, DATA, META = "state", "data", "meta"
ITEMS = (STATE, DATA, META)
COMMIT_MARKER = integrity.COMMIT_MARKER
TMP_MARKER = ".orbax-checkpoint-tmp"
CORRUPT_MARKER = ".corrupt-"


class _WithoutTrackedMetricWarning(python_logging.Filter):
    """Drops two Orbax warnings about what attnx does on purpose.

    A save without the best-by metric: attnx saves between evaluations; BestN
    ranks the steps that carry the metric and keeps the others while they are
    among the latest. A read-only directory: the read-only modes open it so.
    """

    EXPECTED = (
        "did not provide metrics",
        "Given directory is read only",
        "CheckpointManagerOptions.read_only=True",
    )

    def filter(self, record: python_logging.LogRecord) -> bool:
        return not any(text in str(record.msg) for text in self.EXPECTED)


def _quiet_tracked_metric_warning() -> None:
    logger = python_logging.getLogger("absl")
    if not any(isinstance(f, _WithoutTrackedMetricWarning) for f in logger.filters):
        logger.addFilter(_WithoutTrackedMetricWarning())


class CorruptCheckpointError(RuntimeError):
    """A step directory whose files are broken (missing, truncated, failing their checksums)."""


class CheckpointSaveError(RunError):
    """A checkpoint save that did not commit (the run must stop: nothing would be saved)."""


def _cause(error: BaseException) -> str:
    """The cause of a failed save or restore in one line, the operating system's reason first.

    TensorStore's messages run to kilobytes, with the reason (`File too large`,
    `No space left on device`) deep inside as `os_error_code='27'`.
    """
    message = " ".join(str(error).split())
    code = getattr(error, "errno", None)
    if not isinstance(code, int):
        found = re.search(r"os_error_code='?(\d+)", message)
        code = int(found.group(1)) if found else None
    reason = f"{os.strerror(code)} (errno {code}); " if code else ""
    return f"{reason}{type(error).__name__}: {message[:400]}"


# --- the checkpointer ----------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores TrainState + data iterator state with Orbax.

    Args:
      directory: where step directories go (created if missing, unless read-only).
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
      read_only: for the modes that read a run (possibly beside its live training):
        `save` is refused and `restore` moves nothing aside.

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
        read_only: bool = False,
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
        # Orbax refuses relative paths, and only inside its background save thread.
        self.directory = epath.Path(os.path.abspath(os.fspath(directory)))
        self.best_metric = best_metric or None
        self.config_hash = config_hash
        self.read_only = read_only
        self.every_steps = every_steps
        self._stop = StopRequests()
        self._pending: int | None = None  # The step of the save in flight.
        _quiet_tracked_metric_warning()

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
        if read_only:
            # Orbax warns about every saving option it then ignores; pass none.
            options = ocp.CheckpointManagerOptions(
                read_only=True,
                create=False,
                cleanup_tmp_directories=False,
                enable_async_checkpointing=False,
            )
        else:
            options = ocp.CheckpointManagerOptions(
                # Multiples of every_steps, and (with several processes) the step all agree
                # to stop at after a preemption notice. No extra save at the first step.
                save_decision_policy=policies_lib.AnySavePolicy(
                    [
                        policies_lib.FixedIntervalPolicy(every_steps),
                        policies_lib.PreemptionCheckpointingPolicy(),
                    ]
                ),
                preservation_policy=policies_lib.AnyPreservationPolicy(policies),
                # best_fn makes Orbax store the metrics with each step (and rank by them).
                best_fn=best_fn,
                best_mode=best_mode,
                enable_async_checkpointing=async_save,
                # Half-written steps are moved aside by `restore`, not deleted.
                cleanup_tmp_directories=False,
                # Every committed step carries the checksums of its files.
                temporary_path_class=integrity.ChecksummedTemporaryPath,
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

        Raises:
          CheckpointSaveError: the previous save, or this one, failed.
        """
        if self.read_only:
            raise RuntimeError(f"checkpoint: {self.directory} was opened read-only")
        step = int(step)
        if not (force or step % self.every_steps == 0):
            # Not a save step: the save in flight goes on overlapping with training.
            return False
        # Every process gets here at the same steps, so they agree on the previous save.
        self._finish_pending()
        if step in self._manager.all_steps():
            # e.g. a preemption save right after a regular save of the same step.
            logging.info("checkpoint: step %d is already saved; not saving it again", step)
            return False
        tracked = None
        if self.best_metric and metrics is not None and self.best_metric in metrics:
            tracked = {self.best_metric: float(metrics[self.best_metric])}
        meta = {
            "step": step,
            "attnx_version": attnx_version(),
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
        try:
            saved = self._manager.save(step, args=args, metrics=tracked, force=force)
        except Exception as error:
            self._pending = step
            self._finish_pending(error)
            raise  # Not reached: _finish_pending raised.
        if saved:
            self._pending = step
            logging.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def poll(self) -> None:
        """Raises CheckpointSaveError if the save in flight has ended without committing.

        Cheap enough for every step. With several processes it checks nothing
        (their saves end at different moments, and one process stopping alone
        would leave the others waiting in a collective); `save` (at its next
        save step), `wait` and `close` check there, on all processes together.
        """
        if self._pending is None or jax.process_count() > 1:
            return
        if self._manager.is_saving_in_progress():
            return
        self._finish_pending()

    def _finish_pending(self, error: BaseException | None = None) -> None:
        """Waits for the save in flight; raises CheckpointSaveError if it did not commit."""
        step, self._pending = self._pending, None
        if step is None and error is None:
            return
        if error is None:
            try:
                self._manager.wait_until_finished()
            except Exception as caught:  # Orbax re-raises the background thread's error.
                error = caught
        if step is None:
            if error is not None:
                raise CheckpointSaveError(
                    f"checkpoint: saving into {self.directory} failed ({_cause(error)})"
                ) from None
            return
        step_dir = self.directory / str(step)
        problem = None
        if error is not None:
            problem = _cause(error)
        elif not (step_dir / COMMIT_MARKER).exists():
            problem = f"{step_dir} was not committed (see the log above)"
        if not all_agree(problem is None):
            problem = problem or "it failed on another process (see that process's log)"
            saved = [s for s in self._manager.all_steps() if s != step]
            newest = f"step {max(saved)}" if saved else "none"
            raise CheckpointSaveError(
                f"checkpoint: saving step {step} to {step_dir} failed: {problem}; the run "
                f"stopped so that it does not train on with nothing saved (newest checkpoint: "
                f"{newest}); fix the cause and run the same command to resume"
            ) from None

    # --- restoring ---

    def restore(self, step: int | None = None, *, target: Any) -> tuple[Any, Any] | None:
        """Restores `(train_state, data_state)` onto `target`'s shardings; None if no checkpoint.

        Args:
          step: a given step, or None for the newest whole one. A given step that is
            broken raises CorruptCheckpointError (nothing is moved aside).
          target: a pytree like the saved train state whose leaves are jax.Arrays or
            jax.ShapeDtypeStruct with shardings (e.g. from `jax.eval_shape` plus
            `state_shardings`); the result has its structure, dtypes and shardings.

        Returns:
          `(train_state, data_state)`; `data_state` is None when the checkpoint was
          written by a different number of processes (the data restarts).

        Raises:
          CorruptCheckpointError: `step` was given and its files are broken.
          RunError: a step without checksums (written by an older attnx) failed to
            restore, so attnx cannot tell a broken file from a bug.
        """
        abstract = jax.tree.map(abstract_target, target)
        if not self.read_only:
            self.wait()
        half_written = [] if self.read_only or step is not None else self._move_aside_uncommitted()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            if int(step) not in steps:
                raise FileNotFoundError(
                    f"checkpoint: no step {step} in {self.directory}; steps: {sorted(steps)}"
                )
            problem = self._damage(int(step))
            if problem:
                raise CorruptCheckpointError(f"step {step}: {problem}")
            return self._restore_step(int(step), abstract)
        newest = max(steps[:1] + half_written, default=None)
        for candidate in steps:
            problem = self._damage(candidate)
            if problem:
                if self.read_only:
                    logging.warning(
                        "checkpoint: step %d is broken, skipping it (read-only: nothing is "
                        "moved): %s",
                        candidate,
                        problem,
                    )
                else:
                    logging.warning("checkpoint: step %d is broken: %s", candidate, problem)
                    self._move_aside(candidate)
                continue
            restored = self._restore_step(candidate, abstract)
            if candidate != newest:
                logging.warning(
                    "checkpoint: fell back to step %d, the newest whole checkpoint in %s",
                    candidate,
                    self.directory,
                )
            return restored
        return None

    def _damage(self, step: int) -> str | None:
        """Why step `step` is broken (from its files, every process reading a share), or None."""
        step_dir = os.fspath(self.directory / str(step))
        problem = integrity.find_damage(
            step_dir, ITEMS, shard=(jax.process_index(), jax.process_count())
        )
        if not all_agree(problem is None):
            return problem or "another process found a broken file (see its log)"
        return None

    def _restore_step(self, step: int, abstract: Any) -> tuple[Any, Any]:
        """Restores one whole step; an error here is not the step's fault, so it is raised."""
        step_dir = os.fspath(self.directory / str(step))
        try:
            metadata = self._manager.item_metadata(step)[STATE]
        except Exception as error:
            self._raise_unreadable(step, step_dir, error)
        # A target that does not match is the caller's error (e.g. a changed model),
        # not a broken checkpoint: raise it plainly so nothing gets moved aside.
        check_target(step, abstract, metadata)
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
            self._raise_unreadable(step, step_dir, error)
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

    def _raise_unreadable(self, step: int, step_dir: str, error: Exception) -> None:
        if integrity.has_manifest(step_dir):
            raise error  # Its files are whole: a bug or a setup problem, shown as it is.
        raise RunError(
            f"checkpoint: step {step} in {self.directory} could not be restored "
            f"({_cause(error)}); it was written without checksums (by an older attnx), "
            f"so attnx cannot tell a damaged file from a bug and moves nothing: if the "
            f"step is damaged, move {step_dir} aside yourself to resume from the step "
            "before it"
        ) from error

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
        sync("attnx_checkpoint_move_aside_uncommitted")
        return moved  # on process 0 only: it alone looked (for the log)

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            self._rename_aside(self.directory / str(step), step)
        sync(f"attnx_checkpoint_move_aside_{step}")
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
        """Blocks until the save in flight (if any) is on disk; CheckpointSaveError if it failed."""
        self._finish_pending()

    def close(self) -> None:
        """Waits for pending saves, releases Orbax's threads and the SIGTERM handler.

        Raises CheckpointSaveError (after releasing everything) if the last save failed.
        """
        try:
            if not self.read_only:
                self._finish_pending()
        finally:
            try:
                self._manager.close()
            except Exception as error:  # Already reported by _finish_pending.
                logging.warning("checkpoint: closing Orbax: %s", _cause(error))
            self._stop.uninstall()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- preemption ---

    def install_sigterm_handler(self) -> None:
        """SIGTERM and a first Ctrl-C make `should_stop` true (see `preemption.StopRequests`)."""
        self._stop.install()

    def should_stop(self, step: int) -> bool:
        """True once a stop was requested; all processes must call it after every step."""
        return self._stop.should_stop(step)
