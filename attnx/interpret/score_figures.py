"""Report figures of scores: faithfulness erasure curves and per-(layer, head) score tables.

Both write `<path_stem>.png` and `<path_stem>.svg` (`plots.save_figure`) and
return the paths; they build `matplotlib.figure.Figure` objects outside
pyplot, so many calls leak no figure. `attnx.interpret.figures` re-exports
them with the other report figures.
"""

import numbers
import os
from collections.abc import Hashable, Mapping

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.patches as mpatches  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attnx.interpret.plots import (  # noqa: E402
    Rendered,
    label_families,
    readable_labels,
    save_figure,
)

__all__ = ["aopc", "best_cell", "erasure_curves", "head_table_figure", "sort_order"]


def _readable(text: object) -> str:
    """A title or name in any script, as `plots.readable_labels` writes labels."""
    return readable_labels([str(text)])[0]


def sort_order(key: Hashable) -> tuple[int, float, str]:
    """Sort key of layers and heads: numbers first, by value (0, 1, ..., 10), then names ('mean')."""
    if isinstance(key, numbers.Real):
        return (0, float(key), "")
    return (1, 0.0, str(key))


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def aopc(curve: Mapping[float, float]) -> float:
    """Area over the perturbation curve: the mean drop over the erasure bins.

    The bins are the fractions > 0; a 0 % point (nothing erased, drop 0 by
    definition) is the curve's origin, not a bin. This is ERASER's AOPC
    (DeYoung et al. 2020, sec. 4.2, as its scorer computes it) and the one
    `faithfulness.erasure_scores` reports, so figure and table agree.
    (Samek et al. 2017, eq. 12, also average the 0 % term: L / (L + 1) times this.)

    Args:
      curve: {fraction erased: mean drop in p(y_t)}.
    """
    drops = [float(drop) for fraction, drop in curve.items() if fraction > 0]
    return float(np.mean(drops)) if drops else float("nan")


def erasure_curves(
    curves: Mapping[str, Mapping[float, float]],
    path_stem: str | os.PathLike,
    *,
    title: str,
    aopc_values: Mapping[str, float] | None = None,
) -> Rendered:
    """Draws faithfulness erasure curves: mean drop of p(y_t) against the fraction erased.

    The x axis shows the erased fractions (union over the methods) evenly
    spaced, as percentages: the usual steps (0, 1, 5, 10, 20, 50 %) would
    crowd at the left of a linear axis, and AOPC weighs every step equally,
    as this spacing does. One line with markers per method; the legend
    gives each method's AOPC (`aopc`: the mean over the bins > 0 %, unless
    `aopc_values` says otherwise). A faithful ranking erases what matters
    first, so its curve rises above 'random'.

    Args:
      curves: {method: {fraction erased in [0, 1]: mean drop in p(y_t)}},
        e.g. {'attention': {0.0: 0.0, 0.01: 0.12, ...}, 'random': {...}}.
        From `faithfulness.erasure_scores`: {k / 100: mean over the real
        target tokens of comprehensiveness[..., i] for i, k in enumerate(bins)}.
      path_stem: the figure goes to `<path_stem>.png` and `<path_stem>.svg`.
      title: the figure's title.
      aopc_values: {method: AOPC} computed elsewhere, to show instead.

    Returns:
      The paths written.
    """
    if not curves:
        raise ValueError("erasure_curves: curves is empty; give at least one method")
    for method, points in curves.items():
        fractions = np.asarray(list(points), np.float64)
        if fractions.size == 0 or not np.all((fractions >= 0) & (fractions <= 1)):
            raise ValueError(
                f"erasure_curves: method {method!r} needs fractions in [0, 1] (percent / 100), "
                f"got {list(points)}"
            )
    steps = sorted({float(f) for points in curves.values() for f in points})
    position = {fraction: i for i, fraction in enumerate(steps)}
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    axis = figure.subplots()
    axis.axhline(0.0, color="0.6", linewidth=0.8)
    for i, (method, points) in enumerate(curves.items()):
        fractions = sorted(points)
        drops = [float(points[f]) for f in fractions]
        area = aopc_values[method] if aopc_values and method in aopc_values else aopc(points)
        axis.plot(
            [position[float(f)] for f in fractions],
            drops,
            marker=_MARKERS[i % len(_MARKERS)],
            label=f"{_readable(method)} (AOPC {area:.3f})",
        )
    axis.set_xticks(range(len(steps)), [f"{100 * f:g} %" for f in steps])
    axis.set(xlabel="fraction of the input erased", ylabel=r"mean drop in $p(y_t)$")
    axis.set_title(_readable(title), fontfamily=label_families())
    axis.grid(alpha=0.3)
    axis.legend(prop={"family": label_families()}, fontsize=8)
    return save_figure(figure, path_stem)


def _score_table(
    scores: np.ndarray | Mapping[tuple[Hashable, Hashable], float],
) -> tuple[np.ndarray, list[Hashable], list[Hashable]]:
    """`[layers, heads]` float table with its row and column names (missing cells NaN)."""
    if isinstance(scores, Mapping):
        layers = sorted({layer for layer, _ in scores}, key=sort_order)
        heads = sorted({head for _, head in scores}, key=sort_order)
        table = np.full((len(layers), len(heads)), np.nan)
        for (layer, head), value in scores.items():
            table[layers.index(layer), heads.index(head)] = float(value)
        return table, layers, heads
    table = np.asarray(scores, np.float64)
    if table.ndim != 2:
        raise ValueError(f"head_table_figure: scores must be [layers, heads], got {table.shape}")
    return table, list(range(table.shape[0])), list(range(table.shape[1]))


def best_cell(table: np.ndarray, *, lower_is_better: bool) -> tuple[int, int] | None:
    """(row, column) of the best finite score of `[layers, heads]` (first on ties), None if none."""
    table = np.asarray(table, np.float64)
    defined = np.isfinite(table)
    if not defined.any():
        return None
    ranked = np.where(defined, table if lower_is_better else -table, np.inf)
    row, col = np.unravel_index(int(np.argmin(ranked)), table.shape)
    return int(row), int(col)


def head_table_figure(
    scores: np.ndarray | Mapping[tuple[Hashable, Hashable], float],
    path_stem: str | os.PathLike,
    *,
    metric: str,
    lower_is_better: bool = False,
    fmt: str = ".2f",
) -> Rendered:
    """Draws a score per (layer, head) as a heat map with the values written in and the best boxed.

    The colour map runs so that better is always brighter (viridis, reversed
    for `lower_is_better`, e.g. AER). Undefined cells (NaN, or pairs missing
    from a dict) are grey, written 'n/a' and never best; ties go to the
    first cell in row-major order.

    Args:
      scores: `[layers, heads]` array, or {(layer, head): score}, e.g.
        `{(e.layer, e.head): getattr(e.scores, sweep.metric) for e in sweep.entries}`
        for an `alignment_scores.Sweep`.
      path_stem: the figure goes to `<path_stem>.png` and `<path_stem>.svg`.
      metric: the score's name, for the title and colour bar ('AER', ...).
      lower_is_better: True for errors (AER); False for accuracies.
      fmt: format of the values written in the cells.

    Returns:
      The paths written.
    """
    table, layers, heads = _score_table(scores)
    defined = np.isfinite(table)
    cmap = matplotlib.colormaps["viridis_r" if lower_is_better else "viridis"].with_extremes(
        bad="0.85"
    )
    figure = Figure(
        figsize=(1.8 + 0.62 * len(heads), 1.2 + 0.42 * len(layers)), layout="constrained"
    )
    axis = figure.subplots()
    values = np.ma.masked_invalid(table)
    if defined.any():
        low, high = float(table[defined].min()), float(table[defined].max())
    else:
        low, high = 0.0, 1.0
    norm = mcolors.Normalize(low, high if high > low else low + 1e-9)
    image = axis.imshow(values, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    fontsize = 8 if len(heads) <= 12 else 6
    for (row, col), value in np.ndenumerate(table):
        if not defined[row, col]:
            axis.text(col, row, "n/a", ha="center", va="center", fontsize=fontsize, color="0.3")
            continue
        # Dark text on bright cells, white on dark ones (relative luminance of the cell).
        red, green, blue, _ = cmap(norm(value))
        light = 0.2126 * red + 0.7152 * green + 0.0722 * blue > 0.45
        axis.text(
            col,
            row,
            format(value, fmt),
            ha="center",
            va="center",
            fontsize=fontsize,
            color="black" if light else "white",
        )
    best = best_cell(table, lower_is_better=lower_is_better)
    if best is not None:
        row, col = best
        # Not clipped: a best cell on the border keeps its whole outline.
        axis.add_patch(
            mpatches.Rectangle(
                (col - 0.5, row - 0.5),
                1,
                1,
                fill=False,
                edgecolor="red",
                linewidth=2.5,
                clip_on=False,
            )
        )
    families = label_families()
    axis.set_xticks(range(len(heads)), readable_labels(heads), fontfamily=families)
    axis.set_yticks(range(len(layers)), readable_labels(layers), fontfamily=families)
    axis.set(xlabel="head", ylabel="layer")
    better = "lower" if lower_is_better else "higher"
    metric = _readable(metric)
    axis.set_title(
        f"{metric} per layer and head ({better} is better; best boxed)",
        fontsize=10,
        fontfamily=families,
    )
    figure.colorbar(image, ax=axis).set_label(metric, fontfamily=families)
    return save_figure(figure, path_stem)
