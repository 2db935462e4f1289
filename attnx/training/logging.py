"""Metric logs of a run: metrics.jsonl, TensorBoard event files and a progress line.

`MetricsWriter(workdir, total_steps=...)` writes

  workdir/metrics.jsonl   one JSON object per `write` call, e.g.
                          {"step": 100, "train/loss": 2.31, "train/learning_rate": 0.001}
                          flushed at once, so a killed run loses nothing logged;
                          a non-finite value is written as NaN / Infinity (Python's json).
  workdir/tensorboard/    event files written by tensorboardX (no TensorFlow):
                          scalars, images (attention plots) and text.

and `progress(step, loss)` logs one line with absl: step, smoothed steps/s,
ETA and loss. Only the chief process (process 0 by default) writes or logs;
on the others every method does nothing, so the loop calls them everywhere.

Resuming: pass `start_step`, the step of the restored checkpoint. Lines of
metrics.jsonl with step > start_step came from work the restart throws away
and will be logged again, so they are removed (the file is rewritten through
a temporary file and an atomic rename); lines with step <= start_step are kept,
so the file reflects one consistent run. A torn last line (the process died
mid-write) is dropped too. TensorBoard gets the same treatment from its own
mechanism: the new event file starts with purge_step = start_step + 1, which
makes TensorBoard discard older events of later steps.

The workdir must be a local (or mounted, e.g. gcsfuse) file system: appending
a line needs a file that can be appended to.
"""

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from tensorboardX import SummaryWriter

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _keep_lines_through(path: str, last_step: int) -> int:
    """Rewrites `path` keeping parseable lines with step <= last_step; returns lines dropped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= last_step:
                kept.append(line)
    dropped = len(lines) - len(kept)
    if dropped:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped


def _as_float(name: str, value: Any) -> float:
    array = np.asarray(jax.device_get(value))
    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"Metric {name!r} must be a number, got {type(value).__name__} {array.shape}."
        )
    return float(array.reshape(()))


class MetricsWriter:
    """Writes a run's metrics to metrics.jsonl and TensorBoard (chief process only).

    Args:
      workdir: the run's directory (created if missing).
      total_steps: the number of steps of the run, for the ETA.
      start_step: step the run (re)starts from; 0 for a fresh run, else the
        restored checkpoint's step (see the module docstring).
      is_chief: whether this process writes; defaults to jax.process_index() == 0.
      clock: seconds as a float (time.monotonic); injectable for tests.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        is_chief: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total_steps < 0 or start_step < 0:
            raise ValueError(
                f"MetricsWriter: total_steps={total_steps} and start_step={start_step} "
                "must be >= 0."
            )
        self.workdir = os.fspath(workdir)
        self.total_steps = int(total_steps)
        self.is_chief = jax.process_index() == 0 if is_chief is None else bool(is_chief)
        self._clock = clock
        self._last_time: float | None = None
        self._last_step: int | None = None
        self._steps_per_sec: float | None = None
        self._file = None
        self._tensorboard = None
        if not self.is_chief:
            return
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, METRICS_FILE)
        if os.path.exists(path):
            dropped = _keep_lines_through(path, start_step)
            if dropped:
                logging.info(
                    "metrics.jsonl: dropped %d lines after step %d (or unreadable) on resume.",
                    dropped,
                    start_step,
                )
        self._file = open(path, "a", encoding="utf-8")  # closed in close()
        self._tensorboard = SummaryWriter(
            os.path.join(self.workdir, TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step > 0 else None,
        )

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS_FILE)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Appends {'step': step, **metrics} to metrics.jsonl and logs the scalars."""
        values = {name: _as_float(name, value) for name, value in metrics.items()}
        if "step" in values:
            raise ValueError("Metric name 'step' is reserved for the step number.")
        if not self.is_chief:
            return
        record = {"step": int(step), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))
        self._tensorboard.flush()

    def write_image(self, step: int, name: str, image: Any) -> None:
        """Logs an image, [height, width, channels] (channels 1, 3 or 4) uint8 or float in [0, 1]."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise ValueError(f"Image {name!r} must be [height, width, 1|3|4], got {image.shape}.")
        if not self.is_chief:
            return
        if image.dtype == np.uint8:
            image = image.astype(np.float32) / 255.0
        self._tensorboard.add_image(name, image, int(step), dataformats="HWC")
        self._tensorboard.flush()

    def write_text(self, step: int, name: str, text: str) -> None:
        """Logs a text (shown as Markdown by TensorBoard)."""
        if not self.is_chief:
            return
        self._tensorboard.add_text(name, str(text), int(step))
        self._tensorboard.flush()

    def progress(self, step: int, loss: float) -> None:
        """Logs 'step S/T | R steps/s | ETA H:MM:SS | loss L' (steps/s smoothed)."""
        if not self.is_chief:
            return
        now = self._clock()
        if self._last_time is not None and step > self._last_step and now > self._last_time:
            rate = (step - self._last_step) / (now - self._last_time)
            # An exponential moving average steadies the rate across eval pauses.
            previous = self._steps_per_sec
            self._steps_per_sec = rate if previous is None else 0.7 * previous + 0.3 * rate
        self._last_time, self._last_step = now, step
        parts = [f"step {step}/{self.total_steps}"]
        if self._steps_per_sec:
            remaining = max(self.total_steps - step, 0) / self._steps_per_sec
            parts.append(f"{self._steps_per_sec:.2f} steps/s")
            parts.append(f"ETA {_format_duration(remaining)}")
        parts.append(f"loss {float(loss):.4f}")
        logging.info(" | ".join(parts))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
