"""The `digit_captions` dataset: a canvas of handwritten digits -> the digit string.

Each example is a 64x64 grayscale canvas holding 2 to 5 handwritten digits
from scikit-learn's `load_digits` (1,797 scans of 8x8 pixels, values 0..16,
shipped with scikit-learn), and the caption is the string of those digits in
reading order, e.g. '3071'.

How a canvas is drawn:

* the number of digits n is uniform in 2..5;
* each digit is scaled up (bilinear resize) to a square of side s, uniform in
  10..min(20, (64 - (n - 1)) // n) pixels so that the n squares always fit side
  by side, and its intensity is rescaled from 0..16 to 0..255;
* the squares are placed left to right with at least one blank column between
  two neighbours; the blank columns left over are spread at random before,
  between and after them, and each square gets a random row offset.

Reading order is therefore unambiguous: the horizontal extents of the digits
are disjoint and the caption reads them left to right (by increasing xmin).

Each digit's box is the square it was drawn in, as pixel indices
`[ymin, xmin, ymax, xmax]` with exclusive maxima (`canvas[ymin:ymax, xmin:xmax]`).
Every pixel outside the boxes is 0.

The 1,797 scans are split once (seeded permutation, 70% / 15% / 15%) into
disjoint train / validation / test pools, grouping scans with identical pixels;
each split draws its digits only from its own pool, so the test split uses
digit images never seen in training.

Features:

    image:        Image (64, 64, 1) uint8, the canvas (stored as PNG).
    caption:      Text, the digits in reading order (read back as UTF-8 `bytes`).
    boxes:        int32 [n, 4], [ymin, xmin, ymax, xmax] of each digit, in reading order.
    digit_index:  int32 [n], index of each digit's scan in `load_digits()`.

Sizes of the `default` config: 20,000 train / 2,000 validation / 2,000 test
canvases, generated in about 20 s on a shared two-core machine.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds
from etils import epath

CANVAS_SIZE = 64
MIN_DIGITS, MAX_DIGITS = 2, 5
MIN_SIDE, MAX_SIDE = 10, 20
GAP = 1  # blank columns at least between two digits
SPLITS = ("train", "validation", "test")
POOL_FRACTIONS = (0.70, 0.15, 0.15)
DIGIT_MAX = 16.0  # `load_digits` intensities are 0..16


def digit_pools(images: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Splits the scans into disjoint train / validation / test pools.

    Scans with identical pixels are kept in one pool, so no image content is
    shared between splits.

    Args:
      images: [num_scans, 8, 8], the `load_digits` images.
      seed: seed of the permutation.

    Returns:
      Split name -> sorted int indices into `images`.
    """
    flat = images.reshape(len(images), -1)
    _, group_of = np.unique(flat, axis=0, return_inverse=True)
    group_of = group_of.reshape(-1)
    num_groups = int(group_of.max()) + 1
    order = np.random.default_rng(seed).permutation(num_groups)
    bounds = np.round(np.cumsum((0.0,) + POOL_FRACTIONS) * num_groups).astype(int)
    pools = {}
    for name, start, stop in zip(SPLITS, bounds[:-1], bounds[1:], strict=True):
        pools[name] = np.flatnonzero(np.isin(group_of, order[start:stop]))
    return pools


def scale_digit(image: np.ndarray, side: int) -> np.ndarray:
    """Bilinear resize of an 8x8 scan (0..16) to a side x side uint8 square (0..255)."""
    resized = PIL.Image.fromarray(image.astype(np.float32)).resize(
        (side, side), PIL.Image.Resampling.BILINEAR
    )
    scaled = np.asarray(resized) * (255.0 / DIGIT_MAX)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@functools.cache
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """`load_digits()` images [1797, 8, 8] (0..16) and labels [1797], loaded once."""
    # Imported here: scikit-learn takes a second to import, and only generation needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images, digits.target


@functools.cache
def scaled_scan(index: int, side: int) -> np.ndarray:
    """Scan `index` of `load_digits` scaled to side x side uint8, computed once per pair."""
    return scale_digit(digit_scans()[0][index], side)


def draw_canvas(
    rng: np.random.Generator, pool: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draws one canvas from the `load_digits` scans whose indices are in `pool`.

    Returns:
      canvas: uint8 [64, 64].
      boxes: int32 [n, 4], [ymin, xmin, ymax, xmax] left to right.
      digit_index: int32 [n], the scans drawn, left to right.
    """
    count = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    max_side = min(MAX_SIDE, (CANVAS_SIZE - (count - 1) * GAP) // count)
    sides = rng.integers(MIN_SIDE, max_side + 1, size=count)
    # Blank columns beyond the minimum gaps, cut at `count` sorted random points
    # into `count + 1` stretches: before the first digit, between, after the last.
    slack = CANVAS_SIZE - int(sides.sum()) - (count - 1) * GAP
    cuts = np.sort(rng.integers(0, slack + 1, size=count))
    xmins = cuts + np.concatenate([[0], np.cumsum(sides[:-1] + GAP)])
    ymins = rng.integers(0, CANVAS_SIZE - sides + 1)
    digit_index = pool[rng.integers(0, len(pool), size=count)]

    canvas = np.zeros((CANVAS_SIZE, CANVAS_SIZE), np.uint8)
    placements = zip(sides.tolist(), xmins.tolist(), ymins.tolist(), digit_index, strict=True)
    for side, x, y, index in placements:
        canvas[y : y + side, x : x + side] = scaled_scan(int(index), side)
    boxes = np.stack([ymins, xmins, ymins + sides, xmins + sides], axis=1).astype(np.int32)
    return canvas, boxes, digit_index.astype(np.int32)


@dataclasses.dataclass(eq=False)
class DigitCaptionsConfig(tfds.core.BuilderConfig):
    """Sizes and seed of the `digit_captions` dataset."""

    num_train: int = 20_000
    num_validation: int = 2_000
    num_test: int = 2_000
    seed: int = 0


class DigitCaptions(tfds.core.GeneratorBasedBuilder):
    """64x64 canvases of 2-5 handwritten digits -> the digits in reading order, with boxes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: 2-5 digits of side 10-20 px, read left to right."}
    BUILDER_CONFIGS = [DigitCaptionsConfig(name="default", version=VERSION, description=__doc__)]
    # TFDS 4.9.10 finds a packaged builder's source through `importlib_resources`,
    # which it does not install on Python >= 3.9; name the file directly.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(CANVAS_SIZE, CANVAS_SIZE, 1), dtype=np.uint8
                    ),
                    "caption": tfds.features.Text(),
                    "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
                    "digit_index": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                }
            ),
            supervised_keys=("image", "caption"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: scikit-learn ships the digits
        config = self.builder_config
        images, labels = digit_scans()
        pools = digit_pools(images, config.seed)
        sizes = {
            "train": config.num_train,
            "validation": config.num_validation,
            "test": config.num_test,
        }
        return {
            name: self._generate_examples(
                # One generator per split, so a split does not change with another's size.
                np.random.default_rng([config.seed, split_id]),
                labels,
                pools[name],
                sizes[name],
            )
            for split_id, name in enumerate(SPLITS)
        }

    def _generate_examples(
        self,
        rng: np.random.Generator,
        labels: np.ndarray,
        pool: np.ndarray,
        size: int,
    ) -> Iterator[tuple[int, dict[str, object]]]:
        for index in range(size):
            canvas, boxes, digit_index = draw_canvas(rng, pool)
            # A PIL image: TFDS encodes it to PNG with PIL. (A NumPy array would
            # go through `tf.image.encode_png`, which needs TensorFlow.)
            yield (
                index,
                {
                    "image": PIL.Image.fromarray(canvas),
                    "caption": "".join(str(labels[i]) for i in digit_index),
                    "boxes": boxes,
                    "digit_index": digit_index,
                },
            )
