"""Scoring attention against gold: alignment error rate, pointing accuracy, attention mass.

Three kinds of gold, three scores:

* Word alignments (Pharaoh files, `attnx.interpret.alignments.read_pharaoh`)
  with sure links S ⊆ possible links P, scored as Och and Ney (2003), "A
  Systematic Comparison of Various Statistical Alignment Models", sec. 5,
  for predicted links A:

      precision = |A ∩ P| / |A|
      recall    = |A ∩ S| / |S|
      AER       = 1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|)

  The counts are summed over sentences before dividing (corpus level, as
  in the paper), not averaged per sentence. `AlignmentScores` holds the
  counts, so scores of several batches add up.

* Source spans (the `dates` task: for each target character the half-open
  span of source characters it comes from). For every target token with a
  span, pointing accuracy is the fraction whose argmax source position lies
  inside the span, and attention mass the mean over those tokens of the
  total weight inside the span. `dates_span_gold` turns the dataset's
  `alignment_start` / `alignment_end` into such spans: the 8 digits count
  (year 0-3, month 5-6, day 8-9, reported per field); the two dashes (the
  dataset gives them -1, -1: no source character writes them), the eos row
  and padding do not.

* Boxes on an image (the `digit_captions` task: one pixel box per digit, in
  reading order). The captioner attends over a g_h x g_w grid of feature
  cells; `cell_pixel_boxes` gives the pixel rectangle of each cell. The
  n-th digit token is scored against the n-th box: pointing accuracy is the
  fraction of digit tokens whose argmax cell has its centre inside the box,
  and mass sums each cell's weight times the fraction of the cell's area
  inside the box.

`sweep_*` score every (layer, head) map of a weights dict and report the
table and the best map: lowest AER, or highest pointing accuracy (ties
broken by the higher mass).

All scoring functions take a batch with explicit masks or lengths and refuse
(ValueError naming the shapes) arrays that disagree; nothing is truncated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from attnx.interpret.alignments import (
    GoldAlignment,
    Link,
    argmax_links,
    argmax_positions,
    check_batch,
    cross_attention_maps,
    real_token_mask,
    threshold_links,
)

# The ISO target 'YYYY-MM-DD' of attnx.data.dates (TARGET_LENGTH = 10), one
# field name per character; None for the dashes, which have no source span.
DATES_TARGET_FIELDS: tuple[str | None, ...] = ("year",) * 4 + (None,) + ("month",) * 2 + (None,) + ("day",) * 2  # fmt: skip
DATES_TARGET_LENGTH = len(DATES_TARGET_FIELDS)


# --------------------------------------------------------------------------
# Alignment error rate.
# --------------------------------------------------------------------------


def _ratio(numerator: float, denominator: float) -> float:
    # An empty denominator leaves the ratio undefined: NaN, never a made-up 0 or 1.
    return numerator / denominator if denominator else float("nan")


@dataclasses.dataclass(frozen=True)
class AlignmentScores:
    """Corpus-level counts of predicted links A against gold S ⊆ P, and the scores they give.

    Attributes:
      predicted: |A|, summed over sentences.
      sure: |S|.
      predicted_sure: |A ∩ S|.
      predicted_possible: |A ∩ P|.
    """

    predicted: int = 0
    sure: int = 0
    predicted_sure: int = 0
    predicted_possible: int = 0

    @property
    def precision(self) -> float:
        """|A ∩ P| / |A| (NaN without predicted links)."""
        return _ratio(self.predicted_possible, self.predicted)

    @property
    def recall(self) -> float:
        """|A ∩ S| / |S| (NaN without sure links)."""
        return _ratio(self.predicted_sure, self.sure)

    @property
    def aer(self) -> float:
        """1 - (|A ∩ S| + |A ∩ P|) / (|A| + |S|) (NaN when both are empty)."""
        return 1.0 - _ratio(
            self.predicted_sure + self.predicted_possible, self.predicted + self.sure
        )

    def __add__(self, other: AlignmentScores) -> AlignmentScores:
        return AlignmentScores(
            *(
                a + b
                for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)
            )
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "aer": self.aer,
            "precision": self.precision,
            "recall": self.recall,
            "predicted": self.predicted,
            "sure": self.sure,
        }


def alignment_scores(
    predicted: Sequence[Iterable[Link]], gold: Sequence[GoldAlignment]
) -> AlignmentScores:
    """Precision, recall and AER of predicted links against gold, summed over sentences.

    Args:
      predicted: per sentence, the (source, target) links A (0-based).
      gold: per sentence, the gold S and P (`read_pharaoh`).

    Raises:
      ValueError: if the numbers of sentences differ.
    """
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predicted alignments but {len(gold)} gold ones")
    total = AlignmentScores()
    for links, reference in zip(predicted, gold, strict=True):
        links = set(links)
        total += AlignmentScores(
            predicted=len(links),
            sure=len(reference.sure),
            predicted_sure=len(links & reference.sure),
            predicted_possible=len(links & reference.possible),
        )
    return total


def attention_alignment_scores(
    attention: np.ndarray,
    gold: Sequence[GoldAlignment],
    source_mask: np.ndarray,
    target_mask: np.ndarray,
    *,
    threshold: float | None = None,
) -> AlignmentScores:
    """Scores the hard alignment of a batch of maps against gold.

    Args:
      attention: `[b, t, s]`.
      gold: b gold alignments (indices as the map's positions: see
        `alignments.trim_special_tokens` for bos/eos).
      source_mask: bool `[b, s]`, True at real source tokens.
      target_mask: bool `[b, t]`, True at target tokens to align.
      threshold: None for argmax links, else every link with weight >= it.
    """
    if threshold is None:
        links = argmax_links(attention, source_mask, target_mask)
    else:
        links = threshold_links(attention, threshold, source_mask, target_mask)
    return alignment_scores(links, gold)


# --------------------------------------------------------------------------
# Pointing accuracy and attention mass.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PointingScores:
    """Counts of pointing hits and attention mass over the scored target tokens.

    Attributes:
      count: number of scored target tokens.
      hits: tokens whose argmax lies inside their gold region.
      mass_sum: sum over scored tokens of the weight inside their gold region.
      by_field: the same counts per field (e.g. 'year', 'month', 'day').
    """

    count: int = 0
    hits: int = 0
    mass_sum: float = 0.0
    by_field: Mapping[str, PointingScores] = dataclasses.field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        """hits / count (NaN without scored tokens)."""
        return _ratio(self.hits, self.count)

    @property
    def mass(self) -> float:
        """Mean weight inside the gold region per scored token (NaN without tokens)."""
        return _ratio(self.mass_sum, self.count)

    @property
    def worst_field_accuracy(self) -> float:
        """The lowest per-field accuracy (the overall one without fields)."""
        if not self.by_field:
            return self.accuracy
        return min(scores.accuracy for scores in self.by_field.values())

    def __add__(self, other: PointingScores) -> PointingScores:
        fields = {}
        for name in list(self.by_field) + [n for n in other.by_field if n not in self.by_field]:
            fields[name] = self.by_field.get(name, PointingScores()) + other.by_field.get(
                name, PointingScores()
            )
        return PointingScores(
            self.count + other.count, self.hits + other.hits, self.mass_sum + other.mass_sum, fields
        )

    def as_dict(self) -> dict[str, float]:
        values = {"accuracy": self.accuracy, "mass": self.mass, "count": self.count}
        for name, scores in self.by_field.items():
            values[f"{name}_accuracy"] = scores.accuracy
            values[f"{name}_mass"] = scores.mass
        return values


def _pointing(
    scored: np.ndarray,
    hits: np.ndarray,
    mass: np.ndarray,
    fields: Sequence[str | None] | None,
) -> PointingScores:
    """Sums `[b, t]` hits and masses over scored tokens, in total and per field."""
    by_field = {}
    if fields is not None:
        names = np.asarray([name if name is not None else "" for name in fields], dtype=object)
        for name in dict.fromkeys(n for n in fields if n is not None):
            selected = scored & (names == name)[None, :]
            by_field[name] = _pointing(selected, hits, mass, None)
    return PointingScores(
        count=int(scored.sum()),
        hits=int((hits & scored).sum()),
        mass_sum=float(np.where(scored, mass, 0.0).sum()),
        by_field=by_field,
    )


def _check_fields(fields: Sequence[str | None] | None, length: int) -> None:
    if fields is not None and len(fields) != length:
        raise ValueError(f"fields has {len(fields)} entries, the maps have t = {length} rows")


def span_pointing(
    attention: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    source_mask: np.ndarray,
    *,
    fields: Sequence[str | None] | None = None,
) -> PointingScores:
    """Pointing accuracy and attention mass against half-open source spans.

    A target token is scored when its span is given (start >= 0); the span
    [start, end) must then be non-empty and lie within the real source
    tokens.

    Args:
      attention: `[b, t, s]`, row t the step emitting target token t.
      start: int `[b, t]`, first source position of each token's span; -1
        for tokens without gold (not scored).
      end: int `[b, t]`, one past the last source position.
      source_mask: bool `[b, s]`, True at real source tokens.
      fields: optional field name per target position (length t; None for
        none), for the per-field breakdown in `by_field`.

    Raises:
      ValueError: naming the shapes if they disagree, or the first example
        and token whose span is empty or leaves the real source.
    """
    start, end = np.asarray(start), np.asarray(end)
    attention = np.asarray(attention, dtype=np.float64)
    if attention.ndim != 3 or start.shape != attention.shape[:2] or end.shape != start.shape:
        raise ValueError(
            f"attention {attention.shape} = [b, t, s] needs start and end [b, t]; got start "
            f"{start.shape} and end {end.shape}"
        )
    attention, source_mask, scored = check_batch(attention, source_mask, start >= 0)
    _check_fields(fields, attention.shape[1])
    positions = np.arange(attention.shape[2])
    inside = (positions >= start[..., None]) & (positions < end[..., None])  # [b, t, s]
    bad = scored & ((end <= start) | np.any(inside & ~source_mask[:, None, :], axis=-1))
    if np.any(bad):
        example, token = np.argwhere(bad)[0]
        raise ValueError(
            f"example {example}, target token {token}: span [{start[example, token]}, "
            f"{end[example, token]}) is empty or leaves the {int(source_mask[example].sum())} "
            "real source tokens"
        )
    pointed = argmax_positions(attention, source_mask, scored)
    hits = (pointed >= start) & (pointed < end)
    mass = np.sum(attention * inside, axis=-1)
    return _pointing(scored, hits, mass, fields)


def dates_span_gold(
    alignment_start: np.ndarray, alignment_end: np.ndarray, target_length: int
) -> tuple[np.ndarray, np.ndarray, tuple[str | None, ...]]:
    """Spans and fields of the `dates` task for maps with `target_length` rows.

    The dataset's spans count Unicode characters, which are the source
    positions under the character tokenizer (one id per character, no bos);
    for the byte tokenizer convert them with `char_spans_to_byte_spans`
    first. Rows past the 10 target characters (eos, padding) get no span.

    Args:
      alignment_start: int `[b, 10]`, the dataset feature.
      alignment_end: int `[b, 10]`.
      target_length: t, the number of rows of the maps (>= 10; 11 with eos).

    Returns:
      (start `[b, t]`, end `[b, t]`, fields of length t: 'year' x4, None,
      'month' x2, None, 'day' x2, then None).

    Raises:
      ValueError: if the arrays are not `[b, 10]`, `target_length` < 10, or a
        digit lacks a span (or a dash has one): not the dates format.
    """
    alignment_start, alignment_end = np.asarray(alignment_start), np.asarray(alignment_end)
    if alignment_start.ndim != 2 or alignment_start.shape[1] != DATES_TARGET_LENGTH:
        raise ValueError(f"alignment_start must be [b, 10], got {alignment_start.shape}")
    if alignment_end.shape != alignment_start.shape:
        raise ValueError(
            f"alignment_end {alignment_end.shape} must match alignment_start {alignment_start.shape}"
        )
    if target_length < DATES_TARGET_LENGTH:
        raise ValueError(f"target_length {target_length} < the {DATES_TARGET_LENGTH} characters")
    digit = np.asarray([name is not None for name in DATES_TARGET_FIELDS])
    has_span = alignment_start >= 0
    if np.any(has_span != digit[None, :]):
        raise ValueError(
            "not the dates alignment format: the 8 digits of 'YYYY-MM-DD' need spans "
            f"and the dashes -1; got alignment_start {alignment_start.tolist()}"
        )
    padding = ((0, 0), (0, target_length - DATES_TARGET_LENGTH))
    start = np.pad(alignment_start, padding, constant_values=-1)
    end = np.pad(alignment_end, padding, constant_values=-1)
    fields = DATES_TARGET_FIELDS + (None,) * (target_length - DATES_TARGET_LENGTH)
    return start, end, fields


def char_spans_to_byte_spans(
    text: str, start: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Character spans of `text` -> UTF-8 byte spans (source positions of the byte tokenizer).

    Args:
      text: the source string.
      start, end: int `[n]`, character offsets; -1 stays -1.
    """
    offsets = np.cumsum([0] + [len(c.encode("utf-8")) for c in text])
    start, end = np.asarray(start), np.asarray(end)
    return (
        np.where(start >= 0, offsets[np.maximum(start, 0)], -1),
        np.where(end >= 0, offsets[np.maximum(end, 0)], -1),
    )


def cell_pixel_boxes(grid_shape: tuple[int, int], *, stride: int) -> np.ndarray:
    """The pixel rectangle each cell of a feature grid covers, row-major.

    `ConvEncoder` keeps the resolution in its 'SAME' stride-1 convolutions and
    halves it in every 2x2 stride-2 max-pool, so after p pools cell (r, c)
    summarises the stride x stride block of pixels [r*stride, (r+1)*stride) x
    [c*stride, (c+1)*stride), stride = 2**p (`2 ** encoder.num_pools`: 8 for
    the 64 x 64 `digits_small` canvas and its 8 x 8 grid, 16 for VGG-19
    conv5_4). These blocks tile the image (odd edges the pools drop are in
    no cell). The cell's receptive field is wider (3x3 convolutions); the
    tiling is what "the cell's pixels" means here.

    Args:
      grid_shape: (H, W) of the grid; cell index r * W + c, as the captioner
        flattens it (`SpatialMemory.as_grid`).
      stride: pixels per cell side.

    Returns:
      int `[H * W, 4]`: [ymin, xmin, ymax, xmax] per cell, maxima exclusive
      (the `digit_captions` box convention).
    """
    height, width = grid_shape
    rows, cols = np.divmod(np.arange(height * width), width)
    return np.stack(
        [rows * stride, cols * stride, (rows + 1) * stride, (cols + 1) * stride], axis=1
    )


def tokens_in(target_ids: np.ndarray, ids: Iterable[int]) -> np.ndarray:
    """True at real target tokens whose id is in `ids` (e.g. the ten digit ids).

    `digit_captions` captions hold only digits ('3071'), so there every real
    target token is a digit; this selects them when a vocabulary also has
    separators or words.

    Args:
      target_ids: int `[b, t]`.
      ids: the token ids to select.

    Returns:
      bool `[b, t]`.
    """
    target_ids = np.asarray(target_ids)
    return real_token_mask(target_ids) & np.isin(target_ids, list(ids))


def box_pointing(
    attention: np.ndarray,
    boxes: np.ndarray,
    num_boxes: np.ndarray,
    token_mask: np.ndarray,
    *,
    grid_shape: tuple[int, int],
    stride: int,
) -> PointingScores:
    """Pointing accuracy and attention mass of spatial attention against pixel boxes.

    The n-th True token of `token_mask` in an example is scored against its
    n-th box (reading order on both sides). A token hits when the centre of
    its argmax cell's rectangle lies in the box ([ymin, ymax) x [xmin, xmax));
    its mass is sum_cells weight x (area of the cell inside the box / area of
    the cell).

    Args:
      attention: `[b, t, L]`, L = H x W row-major.
      boxes: int `[b, n, 4]`, [ymin, xmin, ymax, xmax] in pixels, maxima
        exclusive, in reading order; rows past `num_boxes` are ignored.
      num_boxes: int `[b]`, the real boxes per example.
      token_mask: bool `[b, t]`, True at the emitted tokens that each have a
        box (digit tokens: `tokens_in` or `real_token_mask`).
      grid_shape: (H, W) of the grid.
      stride: pixels per cell side (see `cell_pixel_boxes`).

    Raises:
      ValueError: naming the shapes if they disagree, or the examples whose
        number of scored tokens differs from their number of boxes.
    """
    height, width = grid_shape
    attention = np.asarray(attention, dtype=np.float64)
    token_mask = np.asarray(token_mask).astype(bool)
    boxes, num_boxes = np.asarray(boxes), np.asarray(num_boxes)
    if attention.ndim != 3 or attention.shape[2] != height * width:
        raise ValueError(
            f"attention {attention.shape} must be [b, t, L] with L = {height} x {width}"
        )
    batch, length, _ = attention.shape
    if (
        token_mask.shape != (batch, length)
        or boxes.ndim != 3
        or boxes.shape[0] != batch
        or boxes.shape[2] != 4
        or num_boxes.shape != (batch,)
    ):
        raise ValueError(
            f"attention {attention.shape} = [b, t, L] needs token_mask [b, t] = {(batch, length)}, "
            f"boxes [b, n, 4] and num_boxes [b]; got token_mask {token_mask.shape}, "
            f"boxes {boxes.shape}, num_boxes {num_boxes.shape}"
        )
    tokens = token_mask.sum(axis=1)
    if np.any(num_boxes > boxes.shape[1]) or np.any(tokens != num_boxes):
        wrong = np.flatnonzero((tokens != num_boxes) | (num_boxes > boxes.shape[1]))
        raise ValueError(
            f"examples {wrong.tolist()}: scored tokens {tokens[wrong].tolist()} vs boxes "
            f"{num_boxes[wrong].tolist()} (of {boxes.shape[1]} rows); every scored token "
            "needs its own box"
        )
    if boxes.shape[1] == 0:  # no box anywhere, hence (checked above) no scored token
        return PointingScores()
    # The n-th scored token of an example takes box n.
    box_index = np.clip(np.cumsum(token_mask, axis=1) - 1, 0, max(boxes.shape[1] - 1, 0))
    token_boxes = np.take_along_axis(boxes, box_index[..., None], axis=1).astype(np.float64)
    ymin, xmin, ymax, xmax = (token_boxes[..., k, None] for k in range(4))  # [b, t, 1]
    cells = cell_pixel_boxes(grid_shape, stride=stride).astype(np.float64)  # [L, 4]
    overlap_y = np.clip(np.minimum(ymax, cells[:, 2]) - np.maximum(ymin, cells[:, 0]), 0, None)
    overlap_x = np.clip(np.minimum(xmax, cells[:, 3]) - np.maximum(xmin, cells[:, 1]), 0, None)
    inside_fraction = overlap_y * overlap_x / float(stride * stride)  # [b, t, L]
    mass = np.sum(attention * inside_fraction, axis=-1)
    pointed = np.argmax(attention, axis=-1)  # [b, t]
    centre_y = (cells[pointed, 0] + cells[pointed, 2]) / 2
    centre_x = (cells[pointed, 1] + cells[pointed, 3]) / 2
    hits = (
        (ymin[..., 0] <= centre_y)
        & (centre_y < ymax[..., 0])
        & (xmin[..., 0] <= centre_x)
        & (centre_x < xmax[..., 0])
    )
    return _pointing(token_mask, hits, mass, None)


# --------------------------------------------------------------------------
# Sweeps over layers and heads.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SweepEntry:
    """The scores of one (layer, head) cross-attention map."""

    layer: int
    head: int
    scores: AlignmentScores | PointingScores


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Scores of every (layer, head) map and the best one.

    Attributes:
      entries: one per map, ordered by layer then head.
      metric: the attribute of the scores that ranks the maps ('aer',
        'accuracy', 'worst_field_accuracy', ...).
      lower_is_better: True for AER, False for accuracies.
    """

    entries: tuple[SweepEntry, ...]
    metric: str
    lower_is_better: bool

    @property
    def best(self) -> SweepEntry:
        """The entry with the best metric (NaN ignored); ties go to the higher mass, then the first."""

        def rank(entry: SweepEntry) -> tuple[float, float]:
            value = float(getattr(entry.scores, self.metric))
            second = float(getattr(entry.scores, "mass", 0.0))
            second = 0.0 if np.isnan(second) else second
            return (value if self.lower_is_better else -value, -second)

        ranked = [e for e in self.entries if not np.isnan(getattr(e.scores, self.metric))]
        if not ranked:
            raise ValueError(f"no (layer, head) map has a defined {self.metric}")
        return min(ranked, key=rank)

    def table(self) -> str:
        """A plain-text table: one row per (layer, head), the best marked with '*'."""
        best = self.best if self.entries else None
        columns = list(self.entries[0].scores.as_dict()) if self.entries else []
        lines = ["  ".join(["layer", "head"] + [f"{c:>12}" for c in columns])]
        for entry in self.entries:
            values = entry.scores.as_dict()
            cells = [
                f"{values[c]:>12d}" if isinstance(values[c], int) else f"{values[c]:>12.4f}"
                for c in columns
            ]
            mark = " *" if entry is best else ""
            lines.append("  ".join([f"{entry.layer:>5}", f"{entry.head:>4}"] + cells) + mark)
        return "\n".join(lines)


def sweep(
    weights: Mapping[str, object],
    score: Callable[[np.ndarray], AlignmentScores | PointingScores],
    *,
    metric: str,
    lower_is_better: bool,
) -> Sweep:
    """Scores every (layer, head) cross-attention map of a weights dict.

    Args:
      weights: an attnx model's weights dict (`return_weights=True`).
      score: maps one `[b, t, s]` map to its scores.
      metric: the scores' attribute that ranks the maps.
      lower_is_better: the direction of `metric`.
    """
    entries = tuple(
        SweepEntry(layer, head, score(attention))
        for (layer, head), attention in cross_attention_maps(weights).items()
    )
    return Sweep(entries, metric, lower_is_better)


def sweep_alignment_error(
    weights: Mapping[str, object],
    gold: Sequence[GoldAlignment],
    source_mask: np.ndarray,
    target_mask: np.ndarray,
    *,
    threshold: float | None = None,
) -> Sweep:
    """AER of the hard alignment of every (layer, head) map; the best has the lowest AER.

    Args: as `attention_alignment_scores`, with the maps taken from `weights`.
    """
    return sweep(
        weights,
        lambda attention: attention_alignment_scores(
            attention, gold, source_mask, target_mask, threshold=threshold
        ),
        metric="aer",
        lower_is_better=True,
    )


def sweep_span_pointing(
    weights: Mapping[str, object],
    start: np.ndarray,
    end: np.ndarray,
    source_mask: np.ndarray,
    *,
    fields: Sequence[str | None] | None = None,
    metric: str = "accuracy",
) -> Sweep:
    """Span pointing of every (layer, head) map; the best has the highest `metric`.

    Args: as `span_pointing`; `metric` 'accuracy', 'mass' or
    'worst_field_accuracy' (the `dates` criterion: every field >= 0.90).
    """
    return sweep(
        weights,
        lambda attention: span_pointing(attention, start, end, source_mask, fields=fields),
        metric=metric,
        lower_is_better=False,
    )


def sweep_box_pointing(
    weights: Mapping[str, object],
    boxes: np.ndarray,
    num_boxes: np.ndarray,
    token_mask: np.ndarray,
    *,
    grid_shape: tuple[int, int],
    stride: int,
    metric: str = "accuracy",
) -> Sweep:
    """Box pointing of every (layer, head) map; the best has the highest `metric`.

    Args: as `box_pointing`.
    """
    return sweep(
        weights,
        lambda attention: box_pointing(
            attention, boxes, num_boxes, token_mask, grid_shape=grid_shape, stride=stride
        ),
        metric=metric,
        lower_is_better=False,
    )
