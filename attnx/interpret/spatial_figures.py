"""Where a captioner looked: spatial attention over the image, one panel per emitted token.

The figure of Xu et al. (2015), "Show, Attend and Tell", fig. 2-3: the
weights alpha_t over the g_h x g_w grid of CNN feature cells, brought to the
image's size, smoothed and laid over the image.

Upsampling and smoothing. Cell (r, c) summarises the pixels [r*s_y,
(r+1)*s_y) x [c*s_x, (c+1)*s_x) (s = the stride; `alignment_scores.
cell_pixel_boxes`), so `upsample_grid` spreads each cell's weight evenly
over exactly those pixels: the picture's total equals the map's total (1 for
a softmax over cells) and no weight leaks out of its cell. `smooth` then
applies a Gaussian filter (`scipy.ndimage.gaussian_filter`; scipy comes with
scikit-learn, an attnx dependency) with mirrored borders, which also keeps
the total. Xu et al.'s released notebook (arctic-captions,
alpha_visualization.ipynb) brought their 14 x 14 map to 224 x 224 with
`skimage.transform.pyramid_expand(alpha, upscale=16, sigma=20)` (bilinear
upsampling by the VGG stride, then a Gaussian of sigma = 20 px, i.e. 1.25
strides). That blur spans about five cells, which on attnx's small grids (8 x
8 cells over a 64 x 64 canvas) smears one cell over its neighbours' digits.
The default here is sigma = stride / 2: the block edges vanish and the peak
stays inside the attended cell. Pass `smooth_sigma=1.25 * stride` for the
paper's look, or 0 for the raw blocks.

Display. Each token's heat is divided by its own maximum (intensities compare
within a panel, not across panels, as in the paper's figures) and blended
over the image: `(1 - alpha) * image + alpha * cmap(heat)`. The notebook laid
a grey map (Greys_r, alpha 0.8) over colour photographs; over attnx's grey
digit canvases a grey map would be confused with the digits' own brightness,
so the default is a coloured map of increasing lightness (inferno, alpha
0.6): the brightest pixel is the most attended, and the digits show through.
"""

import os
from collections.abc import Sequence

import matplotlib
import numpy as np
from scipy import ndimage

matplotlib.use("Agg")
import matplotlib.patches as mpatches  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from attnx.interpret.plots import (  # noqa: E402
    Rendered,
    label_families,
    readable_labels,
    save_figure,
)

__all__ = ["attention_heat", "overlay", "smooth", "spatial_overlay", "to_rgb", "upsample_grid"]

Box = Sequence[float]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def upsample_grid(
    weights: np.ndarray, image_shape: tuple[int, int], stride: int | tuple[int, int]
) -> np.ndarray:
    """Spreads a cell grid of weights over the pixels each cell covers.

    Args:
      weights: `[g_h, g_w]` weights of the grid cells.
      image_shape: (H, W) of the image; the grid must fit: g_h * s_y <= H.
      stride: pixels per cell side, s or (s_y, s_x).

    Returns:
      float64 `[H, W]`: pixel (i, j) of cell (r, c) holds weights[r, c] /
      (s_y * s_x); pixels in no cell (edges the pooling dropped) hold 0. The
      total equals weights.sum().
    """
    weights = np.asarray(weights, np.float64)
    if weights.ndim != 2:
        raise ValueError(f"weights must be a [g_h, g_w] grid, got shape {weights.shape}")
    (rows, cols), (height, width) = weights.shape, image_shape
    step_y, step_x = _pair(stride, "stride")
    if rows * step_y > height or cols * step_x > width:
        raise ValueError(
            f"a {weights.shape} grid with stride ({step_y}, {step_x}) does not fit an "
            f"image of {image_shape}"
        )
    blocks = np.repeat(np.repeat(weights / (step_y * step_x), step_y, axis=0), step_x, axis=1)
    density = np.zeros((height, width))
    density[: rows * step_y, : cols * step_x] = blocks
    return density


def smooth(density: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (sigma in pixels; 0 = none) with mirrored borders, which keep the total."""
    if sigma < 0:
        raise ValueError(f"smooth_sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return np.asarray(density, np.float64)
    return ndimage.gaussian_filter(np.asarray(density, np.float64), sigma, mode="reflect")


def attention_heat(
    weights: np.ndarray,
    image_shape: tuple[int, int],
    stride: int | tuple[int, int],
    sigma: float,
) -> np.ndarray:
    """`[H, W]` attention density of one token: `smooth(upsample_grid(...))`, total = weights.sum()."""
    return smooth(upsample_grid(weights, image_shape, stride), sigma)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """`[H, W]`, `[H, W, 1|3|4]` image (floats in [0, 1] or uint8) as float64 `[H, W, 3]` in [0, 1]."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        image = image[..., :3]
    elif image.ndim != 2:
        raise ValueError(f"image must be [H, W] or [H, W, 1|3|4], got {image.shape}")
    if image.dtype == np.uint8:
        image = image / 255.0
    else:
        image = image.astype(np.float64)
        if image.size and (image.min() < -1e-6 or image.max() > 1 + 1e-6):
            raise ValueError(
                f"a float image must lie in [0, 1], got [{image.min():.3g}, {image.max():.3g}]: "
                "undo the input normalisation first"
            )
        image = np.clip(image, 0.0, 1.0)
    if image.ndim == 2 or image.shape[-1] == 1:
        image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
    return image


def overlay(
    image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = "inferno"
) -> np.ndarray:
    """Blends a heat map over an image: `(1 - alpha) * image + alpha * cmap(heat / heat.max())`.

    Args:
      image: any image `to_rgb` takes, `[H, W(, C)]`.
      heat: `[H, W]` non-negative attention density.
      alpha: opacity of the heat map.
      cmap: a Matplotlib colour map name.

    Returns:
      float64 `[H, W, 3]` RGB in [0, 1], the panel exactly as drawn.
    """
    rgb = to_rgb(image)
    peak = float(np.max(heat)) if np.size(heat) else 0.0
    relative = np.asarray(heat, np.float64) / peak if peak > 0 else np.zeros(rgb.shape[:2])
    colors = matplotlib.colormaps[cmap](relative)[..., :3]
    return (1.0 - alpha) * rgb + alpha * colors


def _box(box: Box | None) -> tuple[float, float, float, float] | None:
    if box is None:
        return None
    values = np.asarray(box, np.float64)
    if values.shape != (4,):
        raise ValueError(f"a box is [ymin, xmin, ymax, xmax], got {box!r}")
    return None if np.isnan(values).any() else tuple(values)


def spatial_overlay(
    image: np.ndarray,
    weights: np.ndarray,
    tokens: Sequence[str],
    grid_shape: int | tuple[int, int],
    path_stem: str | os.PathLike,
    *,
    stride: int | tuple[int, int] | None = None,
    smooth_sigma: float | None = None,
    boxes: Sequence[Box | None] | np.ndarray | None = None,
    alpha: float = 0.6,
    cmap: str = "inferno",
    columns: int = 6,
    title: str | None = None,
) -> Rendered:
    """Draws the image, then one panel per emitted token with its attention laid over the image.

    Args:
      image: `[H, W]` or `[H, W, C]` image, floats in [0, 1] or uint8.
      weights: `[T, g_h * g_w]` (row-major cells, as the captioner flattens
        them) or `[T, g_h, g_w]` attention weights, one row per decoding step;
        rows past len(tokens) (padding) are ignored.
      tokens: the T emitted tokens, panel titles (any script).
      grid_shape: (g_h, g_w), or g for a g x g grid.
      path_stem: the figure goes to `<path_stem>.png` and `<path_stem>.svg`.
      stride: pixels per cell side, s or (s_y, s_x); default (H // g_h, W // g_w).
      smooth_sigma: Gaussian sigma in pixels; default min(s_y, s_x) / 2 (see
        the module docstring); 0 for none.
      boxes: one [ymin, xmin, ymax, xmax] pixel box per token (maxima
        exclusive, the `digit_captions` convention), None or NaN for tokens
        without one, drawn in green on that token's panel.
      alpha: opacity of the heat map.
      cmap: colour map of the heat.
      columns: panels per row.
      title: the figure's title.

    Returns:
      The paths written.
    """
    rgb = to_rgb(image)
    height, width = rgb.shape[:2]
    grid = _pair(grid_shape, "grid_shape")
    steps = _pair(stride, "stride") if stride is not None else (height // grid[0], width // grid[1])
    sigma = min(steps) / 2 if smooth_sigma is None else float(smooth_sigma)
    weights = np.asarray(weights, np.float64)
    if weights.ndim == 2 and weights.shape[1] == grid[0] * grid[1]:
        weights = weights.reshape(weights.shape[0], *grid)
    if weights.ndim != 3 or weights.shape[1:] != grid or weights.shape[0] < len(tokens):
        raise ValueError(
            f"weights must be [T, {grid[0] * grid[1]}] or [T, {grid[0]}, {grid[1]}] with "
            f"T >= {len(tokens)} tokens, got {weights.shape}"
        )
    if boxes is not None and len(boxes) != len(tokens):
        raise ValueError(f"boxes: one per token ({len(tokens)}), got {len(boxes)}")
    labels = readable_labels(tokens)
    panels = len(labels) + 1
    columns = max(1, min(columns, panels))
    rows = -(-panels // columns)
    side = 2.2
    figure = Figure(
        figsize=(side * columns, side * rows * height / width + (0.5 if title else 0.2)),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("image", fontsize=10)
    for index, label in enumerate(labels):
        axis = axes[index + 1]
        heat = attention_heat(weights[index], (height, width), steps, sigma)
        axis.imshow(overlay(rgb, heat, alpha=alpha, cmap=cmap), interpolation="nearest")
        axis.set_title(label, fontsize=11, fontfamily=label_families())
        box = _box(boxes[index]) if boxes is not None else None
        if box is not None:
            ymin, xmin, ymax, xmax = box
            # Pixel i spans [i - 0.5, i + 0.5] in imshow coordinates; maxima are exclusive.
            axis.add_patch(
                mpatches.Rectangle(
                    (xmin - 0.5, ymin - 0.5),
                    xmax - xmin,
                    ymax - ymin,
                    fill=False,
                    edgecolor="lime",
                    linewidth=1.5,
                )
            )
    for axis in axes:
        axis.set_axis_off()
    if title:
        figure.suptitle(readable_labels([title])[0], fontfamily=label_families())
    return save_figure(figure, path_stem)
