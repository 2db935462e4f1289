"""The training loop: `train_and_evaluate(config, workdir)`.

It reads top to bottom in sections: one writer, set-up and restore
(`run.Run`: mesh, data, model and optimizer, sharding, checkpoints), data
position, step, evaluation, loop. Everything it writes goes to `workdir`:
`config.json`, the vocabulary (`vocab/`), checkpoints (`checkpoints/`),
`metrics.jsonl`, TensorBoard events (`tensorboard/`) and attention plots
(`plots/step_N/`). Restarting the same command resumes from the newest whole
checkpoint, data iterator included; SIGTERM saves and exits cleanly; a save
that fails stops the run (`CheckpointSaveError`) instead of training on.

Every `config.eval.every_steps` and at the last step the model is evaluated
on `config.task.eval_split` (validation) as `eval/...`. At the last step,
`final_evaluation.evaluate_at_end` also scores the mean of the last
`config.checkpoint.average_last` checkpoints (`eval_averaged/...`) and then
the checkpoint with the best validation `config.checkpoint.best_metric` on
the test split, once (`test/...`, with `test/checkpoint_step`; and
`test_averaged/...`), when the task has one.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

from attnx.training import final_evaluation, optimizers, steps, warm_start
from attnx.training import metrics as metrics_lib
from attnx.training import workdir as workdir_lib
from attnx.training.logging import MetricsWriter
from attnx.training.multihost import all_agree
from attnx.training.run import Run


@contextlib.contextmanager
def one_writer(workdir: str) -> Iterator[None]:
    """Holds the workdir's writer lock for the whole run (process 0 takes it for all)."""
    lock = workdir_lib.WriterLock(workdir) if jax.process_index() == 0 else None
    problem = None
    if lock is not None:
        try:
            lock.acquire()
        except workdir_lib.WorkdirLockedError as error:
            problem = error
    if not all_agree(problem is None):
        raise problem or workdir_lib.WorkdirLockedError(
            f"workdir {workdir}: process 0 could not take the writer lock (see its log)"
        )
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


class TrainingClock:
    """Steps per second of training alone: evaluations are timed out (`paused`)."""

    def __init__(self) -> None:
        self.started = False
        self._start_time = 0.0
        self._start_step = 0
        self._paused_seconds = 0.0

    def start(self, step: int) -> None:
        self.started, self._start_time, self._start_step = True, time.monotonic(), step

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        begin = time.monotonic()
        try:
            yield
        finally:
            self._paused_seconds += time.monotonic() - begin

    def steps_per_second(self, step: int) -> float:
        seconds = time.monotonic() - self._start_time - self._paused_seconds
        return round((step - self._start_step) / seconds, 3) if seconds > 0 else 0.0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last metrics.

    Raises:
      RunError: another live run writes `workdir`, or a checkpoint save failed.
    """
    # --- One writer ------------------------------------------------------------
    workdir = workdir_lib.resolve(workdir, what="workdir")
    with one_writer(workdir):
        if jax.process_index() == 0:
            workdir_lib.record_config(workdir, config)
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    # The training record's train/wall_seconds count from here: data preparation included.
    started = time.monotonic()
    # --- Set-up and restore ----------------------------------------------------
    # A warm start's source is checked before anything is built.
    warm = warm_start.find_source(config, os.path.join(workdir, "checkpoints"))
    if warm is not None:
        warm_start.adopt_vocabulary(warm, os.path.join(workdir, "vocab"))
    run = Run.build(config, workdir, mode="train")
    plateau = None
    if config.train.schedule == "plateau":
        # Loss-like metrics improve downwards, the rest (accuracy, BLEU) upwards.
        lower_is_better = config.train.plateau_metric.endswith(("perplexity", "loss"))
        plateau = optimizers.PlateauScheduler.from_config(
            config.train, mode="min" if lower_is_better else "max"
        )
    run.restore()
    if warm is not None and not run.restored:
        run.state = run.state.replace(params=warm_start.restore_params(warm, run.state.params))
    checkpointer = run.checkpointer

    # --- Data position ---------------------------------------------------------
    train_batches = run.train_batches()
    if run.restored:
        if run.data_state is not None:
            train_batches.set_state(run.data_state["iterator"])
            if plateau is not None and run.data_state.get("plateau"):
                plateau.load_state_dict(run.data_state["plateau"])
        elif config.task.packing:
            logging.warning(
                "The checkpoint's data positions come from another number of processes and "
                "packed batches cannot be repositioned: the data starts from its beginning."
            )
        else:
            # Written by another number of processes: every global batch is the
            # same for any process count, so the step says where to continue.
            train_batches.close()
            train_batches = run.train_batches(start_batch=int(run.state.step))
            logging.info("Data repositioned at global batch %d.", int(run.state.step))
    start_step = int(run.state.step)
    checkpointer.install_sigterm_handler()

    # --- Step ------------------------------------------------------------------
    train_step = jax.jit(
        steps.make_train_step(
            run.graphdef,
            run.rest,
            run.optimizer,
            label_smoothing=float(config.train.label_smoothing),
            grad_accum_steps=config.train.grad_accum_steps,
            loss_terms=run.loss_terms,
        ),
        in_shardings=(run.state_shardings, run.data_sharding),
        out_shardings=(run.state_shardings, None),
        donate_argnums=0,
    )

    # --- Evaluation ------------------------------------------------------------
    writer = MetricsWriter(workdir, total_steps=config.train.steps, start_step=start_step)

    def plots(name: str) -> str:
        return f"{workdir}/plots/{name}"

    # --- Loop ------------------------------------------------------------------
    logging.info(
        "Training %s on %s in %s: steps %d -> %d, mesh %s.",
        config.model.name,
        config.task.dataset,
        workdir,
        start_step,
        config.train.steps,
        dict(run.mesh.shape),
    )
    results: dict[str, float] = {}
    train_sums: dict[str, Any] = {}
    step = start_step
    # Training throughput: from the end of the first (compiling) step, evaluations excluded.
    clock = TrainingClock()
    state = run.state
    try:
        while step < config.train.steps:
            batch = next(train_batches)
            with run.mesh_context():
                state, sums = train_step(state, batch)
            step += 1
            if step == start_step + 1:
                # Steps/s counts from here: the first step included the compilation.
                jax.block_until_ready(sums)
                writer.start_clock(step)
                clock.start(step)
            checkpointer.poll()  # A save that failed in the background stops the run here.
            train_sums = metrics_lib.add_metric_sums(train_sums, sums)
            last = step == config.train.steps
            if step % config.train.log_every_steps == 0 or last:
                logged = metrics_lib.compute_metrics(train_sums)
                logged = {f"train/{k}": v for k, v in logged.items()}
                logged["train/learning_rate"] = float(
                    run.schedule(step - 1)
                ) * optimizers.get_lr_scale(state.opt_state)
                if run.loss_terms is not None:  # e.g. hard attention's baseline after this step
                    for name, value in run.loss_terms.logged(state.extra).items():
                        logged[f"train/{name}"] = float(value)
                if clock.started:  # compute_metrics has waited for this step's sums
                    logged["train/steps_per_second"] = clock.steps_per_second(step)
                logged["train/wall_seconds"] = round(time.monotonic() - started, 1)
                writer.write(step, logged)
                writer.progress(step, logged["train/loss"])
                results.update(logged)
                train_sums = {}
            eval_metrics = None
            if step % config.eval.every_steps == 0 or last:
                run.state = state
                with clock.paused():
                    eval_metrics = run.evaluate(step, writer, plot_dir=plots(f"step_{step}"))
                results.update(eval_metrics)
                if plateau is not None:
                    metric = eval_metrics[config.train.plateau_metric]
                    state = state.replace(
                        opt_state=optimizers.set_lr_scale(state.opt_state, plateau.update(metric))
                    )
            stop = checkpointer.should_stop(step)
            host_state = {
                "iterator": train_batches.get_state(),
                "plateau": None if plateau is None else plateau.state_dict(),
            }
            checkpointer.save(step, state, host_state, metrics=eval_metrics, force=last or stop)
            if stop:
                logging.warning(
                    "Preempted or interrupted: saved step %d; the same command resumes.", step
                )
                break
        checkpointer.wait()
        run.state = state
        if step == config.train.steps:
            # Checkpoint averaging, and the best checkpoint by validation on the test split.
            results.update(final_evaluation.evaluate_at_end(run, step, writer, f"{workdir}/plots"))
    finally:
        # On any way out, the save in flight ends before the process does
        # (close raises CheckpointSaveError if it failed).
        train_batches.close()
        writer.close()
        checkpointer.close()
    return results
