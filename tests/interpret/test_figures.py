"""Report figures: files that decode, the right pixels under the attention, no leaked figures."""

import time
import warnings
import xml.etree.ElementTree as ElementTree

import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest

from attnx.interpret import figures, spatial_figures
from attnx.interpret.figures import _tick_step

# Thai, CJK, Devanagari, Cyrillic: glyphs DejaVu Sans lacks (drawn or written U+XXXX).
WORLD = ["ก", "ร", "日本", "語", "१", "Ж", "</s>"]


def _softmax_rows(rng, shape):
    logits = rng.normal(size=shape) * 2.0
    weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def _check_files(rendered, *, wider_than_tall=None):
    """Both files exist; the PNG decodes to a non-uniform picture; the SVG parses as SVG."""
    assert rendered.png.suffix == ".png" and rendered.svg.suffix == ".svg"
    picture = mpimg.imread(rendered.png)
    assert picture.ndim == 3 and picture.shape[0] > 50 and picture.shape[1] > 50
    assert picture[..., :3].std() > 0.05  # drawn, not a blank canvas
    if wider_than_tall is not None:
        assert (picture.shape[1] > picture.shape[0]) == wider_than_tall, picture.shape
    root = ElementTree.parse(rendered.svg).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(list(root.iter())) > 20
    return picture


@pytest.fixture
def no_missing_glyph_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing


# --------------------------------------------------------------------------
# Heat maps.
# --------------------------------------------------------------------------


def test_head_grid_is_one_row_per_layer_one_column_per_head(tmp_path, no_missing_glyph_warnings):
    rng = np.random.default_rng(0)
    source, target = WORLD, ["2", "0", "Ж", "日", "</s>"]
    maps = {(0, h): _softmax_rows(rng, (6, 9)) for h in range(4)}  # larger: padding cropped
    maps[(0, "mean")] = np.mean([maps[(0, h)] for h in range(4)], axis=0)
    rendered = figures.head_grid(maps, target, source, tmp_path / "grid", title="ก → Ж")
    assert rendered.png == tmp_path / "grid.png" and rendered.svg == tmp_path / "grid.svg"
    one_row = _check_files(rendered, wider_than_tall=True)
    # Two layers instead of one: the figure grows taller, not wider.
    maps.update({(1, head): value for (_, head), value in maps.items()})
    two_rows = figures.head_grid(maps, target, source, tmp_path / "grid2", title="ก → Ж")
    two_rows = mpimg.imread(two_rows.png)
    assert two_rows.shape[0] > one_row.shape[0] * 1.2 and two_rows.shape[1] == one_row.shape[1]


def test_head_grid_of_100_tokens_stays_small_and_fast(tmp_path):
    rng = np.random.default_rng(1)
    tokens = [f"tok{i}" for i in range(100)]
    maps = {
        (layer, head): _softmax_rows(rng, (100, 100)) for layer in range(2) for head in range(3)
    }
    start = time.perf_counter()
    rendered = figures.head_grid(maps, tokens, tokens, tmp_path / "big")
    seconds = time.perf_counter() - start
    picture = _check_files(rendered)
    assert max(picture.shape[:2]) <= 4800
    assert rendered.png.stat().st_size < 2_000_000 and rendered.svg.stat().st_size < 4_000_000
    # ~2 s on a shared, loaded 2-core machine; the bound leaves room for slower ones.
    assert seconds < 12, seconds


def test_tick_labels_are_thinned_beyond_60_tokens_or_when_panels_are_small():
    assert _tick_step(30, 4.5) == 1
    assert _tick_step(60, 4.5) == 1  # 60 labels 5.4 pt apart
    assert _tick_step(100, 4.5) == 2  # at most 60 labels
    assert _tick_step(100, 1.5) == 5  # 1.5 in holds 21 labels 5 pt apart
    assert _tick_step(0, 1.0) == 1


def test_head_grid_refuses_maps_smaller_than_the_labels(tmp_path):
    with pytest.raises(ValueError, match=r"at least 3 x 4"):
        figures.head_grid({(0, 0): np.ones((2, 4))}, "abc", "abcd", tmp_path / "x")
    with pytest.raises(ValueError, match="maps is empty"):
        figures.head_grid({}, "a", "b", tmp_path / "x")


def test_rollout_map(tmp_path, no_missing_glyph_warnings):
    relevance = _softmax_rows(np.random.default_rng(2), (len(WORLD), len(WORLD))) * 0.1
    rendered = figures.rollout_map(relevance, WORLD, WORLD, tmp_path / "roll", title="rollout 日本")
    _check_files(rendered)


# --------------------------------------------------------------------------
# Scores.
# --------------------------------------------------------------------------


def test_erasure_curves_and_aopc(tmp_path, no_missing_glyph_warnings):
    steps = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5]
    curves = {
        "attention": dict(zip(steps, [0.0, 0.1, 0.3, 0.4, 0.5, 0.6], strict=True)),
        "random": dict(zip(steps, [0.0, 0.0, 0.05, 0.1, 0.2, 0.3], strict=True)),
        "gradient x input ก": dict(zip(steps[:4], [0.0, 0.2, 0.3, 0.35], strict=True)),
    }
    _check_files(
        figures.erasure_curves(curves, tmp_path / "erase", title="dates"), wider_than_tall=True
    )
    # ERASER's AOPC (and faithfulness.erasure_scores'): the mean over the bins; 0 % is no bin.
    assert figures.aopc(curves["attention"]) == pytest.approx(1.9 / 5)
    assert figures.aopc({0.1: 0.2, 0.5: 0.4}) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        figures.erasure_curves({"a": {10: 0.5}}, tmp_path / "bad", title="percent, not fraction")


def test_head_table_marks_the_best_cell(tmp_path, no_missing_glyph_warnings):
    scores = np.array([[0.2, 0.9, 0.4], [0.7, np.nan, 0.1]])
    assert figures.best_cell(scores, lower_is_better=False) == (0, 1)
    assert figures.best_cell(scores, lower_is_better=True) == (1, 2)
    assert figures.best_cell(np.full((2, 2), np.nan), lower_is_better=True) is None
    _check_files(figures.head_table_figure(scores, tmp_path / "acc", metric="pointing accuracy"))
    # A dict with a 'mean' head and a missing cell.
    aer = {(0, 0): 0.4, (0, 1): 0.3, (1, 0): 0.5, (1, "mean"): 0.2}
    rendered = figures.head_table_figure(aer, tmp_path / "aer", metric="AER", lower_is_better=True)
    _check_files(rendered)


# --------------------------------------------------------------------------
# Spatial attention.
# --------------------------------------------------------------------------


def test_upsampling_puts_a_cells_mass_on_exactly_its_pixels():
    weights = np.zeros((4, 4))
    weights[1, 2] = 1.0
    density = spatial_figures.upsample_grid(weights, (34, 35), stride=8)  # odd edges: no cell
    assert density.shape == (34, 35)
    assert density.sum() == pytest.approx(1.0)
    assert density[8:16, 16:24] == pytest.approx(np.full((8, 8), 1 / 64))
    assert density.sum() == pytest.approx(density[8:16, 16:24].sum())
    # Non-square strides: cell (r, c) covers [r * 3, r * 3 + 3) x [c * 5, c * 5 + 5).
    rect = spatial_figures.upsample_grid(np.arange(6.0).reshape(2, 3), (6, 15), stride=(3, 5))
    assert rect[3:6, 10:15] == pytest.approx(np.full((3, 5), 5 / 15))
    with pytest.raises(ValueError, match="does not fit"):
        spatial_figures.upsample_grid(weights, (31, 32), stride=8)


@pytest.mark.parametrize("cell", [(0, 0), (2, 5), (7, 7), (3, 0)])
def test_smoothed_heat_keeps_the_mass_and_peaks_inside_the_cell(cell):
    rng = np.random.default_rng(3)
    weights = rng.uniform(0, 0.01, (8, 8))
    weights[cell] = 1.0
    weights /= weights.sum()
    for sigma in (0.0, 4.0, 10.0):  # none, the default for stride 8, the paper's 1.25 strides
        heat = spatial_figures.attention_heat(weights, (64, 64), 8, sigma)
        assert heat.sum() == pytest.approx(1.0)  # mirrored borders lose nothing
        i, j = np.unravel_index(np.argmax(heat), heat.shape)
        assert cell[0] * 8 <= i < cell[0] * 8 + 8 and cell[1] * 8 <= j < cell[1] * 8 + 8, sigma


@pytest.mark.parametrize("gray", [True, False])
def test_brightest_overlay_pixel_lies_in_the_attended_cell(gray):
    image = np.full((64, 64), 0.5) if gray else np.full((64, 64, 3), 128, np.uint8)
    weights = np.full((8, 8), 1e-3)
    weights[5, 2] = 1.0
    heat = spatial_figures.attention_heat(weights / weights.sum(), (64, 64), 8, 4.0)
    picture = spatial_figures.overlay(image, heat)
    assert picture.shape == (64, 64, 3) and 0.0 <= picture.min() and picture.max() <= 1.0
    luminance = picture @ np.array([0.2126, 0.7152, 0.0722])
    i, j = np.unravel_index(np.argmax(luminance), luminance.shape)
    assert 40 <= i < 48 and 16 <= j < 24
    # Far from the cell the image shows through, dimmed by (1 - alpha).
    assert luminance[0, 63] < 0.5 * luminance[i, j]


def test_spatial_overlay_panels(tmp_path, no_missing_glyph_warnings):
    rng = np.random.default_rng(4)
    image = rng.uniform(0, 1, (64, 64))
    tokens = ["3", "ก", "日", "</s>"]
    weights = _softmax_rows(rng, (len(tokens) + 2, 64))  # two padding rows
    boxes = [[0, 0, 16, 16], [8, 20, 30, 40], None, [np.nan] * 4]
    rendered = spatial_figures.spatial_overlay(
        image, weights, tokens, 8, tmp_path / "spatial", boxes=boxes, title="digits 日"
    )
    picture = _check_files(rendered)
    # One row of five square panels.
    assert 3.5 < picture.shape[1] / picture.shape[0] < 6
    assert figures.spatial_overlay is spatial_figures.spatial_overlay
    rgb = (rng.uniform(0, 1, (48, 64, 3)) * 255).astype(np.uint8)
    grid = _softmax_rows(rng, (2, 3, 4))
    _check_files(spatial_figures.spatial_overlay(rgb, grid, "ab", (3, 4), tmp_path / "rgb"))


def test_spatial_overlay_refuses_what_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match=r"float image must lie in \[0, 1\]"):
        spatial_figures.spatial_overlay(
            np.full((8, 8), 2.0), np.ones((1, 4)) / 4, "a", 2, tmp_path / "x"
        )
    with pytest.raises(ValueError, match=r"weights must be \[T, 4\]"):
        spatial_figures.spatial_overlay(np.zeros((8, 8)), np.ones((1, 9)), "a", 2, tmp_path / "x")
    with pytest.raises(ValueError, match="one per token"):
        spatial_figures.spatial_overlay(
            np.zeros((8, 8)), np.ones((2, 4)) / 4, "ab", 2, tmp_path / "x", boxes=[None]
        )


# --------------------------------------------------------------------------
# Every figure: deterministic, closed.
# --------------------------------------------------------------------------


def _draw_all(tmp_path, tag):
    rng = np.random.default_rng(5)
    maps = {(layer, head): _softmax_rows(rng, (5, 7)) for layer in range(2) for head in range(2)}
    return [
        figures.head_grid(maps, "abcde", "ABCDEFG", tmp_path / f"grid{tag}"),
        figures.rollout_map(maps[(0, 0)], "abcde", "ABCDEFG", tmp_path / f"roll{tag}", title="r"),
        figures.erasure_curves({"a": {0.0: 0.0, 0.5: 0.4}}, tmp_path / f"erase{tag}", title="e"),
        figures.head_table_figure(rng.uniform(size=(2, 3)), tmp_path / f"table{tag}", metric="m"),
        figures.spatial_overlay(
            rng.uniform(size=(16, 16)), maps[(0, 0)][:, :4], "ab", 2, tmp_path / f"sp{tag}"
        ),
    ]


def test_figures_are_deterministic_and_closed(tmp_path):
    open_before = plt.get_fignums()
    first, second = _draw_all(tmp_path, "a"), _draw_all(tmp_path, "b")
    assert plt.get_fignums() == open_before
    for a, b in zip(first, second, strict=True):
        assert a.png.read_bytes() == b.png.read_bytes(), a.png
        assert a.svg.read_bytes() == b.svg.read_bytes(), a.svg


def test_a_path_stem_with_a_suffix_or_dots(tmp_path):
    rendered = figures.erasure_curves(
        {"a": {0.0: 0.0, 1.0: 1.0}}, tmp_path / "sub" / "curve.layer3.png", title="t"
    )
    assert rendered.png == tmp_path / "sub" / "curve.layer3.png"
    assert rendered.svg == tmp_path / "sub" / "curve.layer3.svg"
    assert rendered.png.exists() and rendered.svg.exists()
