"""Attention plots: readable labels in any script, the picture and the PNG."""

import warnings

import numpy as np
import pytest

from attnx.interpret.plots import plot_alignment, readable_labels

# Thai, CJK, Devanagari: glyphs that matplotlib's bundled DejaVu Sans lacks.
SOURCE = ["5", " ", "ก", "ร", "ก", "日", "१", "\U0010fffd", "</s>"]
TARGET = ["2", "0", "2", "0", "Ж", "</s>"]


def test_a_character_no_font_has_is_written_as_its_code_point():
    assert readable_labels(["a", "Ж", "\U0010fffd", "x\U0010fffdy", "</s>", 7]) == [
        "a",
        "Ж",
        "U+10FFFD",
        "xU+10FFFDy",
        "</s>",
        "7",
    ]
    for original, shown in zip(SOURCE, readable_labels(SOURCE), strict=True):
        assert shown == original or shown == f"U+{ord(original):04X}"


def test_plot_draws_every_label_without_missing_glyphs(tmp_path):
    weights = np.random.default_rng(0).dirichlet(np.ones(len(SOURCE) + 2), len(TARGET) + 1)
    path = tmp_path / "plots" / "a.png"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        picture = plot_alignment(weights, SOURCE, TARGET, path=str(path), title="2020-Ж")
    missing = [str(w.message) for w in caught if "missing from" in str(w.message)]
    assert not missing, missing
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[-1] == 3
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Not blank: the heat map and labels are drawn.
    assert picture.min() < 64 and picture.max() > 192


def test_weights_must_be_a_matrix():
    with pytest.raises(ValueError, match=r"weights must be \[target, source\]"):
        plot_alignment(np.ones(3), ["a"], ["b"])
