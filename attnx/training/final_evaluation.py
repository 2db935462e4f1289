"""What a training run evaluates once it has reached its last step: `evaluate_at_end`.

  averaging  with `config.checkpoint.average_last` = N > 1, the mean of the
             parameters of the last N checkpoints (Vaswani et al. 2017,
             sec. 6.1) on the validation split, as `eval_averaged/...`.
  test       the checkpoint with the best validation metric
             (`config.checkpoint.best_metric`, which best-N retention keeps;
             the latest when no metric is set) on the test split, once, as
             `test/...` with `test/checkpoint_step`, the step it came from;
             the averaged parameters too, as `test_averaged/...`. Skipped when
             the task has no test split, and when the run evaluates on the test
             split already (its checkpoints were then chosen on it).

Both go to the training record (`metrics.jsonl`, TensorBoard) at the last
step. The test split is read only here: choosing a checkpoint, a
hyper-parameter or a learning-rate decay never sees it.
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging

from attnx.errors import RunError
from attnx.training import checkpoint_averaging
from attnx.training.logging import MetricsWriter
from attnx.training.run import Run

TEST_SPLIT = "test"


def average_last_checkpoints(run: Run) -> Any:
    """The mean parameters of the last `config.checkpoint.average_last` checkpoints."""
    checkpointer = run.checkpointer
    last = checkpointer.all_steps()[-run.config.checkpoint.average_last :]
    trees = [checkpointer.restore(s, target=run.state)[0].params for s in last]
    averaged = jax.jit(
        checkpoint_averaging.average_checkpoints, out_shardings=run.state_shardings.params
    )(trees)
    logging.info("Averaged the parameters of steps %s.", last)
    return averaged


def has_test_split(run: Run) -> bool:
    """Whether the task has a test split held out from checkpoint selection (logs why not)."""
    if run.eval_split == TEST_SPLIT:
        logging.warning(
            "config.task.eval_split=%r: the checkpoints were chosen on the test split, so it "
            "gives no held-out result; no test/ metrics.",
            TEST_SPLIT,
        )
        return False
    try:
        run.split_source(TEST_SPLIT)
    except RunError as error:
        logging.info("No test/ metrics: %s", error)
        return False
    return True


def evaluate_best_on_test(
    run: Run, step: int, writer: MetricsWriter, *, plot_dir: str
) -> dict[str, float]:
    """Scores the best checkpoint by validation on the test split; writes `test/...` at `step`."""
    best = run.checkpointer.best_step()
    if best is None:
        return {}
    params = run.checkpointer.restore(best, target=run.state)[0].params
    logging.info(
        "Scoring the checkpoint of step %d (the best by %s) on the test split.",
        best,
        run.checkpointer.best_metric or "recency",
    )
    results = {"test/checkpoint_step": float(best)}
    results.update(
        run.evaluate(
            step, writer, params=params, split=TEST_SPLIT, plot_dir=plot_dir, write_metrics=False
        )
    )
    writer.write(step, results)
    writer.evaluation(step, results)
    return results


def evaluate_at_end(run: Run, step: int, writer: MetricsWriter, plots: str) -> dict[str, float]:
    """The averaged and the test evaluations of a run at its last step (module docstring).

    Args:
      run: the run, its state the last step's, its checkpoints written.
      step: the last step; every row is written at it.
      writer: the training record.
      plots: the directory under which the attention plots go
        (`averaged_S/`, `test_S/`, `test_averaged_S/`).
    """
    results: dict[str, float] = {}
    averaged = None
    if run.config.checkpoint.average_last > 1:
        averaged = average_last_checkpoints(run)
        results.update(
            run.evaluate(
                step,
                writer,
                params=averaged,
                prefix="eval_averaged",
                plot_dir=f"{plots}/averaged_{step}",
            )
        )
    if not has_test_split(run):
        return results
    results.update(evaluate_best_on_test(run, step, writer, plot_dir=f"{plots}/test_{step}"))
    if averaged is not None:
        results.update(
            run.evaluate(
                step,
                writer,
                params=averaged,
                split=TEST_SPLIT,
                prefix="test_averaged",
                plot_dir=f"{plots}/test_averaged_{step}",
            )
        )
    return results
