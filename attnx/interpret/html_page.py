"""One self-contained HTML page to browse attention maps (`index.html`).

`write_page(path, examples, title=...)` writes a single file that opens from
the file system (file://) with no network: its CSS and JavaScript are inline,
its data is inline JSON, an image source is a `data:` URL, and a Content
Security Policy in the page forbids every other load, so a page that works
here works offline anywhere.

The data (plain Python, no attnx types; a dict with the same keys is accepted
wherever a dataclass is):

  PageExample     one example: `source_tokens`, `target_tokens`, `reference`,
                  `hypothesis`, `maps`, and `image` for an image source.
  SourceImage     an image source: `grid_shape (rows, cols)` and an optional
                  base64 PNG; the example's `source_tokens` are then the
                  labels of the grid cells, row-major (rows * cols of them).
  AttentionMap    one map: `name` ('decoder/layer_1/cross_attention'),
                  `layer`, `kind` (one of `KINDS`), `head` (an int or 'mean'),
                  `query_labels`, `key_labels` and `weights [queries, keys]`.

The page: choose the example, the map (by name, with its kind and layer) and
the head; the map is drawn on a <canvas> with the query labels down the left
and the key labels along the top; hovering a cell writes its query token, key
token and weight into `#hover-info` (and a tooltip). For a 'spatial' map of an
example with an image, hovering a target token (`#query-tokens`) or a row of
the map shows that token's weights over the image grid (`#grid-canvas`, laid
over the image when there is one). Scores in `summary` are a table at the top.

Weights are stored quantised, not as decimal text (a 512 x 512 map would be
about 3 MB of JSON numbers): each query row is mapped affinely from its
finite [min, max] onto the integers 0..65534 and stored as little-endian
uint16, base64 encoded, with the row's min and max (7 significant digits).
The absolute error of a weight is at most (row max - row min) / 131068 plus
float32 rounding of the row's bounds; the row's min (0 for a row with masked
keys) is exact. The integer 65535 marks a weight that is not finite (NaN or
+-inf); the page shows such a cell in magenta and says 'not finite'. A
512 x 512 map costs 700 KB (2 bytes a weight, 4/3 for base64). The page
shows a weight with 4 significant digits, fewer where the row's quantisation
step would make the last ones noise (a weight of 1e-5 in a row whose max is
0.3 reads '1e-5', not '1.340e-5').

Limits: a map of more than `max_map_cells` weights (default `MAX_MAP_CELLS`,
a 1024 x 1024 map) is not embedded, and maps that would take the page's data
past `max_page_bytes` (default `MAX_PAGE_BYTES`, 64 MiB) are not embedded
either. Nothing is dropped in silence: the page lists every map left out,
with its name, head, shape and reason, in `#omitted` at the top and in the
map menu; `write_page` returns them and logs a warning.

Safety of the inline data: every label and text is data, never markup. The
JSON is written with every non-ASCII character as a \\u escape and '<', '>'
and '&' as \\u003c, \\u003e, \\u0026, so no string can close the <script>
element or open a comment inside it; the page reads it with JSON.parse and
writes text with `textContent` only. The title and the summary are HTML
escaped. The whole file is ASCII.
"""

import base64
import binascii
import dataclasses
import functools
import html
import json
import math
import os
import pathlib
import re
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from absl import logging

from attnx.interpret import html_page_template

KINDS = ("encoder-self", "decoder-self", "cross", "multi-step", "spatial", "global", "rollout")
MAX_MAP_CELLS = 1024 * 1024
MAX_PAGE_BYTES = 64 * 1024 * 1024
FORMAT = "attnx-attention-page/1"

# Quantisation: 0..LEVELS for finite weights, NOT_FINITE for NaN and +-inf.
LEVELS = 65534
NOT_FINITE = 65535

Head = int | Literal["mean"]


@dataclasses.dataclass(frozen=True)
class SourceImage:
    """The image of an image source, seen by the model as a grid of cells.

    Attributes:
      grid_shape: (rows, cols) of the feature grid that spatial maps attend over.
      png_base64: the image as a base64-encoded PNG, or None (the page then
        draws the grid alone).
    """

    grid_shape: tuple[int, int]
    png_base64: str | None = None


@dataclasses.dataclass(frozen=True)
class AttentionMap:
    """One attention map of one example: weights of `queries` over `keys`.

    Attributes:
      name: where the map comes from, e.g. 'decoder/layer_1/cross_attention'.
      layer: the layer's index.
      kind: one of `KINDS`.
      head: the head's index, or 'mean' for the mean over heads.
      query_labels: one label per query (row).
      key_labels: one label per key (column).
      weights: `[queries, keys]` floats.
    """

    name: str
    layer: int
    kind: str
    head: Head
    query_labels: Sequence[str]
    key_labels: Sequence[str]
    weights: Any  # array-like [queries, keys]


@dataclasses.dataclass(frozen=True)
class PageExample:
    """One example and its attention maps.

    Attributes:
      source_tokens: the source's tokens; for an image source, the labels of
        its grid cells, row-major.
      target_tokens: the target's tokens.
      reference: the reference text.
      hypothesis: the model's output text.
      maps: the example's attention maps; (name, head) pairs are unique.
      image: the image of an image source, else None.
    """

    source_tokens: Sequence[str]
    target_tokens: Sequence[str]
    reference: str
    hypothesis: str
    maps: Sequence[AttentionMap]
    image: SourceImage | None = None


@dataclasses.dataclass(frozen=True)
class OmittedMap:
    """A map that the page names but does not embed, and why."""

    example: int
    name: str
    head: Head
    shape: tuple[int, int]
    reason: str


@dataclasses.dataclass(frozen=True)
class WrittenPage:
    """What `write_page` wrote: the file, its size and the maps left out."""

    path: pathlib.Path
    size_bytes: int
    omitted: list[OmittedMap]


def encode_weights(weights: Any) -> dict[str, Any]:
    """Quantises `weights [queries, keys]` row by row to uint16 (see the module doc).

    Returns:
      {'shape': [q, k], 'lo': [...], 'hi': [...], 'data': base64 of uint16 LE}.
    """
    w = np.asarray(weights, np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [queries, keys], got shape {w.shape}")
    finite = np.isfinite(w)
    # Rows with no finite weight get bounds 0, 0; their cells are all NOT_FINITE.
    lo = np.where(finite, w, np.inf).min(axis=1, initial=np.inf)
    hi = np.where(finite, w, -np.inf).max(axis=1, initial=-np.inf)
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = 0.0, 0.0
    # Round the bounds first and quantise against the rounded ones, so that
    # the page, which only has the rounded bounds, decodes the same values.
    lo = np.array([_round7(x) for x in lo])
    hi = np.array([_round7(x) for x in hi])
    span = (hi - lo)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scaled = np.where(span > 0, (w - lo[:, None]) / span * LEVELS, 0.0)
    q = np.clip(np.rint(np.nan_to_num(scaled)), 0, LEVELS).astype("<u2")
    q[~finite] = NOT_FINITE
    return {
        "shape": list(w.shape),
        "lo": lo.tolist(),
        "hi": hi.tolist(),
        "data": base64.b64encode(q.tobytes()).decode("ascii"),
    }


def decode_weights(entry: Mapping[str, Any]) -> np.ndarray:
    """The weights of an `encode_weights` entry, as the page computes them (NaN if not finite)."""
    rows, cols = entry["shape"]
    q = np.frombuffer(base64.b64decode(entry["data"]), "<u2").reshape(rows, cols)
    lo = np.asarray(entry["lo"], np.float64)[:, None]
    step = (np.asarray(entry["hi"], np.float64)[:, None] - lo) / LEVELS
    return np.where(q == NOT_FINITE, np.nan, lo + q * step)


def embed_json(value: Any) -> str:
    """`value` as JSON that is safe inside <script>: ASCII, and no '<', '>' or '&'."""
    text = json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def read_page_data(path: str | os.PathLike) -> dict[str, Any]:
    """The data embedded in a page written by `write_page` (for tests and tools)."""
    text = pathlib.Path(path).read_text(encoding="ascii")
    match = re.search(r'<script type="application/json" id="attnx-data">(.*?)</script>', text, re.S)
    if match is None:
        raise ValueError(f"{path} has no attnx data")
    return json.loads(match.group(1))


def write_page(
    path: str | os.PathLike,
    examples: Sequence[PageExample | Mapping[str, Any]],
    *,
    title: str,
    summary: Mapping[str, Any] | None = None,
    max_map_cells: int = MAX_MAP_CELLS,
    max_page_bytes: int = MAX_PAGE_BYTES,
) -> WrittenPage:
    """Writes the self-contained page that browses `examples`' attention maps.

    Args:
      path: the file to write (its folder is created); written whole or not at all.
      examples: `PageExample`s (or dicts with the same keys; maps likewise).
      title: the page's title.
      summary: scores shown as a table at the top, e.g. {'pointing accuracy': 0.93}.
      max_map_cells: a map with more weights than this is not embedded.
      max_page_bytes: maps past this much embedded data are not embedded.

    Returns:
      The path, the file's size and the maps that were left out (also listed
      on the page and logged).

    Raises:
      ValueError: an example or map is malformed (the message names it).
    """
    examples = [_as_example(e, i) for i, e in enumerate(examples)]
    data, omitted = _page_data(examples, max_map_cells, max_page_bytes)
    for item in omitted:
        logging.warning(
            "index.html: example %d map %s head %s not embedded: %s",
            item.example,
            item.name,
            item.head,
            item.reason,
        )
    document = _document(title, summary or {}, omitted, embed_json(data))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A reader never sees half a page: write beside it, then rename over it.
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as f:
        f.write(document)
    # NamedTemporaryFile makes the file private (0600); a page is as readable as any output.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)
    os.replace(f.name, path)
    return WrittenPage(path=path, size_bytes=len(document), omitted=omitted)


# ---------------------------------------------------------------- validation


def _as_example(value: PageExample | Mapping[str, Any], index: int) -> PageExample:
    if isinstance(value, Mapping):
        value = PageExample(**value)
    image = value.image
    if isinstance(image, Mapping):
        image = SourceImage(**image)
    maps = [m if isinstance(m, AttentionMap) else AttentionMap(**m) for m in value.maps]
    example = dataclasses.replace(
        value,
        source_tokens=_labels(value.source_tokens, f"example {index} source_tokens"),
        target_tokens=_labels(value.target_tokens, f"example {index} target_tokens"),
        reference=str(value.reference),
        hypothesis=str(value.hypothesis),
        maps=maps,
        image=image,
    )
    if image is not None:
        _check_image(image, len(example.source_tokens), index)
    seen = set()
    for m in maps:
        where = f"example {index} map {m.name!r} head {m.head!r}"
        _check_map(m, where)
        if (m.name, m.head) in seen:
            raise ValueError(f"{where}: the example has two maps of this name and head")
        seen.add((m.name, m.head))
    return example


def _labels(labels: Sequence[str], where: str) -> list[str]:
    if isinstance(labels, str):
        raise ValueError(f"{where}: a list of tokens, not one string")
    return [str(label) for label in labels]


def _check_image(image: SourceImage, num_cells: int, index: int) -> None:
    rows, cols = image.grid_shape
    if rows * cols != num_cells:
        raise ValueError(
            f"example {index}: grid {rows} x {cols} has {rows * cols} cells but the "
            f"source has {num_cells} cell labels"
        )
    if image.png_base64 is not None:
        try:
            png = base64.b64decode(image.png_base64, validate=True)
        except (binascii.Error, ValueError, TypeError) as error:
            raise ValueError(f"example {index}: png_base64 is not base64: {error}") from None
        if not png.startswith(b"\x89PNG\r\n\x1a\n"):
            raise ValueError(f"example {index}: png_base64 is not a PNG image")


def _check_map(m: AttentionMap, where: str) -> None:
    if m.kind not in KINDS:
        raise ValueError(f"{where}: kind {m.kind!r} is none of {', '.join(KINDS)}")
    index = isinstance(m.head, int | np.integer) and not isinstance(m.head, bool)
    if not (m.head == "mean" or (index and m.head >= 0)):
        raise ValueError(f"{where}: head must be an index >= 0 or 'mean'")
    shape = np.shape(m.weights)
    expected = (len(m.query_labels), len(m.key_labels))
    if shape != expected:
        raise ValueError(
            f"{where}: weights have shape {shape} but there are {expected[0]} query "
            f"labels and {expected[1]} key labels"
        )


# ---------------------------------------------------------------- page data


def _page_data(
    examples: list[PageExample], max_map_cells: int, max_page_bytes: int
) -> tuple[dict[str, Any], list[OmittedMap]]:
    omitted, spent = [], 0
    records = []
    for index, example in enumerate(examples):
        # Maps share label lists (most cross maps have the same source and
        # target); store each distinct list once and refer to it by index.
        label_sets: dict[tuple[str, ...], int] = {}

        def label_set(labels: Sequence[str], sets=label_sets) -> int:
            return sets.setdefault(tuple(str(x) for x in labels), len(sets))

        maps = []
        for m in example.maps:
            head = m.head if m.head == "mean" else int(m.head)
            shape = tuple(int(n) for n in np.shape(m.weights))
            entry = {
                "name": m.name,
                "layer": int(m.layer),
                "kind": m.kind,
                "head": head,
                "q": label_set(m.query_labels),
                "k": label_set(m.key_labels),
                "shape": list(shape),
            }
            reason = None
            if shape[0] * shape[1] > max_map_cells:
                reason = (
                    f"{shape[0]} x {shape[1]} = {shape[0] * shape[1]:,} weights, over the "
                    f"limit of {max_map_cells:,} weights per map"
                )
            else:
                encoded = encode_weights(m.weights)
                size = len(encoded["data"]) + 24 * shape[0]
                if spent + size > max_page_bytes:
                    reason = (
                        f"its {_size(size)} would take the page's data past its limit "
                        f"of {_size(max_page_bytes)}"
                    )
                else:
                    spent += size
                    entry.update(encoded)
            if reason is not None:
                entry["omitted"] = reason
                omitted.append(OmittedMap(index, m.name, head, shape, reason))
            maps.append(entry)
        image = None
        if example.image is not None:
            rows, cols = example.image.grid_shape
            image = {"grid": [int(rows), int(cols)], "png": example.image.png_base64}
        records.append(
            {
                "source": list(example.source_tokens),
                "target": list(example.target_tokens),
                "reference": example.reference,
                "hypothesis": example.hypothesis,
                "image": image,
                "labels": [list(labels) for labels in label_sets],
                "maps": maps,
            }
        )
    data = {
        "format": FORMAT,
        "levels": LEVELS,
        "not_finite": NOT_FINITE,
        "colormap": _colormap_hex(),
        "examples": records,
    }
    return data, omitted


def _round7(x: float) -> float:
    """`x` to 7 significant digits (float32's precision), as short JSON text."""
    return float(f"{x:.7g}")


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else f"{n} bytes"


@functools.cache
def _colormap_hex() -> str:
    """Viridis as 256 RGB triples in hex: perceptually even and readable in grey."""
    import matplotlib  # Imported here: only pages need it.

    rgb = matplotlib.colormaps["viridis"](np.linspace(0.0, 1.0, 256))[:, :3]
    return bytes(np.rint(rgb * 255).astype(np.uint8).ravel()).hex()


# ---------------------------------------------------------------- document


def _document(
    title: str, summary: Mapping[str, Any], omitted: list[OmittedMap], data_json: str
) -> bytes:
    parts = {
        "TITLE": html.escape(title),
        "SUMMARY": _summary_html(summary),
        "OMITTED": _omitted_html(omitted),
        "CSS": html_page_template.CSS,
        "JS": html_page_template.JS,
        "DATA": data_json,
    }
    # One pass: text put in (a title, a map's name) is never read as a placeholder.
    page = re.sub(r"%([A-Z]+)%", lambda match: parts[match.group(1)], html_page_template.HTML)
    # Text outside <script> may hold any character: as character references
    # the file is ASCII and reads the same under any encoding.
    return page.encode("ascii", "xmlcharrefreplace")


def _summary_html(summary: Mapping[str, Any]) -> str:
    if not summary:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_score(value))}</td></tr>"
        for key, value in summary.items()
    )
    return f'<table id="summary"><tbody>{rows}</tbody></table>'


def _score(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}" if math.isfinite(value) else str(float(value))
    return str(value)


def _omitted_html(omitted: list[OmittedMap]) -> str:
    if not omitted:
        return ""
    items = "".join(
        f"<li>example {m.example}: <code>{html.escape(m.name)}</code>, head "
        f"{html.escape(str(m.head))} ({m.shape[0]} x {m.shape[1]}): {html.escape(m.reason)}</li>"
        for m in omitted
    )
    count = f"{len(omitted)} map{'s' if len(omitted) > 1 else ''}"
    return (
        f'<div id="omitted" class="warning"><p>{count} not embedded in this page '
        f"(too big):</p><ul>{items}</ul></div>"
    )
