"""One example of `--mode=interpret`: its page entry and, for the first few, its figures.

The maps are those of the best beam hypothesis (a teacher-forced re-run of
it); labels are the tokenizer's pieces, or 'row,col' grid cells for an image.
Figures (PNG and SVG, `attnx.interpret.figures`): the layer x head grid of
the cross-attention (or the RNN's, ConvS2S's layers, the captioner's spatial
overlay on the image, with the gold boxes), and the rollout relevance.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from attnx.interpret import figures as figures_lib
from attnx.interpret import spatial_figures
from attnx.interpret.example_views import example_maps, kind_of
from attnx.interpret.html_page import AttentionMap, PageExample, SourceImage
from attnx.training import evaluate

# The maps drawn in an example's head grid: those over the source.
_SOURCE_KINDS = ("cross", "multi-step", "global", "spatial")


def _png_base64(image: np.ndarray) -> str:
    """A float [H, W, C] image in [0, 1] as a base64 PNG (for the page's overlay)."""
    import matplotlib.image

    pixels = np.clip(image, 0.0, 1.0)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, pixels, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def page_example(
    run: Any,
    weights: Mapping[str, np.ndarray],
    relevance: np.ndarray,
    batch: Mapping[str, np.ndarray],
    row: int,
    sequence: np.ndarray,
    texts: Sequence[str],
    *,
    figures: str | None,
) -> PageExample:
    """The page entry of `batch[row]` (and its figures under the stem `figures`, if given).

    Args:
      run: the restored `Run` (its tokenizer, task, records).
      weights: the example's weights dict (one row) on its best hypothesis.
      relevance: `[t, s]` rollout relevance of that hypothesis to the source.
      batch: the host batch; row: the example's row.
      sequence: the hypothesis's token ids.
      texts: (source, reference, hypothesis) as written to hypotheses.tsv.
      figures: path stem of the example's figures, or None for none.
    """
    target_labels = evaluate.token_labels_with_eos(run.tokenizer, sequence)
    image = None
    if run.captions:
        picture = np.asarray(batch["image"][row])
        cells = next(np.asarray(v).shape[-1] for k, v in weights.items() if kind_of(k) is not None)
        side = int(round(cells**0.5))
        source_labels = [f"{r},{c}" for r in range(side) for c in range(side)]
        image = SourceImage(grid_shape=(side, side), png_base64=_png_base64(picture))
    else:
        source_labels = evaluate.token_labels_with_eos(run.tokenizer, batch["inputs"][row])
    maps = example_maps(weights, source_labels, target_labels)
    t, s = len(target_labels), len(source_labels)
    maps.append(
        AttentionMap(
            name="rollout",
            layer=0,
            kind="rollout",
            head="mean",
            query_labels=target_labels,
            key_labels=source_labels,
            weights=np.asarray(relevance)[:t, :s],
        )
    )
    if figures is not None:
        _draw(run, maps, batch, row, figures, texts)
    return PageExample(
        source_tokens=source_labels,
        target_tokens=target_labels,
        reference=texts[1],
        hypothesis=texts[2],
        maps=maps,
        image=image,
    )


def hypothesis_boxes(
    gold: Sequence[Sequence[int]], tokens: Sequence[str], reference: str
) -> list[Sequence[int] | None]:
    """One gold box per hypothesis token, or None where the token has none.

    `gold[i]` is the box of the reference's i-th character (a `digit_captions`
    digit). The maps are the hypothesis's, which may miss, add or change a
    digit: token i gets box i only where it is the reference's i-th character;
    a wrong token, one past the reference and the closing '</s>' get none
    (a box there would mark a digit the model did not name).
    """
    return [
        gold[i] if i < min(len(gold), len(reference)) and token == reference[i] else None
        for i, token in enumerate(tokens)
    ]


def _draw(
    run: Any,
    maps: list[AttentionMap],
    batch: Mapping[str, np.ndarray],
    row: int,
    stem: str,
    texts: Sequence[str],
) -> None:
    source_maps = [m for m in maps if m.kind in _SOURCE_KINDS]
    title = f"{texts[0]} -> {texts[2]}"
    if run.captions:
        spatial = next(m for m in source_maps if m.head == "mean")
        side = int(round(len(spatial.key_labels) ** 0.5))
        boxes = run.task.gold_boxes(run.eval_source[int(batch["index"][row])])
        spatial_figures.spatial_overlay(
            np.asarray(batch["image"][row]),
            np.asarray(spatial.weights),
            spatial.query_labels,
            (side, side),
            f"{stem}_spatial",
            boxes=None
            if boxes is None
            else hypothesis_boxes(boxes, spatial.query_labels, texts[1]),
            title=f"{texts[1]} -> {texts[2]}",
        )
    else:
        grid = {(m.layer, m.head): np.asarray(m.weights) for m in source_maps}
        first = source_maps[0]
        figures_lib.head_grid(
            grid, first.query_labels, first.key_labels, f"{stem}_heads", title=title
        )
    relevance = maps[-1]
    figures_lib.rollout_map(
        np.asarray(relevance.weights),
        relevance.query_labels,
        relevance.key_labels,
        f"{stem}_rollout",
        title=f"rollout: {title}",
    )
