"""Metric logs of a run: metrics.jsonl, TensorBoard event files and a progress line.

`MetricsWriter(directory, total_steps=...)` writes

  directory/metrics.jsonl one JSON object per `write` call, e.g.
                          {"step": 100, "train/loss": 2.31, "train/learning_rate": 0.001}
                          flushed at once, so a killed run loses nothing logged;
                          a non-finite value is written as NaN / Infinity (Python's json).
  directory/tensorboard/  event files written by tensorboardX (no TensorFlow):
                          scalars, images (attention plots) and text.

and `progress(step, loss)` logs one line with absl: step, smoothed steps/s,
ETA and loss; `evaluation(step, metrics)` one line per evaluation. Only the
chief process (process 0 by default) writes or logs; on the others every
method does nothing, so the loop calls them everywhere.

The training record (`mode='train'`, directory = the workdir) is the only one
ever rewritten, and only on resume: pass `start_step`, the step of the
restored checkpoint. Lines with step > start_step came from work the restart
throws away and will be logged again, so they leave metrics.jsonl (rewritten
through a temporary file and an atomic rename, with its permissions); a torn
last line (the process died mid-write) leaves too. Nothing is lost: the lines
that leave are appended to `metrics.jsonl.dropped-TIME` beside it.
TensorBoard gets the same treatment from its own mechanism: the new event
file starts with purge_step = start_step + 1, which makes TensorBoard discard
older events of later steps.

The read-only modes (`mode='eval'`, `'decode'`, ...) write into their own
directory (`WORKDIR/<mode>/`), mark every row with `"mode"`, only append, and
have a TensorBoard run of their own.

The workdir must be a local (or mounted, e.g. gcsfuse) file system: appending
a line needs a file that can be appended to.
"""

import datetime
import json
import math
import os
import shutil
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


def _keep_lines_through(path: str, last_step: int) -> tuple[int, str | None]:
    """Keeps the parseable lines of `path` with step <= last_step; moves the rest aside.

    Returns the number of lines that left and the file they were appended to
    (`PATH.dropped-TIME`, None if none left). The rewritten file keeps the
    original's permission bits.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    lines = text.splitlines()
    kept, dropped = [], []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            if record["step"] <= last_step:
                kept.append(line)
                continue
        if line.strip():
            dropped.append(line)
    if not dropped and (not text or text.endswith("\n")):
        return 0, None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    aside = None
    if dropped:
        aside = f"{path}.dropped-{stamp}"
        with open(aside, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in dropped))
        shutil.copymode(path, aside)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in kept))
    shutil.copymode(path, tmp)  # mkstemp creates 0600; the record keeps its permissions.
    os.replace(tmp, path)
    return len(dropped), aside


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
      directory: where metrics.jsonl and tensorboard/ go (created if missing): the
        workdir for training, `WORKDIR/<mode>` for a read-only mode.
      total_steps: the number of steps of the run, for the ETA.
      start_step: step the run (re)starts from; 0 for a fresh run, else the
        restored checkpoint's step (see the module docstring). Training only.
      mode: 'train' for the training record; any other mode only appends, and
        marks its rows with `"mode": mode`.
      is_chief: whether this process writes; defaults to jax.process_index() == 0.
      clock: seconds as a float (time.monotonic); injectable for tests.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        total_steps: int,
        start_step: int = 0,
        mode: str = "train",
        is_chief: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if total_steps < 0 or start_step < 0:
            raise ValueError(
                f"MetricsWriter: total_steps={total_steps} and start_step={start_step} "
                "must be >= 0."
            )
        self.workdir = os.fspath(directory)
        self.mode = mode
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
        if mode == "train" and os.path.exists(path):
            dropped, aside = _keep_lines_through(path, start_step)
            if dropped:
                logging.warning(
                    "metrics.jsonl: %d lines after step %d (or torn) left the record on "
                    "resume; they are kept in %s",
                    dropped,
                    start_step,
                    aside,
                )
        self._path = path
        self._tensorboard = SummaryWriter(
            os.path.join(self.workdir, TENSORBOARD_DIR),
            purge_step=start_step + 1 if start_step > 0 and mode == "train" else None,
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
        if self.mode != "train":
            record["mode"] = self.mode
        if self._file is None:
            # Opened at the first row, so a mode that logs none leaves no empty file.
            self._file = open(self._path, "a", encoding="utf-8")  # closed in close()
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

    def start_clock(self, step: int) -> None:
        """Counts steps/s from `step` on (call after the first step, once it has compiled)."""
        self._last_time, self._last_step = self._clock(), int(step)

    def evaluation(self, step: int, metrics: Mapping[str, float]) -> None:
        """Logs one line: 'eval step S | exact_match 0.98 | bleu 97.1 | loss 0.02 ...'.

        The line starts with the metrics' prefix when they share one other than
        'eval' ('test step S | checkpoint_step 2500 | exact_match ...').
        """
        if not self.is_chief:
            return
        label = self.mode if self.mode != "train" else "eval"
        prefixes = {name.split("/", 1)[0] for name in metrics if "/" in name}
        if len(prefixes) == 1 and prefixes != {"eval"}:
            label = prefixes.pop()
        parts = [f"{label} step {step}"]
        for name, value in metrics.items():
            short = name.split("/", 1)[-1]
            if short == "decoded_examples":
                continue
            parts.append(f"{short} {value:.4g}")
        logging.info(" | ".join(parts))

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
