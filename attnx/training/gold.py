"""Gold alignments of a batch, from its task, as a scorer of attention maps.

The tasks say which gold they carry (`TextPairTask.gold_spans`: a source span
per target character on `dates`; `CaptionTask.gold_boxes`: a pixel box per
emitted digit on `digit_captions`). `scorer` reads the gold of a batch's
records and returns a function that scores any `[b, t, s]` map of that batch
(`attnx.interpret.alignment_scores.PointingScores`), or None when the task has
no gold the model's positions can be matched with. Used by `--mode=interpret`
and by every evaluation during training (`eval/pointing_accuracy`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from attnx.data.tasks import CaptionTask, Task
from attnx.interpret import alignment_scores, alignments

Score = Callable[[np.ndarray], alignment_scores.PointingScores]


@dataclasses.dataclass(frozen=True)
class BatchScorer:
    """Scores the maps of one batch against its gold.

    Attributes:
      kind: 'spans' (text) or 'boxes' (image).
      score: `score(attention [b, t, s]) -> PointingScores`.
    """

    kind: str
    score: Score


def _span_gold(
    task: Task, records: Sequence[Mapping[str, Any]], rows: int
) -> tuple[np.ndarray, np.ndarray, tuple[str | None, ...] | None] | None:
    """Gold spans `[b, rows]` (character positions) and their fields, else None."""
    spans = [task.gold_spans(record) for record in records]
    if any(s is None for s in spans):
        return None
    start = np.stack([s[0] for s in spans])
    end = np.stack([s[1] for s in spans])
    if task.dataset.split(":")[0].split("/")[0] == "dates":
        return alignment_scores.dates_span_gold(start, end, rows)
    start_rows = np.full((len(spans), rows), -1, np.int32)
    end_rows = start_rows.copy()
    width = min(rows, start.shape[1])
    start_rows[:, :width], end_rows[:, :width] = start[:, :width], end[:, :width]
    return start_rows, end_rows, None


def _box_gold(
    task: CaptionTask, records: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """Gold boxes `[b, n, 4]` and their counts `[b]`, else None."""
    boxes = [task.gold_boxes(record) for record in records]
    if any(b is None for b in boxes):
        return None
    most = max(len(b) for b in boxes)
    padded = np.zeros((len(boxes), most, 4), np.int32)
    for row, b in enumerate(boxes):
        padded[row, : len(b)] = b
    return padded, np.array([len(b) for b in boxes], np.int32)


def has_gold(task: Task, tokenizer: str) -> bool:
    """Whether `scorer` can score this task's maps (cheap: reads no record)."""
    if isinstance(task, CaptionTask):
        return task.box_key is not None
    return task.span_keys is not None and tokenizer == "char"


def scorer(
    task: Task,
    source: Any,
    batch: Mapping[str, np.ndarray],
    rows: int,
    *,
    tokenizer: str,
) -> BatchScorer | None:
    """A scorer of the `[b, rows, s]` maps of a host `batch` (with 'index'), or None.

    Args:
      task: the task of the split; its gold methods say what it carries.
      source: the split's records (`source[index]`).
      batch: host arrays 'targets', 'inputs' or 'image', and 'index' (no padding rows).
      rows: the maps' number of target rows.
      tokenizer: `config.task.tokenizer`. Gold spans count characters, which are
        the source positions under the 'char' tokenizer only: with any other
        there is no scorer for text.
    """
    records = [source[int(i)] for i in batch["index"]]
    targets = batch["targets"]
    if isinstance(task, CaptionTask):
        gold = _box_gold(task, records)
        if gold is None:
            return None
        boxes, counts = gold
        height = batch["image"].shape[1]
        token_mask = alignments.real_token_mask(targets)

        def score_boxes(attention: np.ndarray) -> alignment_scores.PointingScores:
            cells = attention.shape[-1]
            side = int(round(cells**0.5))
            if side * side != cells:
                raise ValueError(f"spatial attention over {cells} cells is not a square grid")
            return alignment_scores.box_pointing(
                attention, boxes, counts, token_mask, grid_shape=(side, side), stride=height // side
            )

        return BatchScorer("boxes", score_boxes)
    if tokenizer != "char":
        return None
    gold = _span_gold(task, records, rows)
    if gold is None:
        return None
    start, end, fields = gold
    source_mask = alignments.real_token_mask(batch["inputs"])

    def score_spans(attention: np.ndarray) -> alignment_scores.PointingScores:
        return alignment_scores.span_pointing(attention, start, end, source_mask, fields=fields)

    return BatchScorer("spans", score_spans)
