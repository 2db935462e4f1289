"""Attention maps as pictures: one heat map per (target, source) alignment."""

import io
import os
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
    weights = np.asarray(weights, np.float32)[: len(target_labels), : len(source_labels)]
    if weights.ndim != 2:
        raise ValueError(f"plot_alignment: weights must be [target, source], got {weights.shape}")
    width = max(3.0, 0.3 * len(source_labels) + 1.5)
    height = max(3.0, 0.3 * len(target_labels) + 1.5)
    figure, axis = plt.subplots(figsize=(width, height), dpi=80)
    axis.imshow(weights, cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    axis.set_xticks(range(len(source_labels)), source_labels, fontsize=8)
    axis.set_yticks(range(len(target_labels)), target_labels, fontsize=8)
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
