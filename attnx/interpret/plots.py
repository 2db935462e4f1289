"""Attention maps as pictures: one heat map per (target, source) alignment.

Token labels come from any script (the `dates` task has 15). Matplotlib's
bundled DejaVu Sans has no CJK, Thai or Devanagari glyphs, so each label is
drawn with the first installed font that has its characters (DejaVu Sans,
then any Noto, Droid, WenQuanYi or Unifont family: `apt install fonts-noto`
covers every script), and a character that no installed font has is written
as its code point (U+0E01) instead of an empty box.
"""

import functools
import io
import os
import pathlib
from collections.abc import Sequence
from typing import NamedTuple

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.font_manager as font_manager  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ft2font import FT2Font  # noqa: E402

_FALLBACK_FAMILIES = ("Noto", "Droid", "WenQuanYi", "Unifont", "Arial Unicode")


@functools.cache
def _label_fonts() -> tuple[tuple[str, FT2Font], ...]:
    """(family, font) pairs to draw labels with, DejaVu Sans first."""
    entries = [("DejaVu Sans", font_manager.findfont("DejaVu Sans"))]
    entries += sorted(
        (entry.name, entry.fname)
        for entry in font_manager.fontManager.ttflist
        if entry.name.startswith(_FALLBACK_FAMILIES)
    )
    fonts, seen = [], set()
    for name, path in entries:
        if name in seen:
            continue
        seen.add(name)
        try:
            fonts.append((name, FT2Font(path)))
        except (OSError, RuntimeError):  # an unreadable font file: skip it
            continue
    return tuple(fonts)


@functools.cache
def _has_glyph(char: str) -> bool:
    return char.isspace() or any(font.get_char_index(ord(char)) for _, font in _label_fonts())


def readable_labels(labels: Sequence[str]) -> list[str]:
    """The labels, with every character no installed font can draw written as U+XXXX."""
    return [
        "".join(c if _has_glyph(c) else f"U+{ord(c):04X}" for c in str(label)) for label in labels
    ]


def label_families() -> list[str]:
    """Font families for labels, in fallback order (Matplotlib picks per character)."""
    return [name for name, _ in _label_fonts()]


def plot_alignment(
    weights: np.ndarray,
    source_labels: Sequence[str],
    target_labels: Sequence[str],
    path: str | None = None,
    title: str = "",
) -> np.ndarray:
    """Draws `weights[t, s]` (target rows, source columns) with token labels.

    Args:
      weights: `[target_length, source_length]` attention weights in [0, 1];
        it is cropped to the label counts (padding is not drawn).
      source_labels / target_labels: one label per source / target token.
      path: where to write the PNG (its folder is created), or None.
      title: the figure's title.

    Returns:
      The picture as an RGB uint8 array `[height, width, 3]` (for TensorBoard).
    """
    weights = np.asarray(weights, np.float32)
    if weights.ndim != 2:
        raise ValueError(f"plot_alignment: weights must be [target, source], got {weights.shape}")
    weights = weights[: len(target_labels), : len(source_labels)]
    source_labels = readable_labels(source_labels)
    target_labels = readable_labels(target_labels)
    width = max(3.0, 0.3 * len(source_labels) + 1.5)
    height = max(3.0, 0.3 * len(target_labels) + 1.5)
    figure, axis = plt.subplots(figsize=(width, height), dpi=80)
    axis.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    font = {"fontsize": 8, "fontfamily": label_families()}
    # Long labels (words, code points) would overlap side by side: turn them.
    turn = 90 if max(map(len, source_labels), default=0) > 2 else 0
    axis.set_xticks(range(len(source_labels)), source_labels, rotation=turn, **font)
    axis.set_yticks(range(len(target_labels)), target_labels, **font)
    axis.set(xlabel="source", ylabel="target", title=title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    if path is not None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
    figure.canvas.draw()
    picture = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return picture


# --------------------------------------------------------------------------
# Writing report figures (attnx.interpret.figures and its siblings).
# --------------------------------------------------------------------------

_FIGURE_DPI = 100
_FIGURE_MAX_PIXELS = 4800  # longest side of a PNG; the SVG keeps every detail


class Rendered(NamedTuple):
    """The files one figure was written to."""

    png: pathlib.Path
    svg: pathlib.Path


def save_figure(figure: Figure, path_stem: str | os.PathLike) -> Rendered:
    """Writes `figure` to `<path_stem>.png` and `<path_stem>.svg` (folders created).

    Deterministic: the PNG has no timestamp, and the SVG no date and a fixed
    id salt (Matplotlib salts its ids with a random uuid unless told not
    to), so the same figure gives the same bytes. The PNG is drawn at 100
    dpi, less if its long side would pass 4800 px. A stem ending in '.png' or
    '.svg' has that suffix dropped; any other dot ('grid.layer3') is part of
    the name.
    """
    stem = pathlib.Path(path_stem)
    if stem.suffix.lower() in (".png", ".svg"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, svg = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.svg"
    dpi = min(_FIGURE_DPI, _FIGURE_MAX_PIXELS / max(figure.get_size_inches()))
    figure.savefig(png, format="png", dpi=dpi)
    with matplotlib.rc_context({"svg.hashsalt": "attnx"}):
        figure.savefig(svg, format="svg", metadata={"Date": None})
    return Rendered(png, svg)
