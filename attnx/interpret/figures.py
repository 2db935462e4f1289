"""The figures of the interpretability report.

One import for all of them:

  head_grid          layers x heads grid of alignment maps of one example
  rollout_map        rollout / attention-flow relevance, one heat map
  spatial_overlay    Show, Attend and Tell panels (`spatial_figures`)
  erasure_curves     faithfulness: drop of p(y_t) against the input erased (`score_figures`)
  head_table_figure  a score per (layer, head), best boxed (`score_figures`)

Every function takes a path stem (`.../name`) and writes the figure twice,
`name.png` (a quick look, slides) and `name.svg` (vector: papers, zooming
into long label rows), and returns both paths as a `plots.Rendered`.

Rules all figures keep:

* Token labels, titles and names go through `plots.readable_labels` and are
  drawn with `plots.label_families()`, so any script is drawn (or written as
  U+XXXX where no installed font has the glyph).
* Figures are `matplotlib.figure.Figure` objects, never registered with
  pyplot, so many calls leak no figure (and need no `plt.close`).
* Output is deterministic (`plots.save_figure`): same input, same bytes.

This module holds the two heat-map figures with token labels.
"""

import math
import os
import unicodedata
from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from attnx.interpret.plots import (  # noqa: E402
    Rendered,
    label_families,
    readable_labels,
    save_figure,
)
from attnx.interpret.score_figures import (  # noqa: E402
    aopc,
    best_cell,
    erasure_curves,
    head_table_figure,
    sort_order,
)
from attnx.interpret.spatial_figures import spatial_overlay  # noqa: E402

__all__ = [
    "Rendered",
    "aopc",
    "best_cell",
    "erasure_curves",
    "head_grid",
    "head_table_figure",
    "rollout_map",
    "save_figure",
    "spatial_overlay",
]

# Tick labels closer than this are unreadable; more tokens than fit are thinned.
_MIN_LABEL_PITCH_PT = 5.0
# Beyond this many tokens an axis never labels every token, however large the panel.
_MAX_TICK_LABELS = 60
# A head grid wider or taller than this (inches, panels only) has its panels shrunk.
_MAX_GRID_INCHES = 36.0


# --------------------------------------------------------------------------
# Heat maps with token labels.
# --------------------------------------------------------------------------


def _matrix(values: object, rows: int, cols: int, what: str) -> np.ndarray:
    """`values` as a float `[rows, cols]` matrix, cropped to the labels (padding is not drawn)."""
    matrix = np.asarray(values, np.float64)
    if matrix.ndim != 2 or matrix.shape[0] < rows or matrix.shape[1] < cols:
        raise ValueError(
            f"{what} must be a [query, key] matrix of at least {rows} x {cols} "
            f"(one row per query label, one column per key label), got shape {matrix.shape}"
        )
    return matrix[:rows, :cols]


def _tick_step(count: int, length_inches: float) -> int:
    """Label every k-th token: all of them if they fit >= 5 pt apart and number <= 60."""
    fit = max(1, int(length_inches * 72.0 / _MIN_LABEL_PITCH_PT))
    return max(1, math.ceil(count / max(1, min(count, fit, _MAX_TICK_LABELS))))


class _Ticks(NamedTuple):
    """The (thinned) token labels of one panel side and how they are drawn."""

    positions: list[int]
    labels: list[str]
    fontsize: float
    rotation: int
    extent_inches: float  # how far the labels reach out from the panel


def _text_inches(text: str, fontsize: float) -> float:
    """Rough width of a label: wide (CJK) characters ~1 em, others ~0.62 em (DejaVu Sans)."""
    ems = sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.62 for c in text)
    return ems * fontsize / 72.0


def _ticks(labels: list[str], length_inches: float, across: bool) -> _Ticks:
    """Tick labels along a panel side `length_inches` long; `across`: the x axis (may turn labels)."""
    step = _tick_step(len(labels), length_inches)
    positions = list(range(0, len(labels), step))
    shown = [labels[i] for i in positions]
    pitch_pt = length_inches * 72.0 / max(1, len(labels)) * step
    fontsize = float(np.clip(0.8 * pitch_pt, 4.0, 8.0))
    # Long labels (words, code points) would overlap side by side: turn them.
    rotation = 90 if across and max(map(len, shown), default=0) > 2 else 0
    widest = max((_text_inches(label, fontsize) for label in shown), default=0.0)
    reach = fontsize * 1.3 / 72.0 if across and not rotation else widest
    return _Ticks(positions, shown, fontsize, rotation, reach + 0.08)


def _panel_inches(rows: int, cols: int) -> tuple[float, float]:
    """(width, height) of one heat map panel: 0.15 in per token, 1.2 to 4.5 in on its long side.

    0.15 in leaves 8 pt labels room up to 30 tokens; longer sequences get
    smaller labels, down to the 5 pt pitch of `_tick_step`.
    """
    longest = max(rows, cols, 1)
    side = float(np.clip(0.15 * longest, 1.2, 4.5))
    return side * max(cols, 1) / longest, side * max(rows, 1) / longest


def _color_limits(matrices: Sequence[np.ndarray]) -> tuple[float, float]:
    """Shared colour scale: from 0 (or the minimum, if negative) to the largest value."""
    finite = np.concatenate([m[np.isfinite(m)].ravel() for m in matrices])
    if finite.size == 0:
        return 0.0, 1.0
    low, high = min(0.0, float(finite.min())), float(finite.max())
    return low, high if high > low else low + 1.0


def _heat_grid(
    matrices: Mapping[tuple[Hashable, Hashable], np.ndarray],
    queries: list[str],
    keys: list[str],
    *,
    panel: tuple[float, float],
    names: bool,
    colorbar_label: str,
    title: str | None,
) -> Figure:
    """Rows x columns of grey heat maps with one colour scale; labels on the outer panels.

    The layout is computed here from the panel size and the label widths, not
    by Matplotlib's constrained layout, which measures every tick label of
    every panel at each save (it doubled the time of a 4 x 16 grid of 100
    tokens).
    """
    rows = sorted({row for row, _ in matrices}, key=sort_order)
    cols = sorted({col for _, col in matrices}, key=sort_order)
    width, height = panel
    y_ticks, x_ticks = _ticks(queries, height, across=False), _ticks(keys, width, across=True)
    gap, name_room = 0.08, (0.25 if names else 0.0)
    left = 0.3 + name_room + y_ticks.extent_inches  # 'query', 'layer l', the tick labels
    bottom = 0.35 + x_ticks.extent_inches  # the tick labels, 'key'
    top = 0.15 + name_room + (0.35 if title else 0.0)  # 'head h', the title
    right = 1.0  # the colour bar, its ticks and label
    fig_width = left + len(cols) * width + (len(cols) - 1) * gap + right
    fig_height = bottom + len(rows) * height + (len(rows) - 1) * gap + top
    figure = Figure(figsize=(fig_width, fig_height))
    axes = figure.subplots(
        len(rows),
        len(cols),
        squeeze=False,
        gridspec_kw={
            "left": left / fig_width,
            "right": 1 - right / fig_width,
            "bottom": bottom / fig_height,
            "top": 1 - top / fig_height,
            "wspace": gap / width,
            "hspace": gap / height,
        },
    )
    low, high = _color_limits(list(matrices.values()))
    image = None
    families = label_families()
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            axis, matrix = axes[i, j], matrices.get((row, col))
            if matrix is None:
                axis.text(0.5, 0.5, "n/a", ha="center", va="center", transform=axis.transAxes)
                axis.set_xlim(-0.5, len(keys) - 0.5)
                axis.set_ylim(len(queries) - 0.5, -0.5)
            else:
                image = axis.imshow(
                    matrix,
                    cmap="Greys",
                    vmin=low,
                    vmax=high,
                    aspect="auto",
                    interpolation="nearest",
                )
            axis.set_xticks([])
            axis.set_yticks([])
            if names and i == 0:
                name = readable_labels([col])[0] if isinstance(col, str) else f"head {col}"
                axis.set_title(name, fontsize=9, fontfamily=families)
            if j == 0:
                axis.set_yticks(
                    y_ticks.positions,
                    y_ticks.labels,
                    fontsize=y_ticks.fontsize,
                    fontfamily=families,
                )
                if names:
                    name = readable_labels([row])[0] if isinstance(row, str) else f"layer {row}"
                    axis.set_ylabel(name, fontfamily=families)
            if i == len(rows) - 1:
                axis.set_xticks(
                    x_ticks.positions,
                    x_ticks.labels,
                    rotation=x_ticks.rotation,
                    fontsize=x_ticks.fontsize,
                    fontfamily=families,
                )
    if image is not None:
        bar_height = min(0.8 * len(rows) * height, 4.0)
        bar = figure.add_axes(
            (
                (fig_width - right + 0.15) / fig_width,
                (bottom + (len(rows) * height + (len(rows) - 1) * gap - bar_height) / 2)
                / fig_height,
                0.15 / fig_width,
                bar_height / fig_height,
            )
        )
        figure.colorbar(image, cax=bar, label=colorbar_label)
    # Axis names centred on the panels, outside the tick labels.
    panels_width = len(cols) * width + (len(cols) - 1) * gap
    panels_height = len(rows) * height + (len(rows) - 1) * gap
    figure.text(
        0.08 / fig_width,
        (bottom + panels_height / 2) / fig_height,
        "query",
        rotation=90,
        va="center",
        fontsize=9,
    )
    figure.text(
        (left + panels_width / 2) / fig_width, 0.08 / fig_height, "key", ha="center", fontsize=9
    )
    if title:
        figure.suptitle(
            readable_labels([title])[0], y=1 - 0.08 / fig_height, va="top", fontfamily=families
        )
    return figure


def head_grid(
    maps: Mapping[tuple[Hashable, Hashable], np.ndarray],
    query_labels: Sequence[str],
    key_labels: Sequence[str],
    path_stem: str | os.PathLike,
    *,
    title: str | None = None,
) -> Rendered:
    """Draws every (layer, head) alignment map of one example as a layers x heads grid.

    Rows are layers, columns heads, both in sorted order (numbers first, then
    names such as 'mean'). All panels share one colour scale, from 0 to the
    largest weight of all maps, and one colour bar. Query labels are written
    on the left column, key labels under the bottom row; a (layer, head) not
    in `maps` is an empty panel marked 'n/a'.

    Sizes: a panel is 0.15 in per token (1.2 to 4.5 in on its long side);
    when the panels would pass 36 in they shrink, so 16 heads x 12 layers x
    100 tokens still fits, and the PNG's long side is at most 4800 px (the
    SVG keeps all detail). Every token is labelled up to 60 tokens when the
    labels fit 5 pt apart; beyond 60 tokens, or in shrunk panels, only
    every k-th token is labelled (k as small as keeps both limits).

    Args:
      maps: {(layer, head): weights `[query, key]`}; head may be a name such
        as 'mean'. Maps larger than the labels are cropped (padding).
      query_labels: `[query]` token labels (rows), any script.
      key_labels: `[key]` token labels (columns), any script.
      path_stem: the figure goes to `<path_stem>.png` and `<path_stem>.svg`.
      title: the figure's title.

    Returns:
      The paths written.
    """
    if not maps:
        raise ValueError("head_grid: maps is empty; give at least one (layer, head) map")
    queries, keys = readable_labels(query_labels), readable_labels(key_labels)
    matrices = {
        key: _matrix(value, len(queries), len(keys), f"head_grid: map {key}")
        for key, value in maps.items()
    }
    layers, heads = len({k[0] for k in matrices}), len({k[1] for k in matrices})
    width, height = _panel_inches(len(queries), len(keys))
    shrink = min(1.0, _MAX_GRID_INCHES / (width * heads), _MAX_GRID_INCHES / (height * layers))
    figure = _heat_grid(
        matrices,
        queries,
        keys,
        panel=(width * shrink, height * shrink),
        names=True,
        colorbar_label="attention weight",
        title=title,
    )
    return save_figure(figure, path_stem)


def rollout_map(
    relevance: np.ndarray,
    query_labels: Sequence[str],
    key_labels: Sequence[str],
    path_stem: str | os.PathLike,
    *,
    title: str,
) -> Rendered:
    """Draws a rollout or attention-flow relevance matrix as one labelled heat map.

    The style of `plots.plot_alignment` (grey scale, rows = queries), with a
    colour bar from 0 to the largest relevance: rollout rows sum to 1 but
    their entries are small, so a fixed [0, 1] scale would show little.
    Labels are thinned past 60 tokens as in `head_grid`.

    Args:
      relevance: `[query, key]` relevance (e.g. `rollout.rollout(...)[b]`, or a
        target x source matrix of `rollout.source_relevance`); cropped to
        the labels.
      query_labels: `[query]` row labels, any script.
      key_labels: `[key]` column labels, any script.
      path_stem: the figure goes to `<path_stem>.png` and `<path_stem>.svg`.
      title: the figure's title (name the method: rollout, flow, ...).

    Returns:
      The paths written.
    """
    queries, keys = readable_labels(query_labels), readable_labels(key_labels)
    matrix = _matrix(relevance, len(queries), len(keys), "rollout_map: relevance")
    width, height = _panel_inches(len(queries), len(keys))
    # One panel: more room per token than in a grid (up to 6 in on its long side).
    scale = min(1.6, 6.0 / max(width, height))
    figure = _heat_grid(
        {(0, 0): matrix},
        queries,
        keys,
        panel=(width * scale, height * scale),
        names=False,
        colorbar_label="relevance",
        title=title,
    )
    return save_figure(figure, path_stem)
