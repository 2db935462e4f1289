"""Hard and soft alignment lines against hand-made maps."""

import numpy as np
import pytest

from attnx.interpret import alignment_output

EOS = 2

# Source 'ab' + eos + pad (ids 5, 6, 2, 0); hypothesis 'xyz' + eos + a token after eos.
SOURCES = np.array([[5, 6, EOS, 0]])
SEQUENCES = np.array([[7, 8, 9, EOS, 7]])
ATTENTION = np.array(
    [
        [
            [0.1, 0.7, 0.2, 0.0],  # x: b
            [0.6, 0.1, 0.3, 0.0],  # y: a
            [0.2, 0.1, 0.7, 0.0],  # z: eos is most attended, but not a candidate -> a
            [0.0, 0.0, 1.0, 0.0],  # the eos row: left out
            [0.5, 0.5, 0.0, 0.0],  # after eos: left out
        ]
    ]
)


def test_hard_lines_link_each_real_target_to_its_most_attended_real_source():
    [line] = alignment_output.lines("hard", ATTENTION, SEQUENCES, SOURCES)
    assert line == "0-1 0-2 1-0"


def test_soft_lines_cut_the_eos_row_and_column_and_round_trip():
    [line] = alignment_output.lines("soft", ATTENTION, SEQUENCES, SOURCES)
    assert line == "0.1000,0.7000 0.6000,0.1000 0.2000,0.1000"
    np.testing.assert_allclose(alignment_output.parse_soft(line), ATTENTION[0, :3, :2])


def test_an_image_source_has_every_cell_real():
    attention = np.array([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]])
    sequences = np.array([[7, EOS]])
    [hard] = alignment_output.lines("hard", attention, sequences, None)
    [soft] = alignment_output.lines("soft", attention, sequences, None)
    assert hard == "3-0"
    assert soft == "0.1000,0.2000,0.3000,0.4000"


def test_an_empty_hypothesis_gives_an_empty_line():
    sequences = np.array([[EOS, 0, 0, 0, 0]])
    assert alignment_output.lines("hard", ATTENTION, sequences, SOURCES) == [""]
    assert alignment_output.lines("soft", ATTENTION, sequences, SOURCES) == [""]
    assert alignment_output.parse_soft("").shape == (0, 0)


def test_bad_kinds_and_lines_are_named():
    with pytest.raises(ValueError, match="config.decode.print_alignment='yes'"):
        alignment_output.check_kind("yes")
    with pytest.raises(ValueError, match="kind"):
        alignment_output.lines("both", ATTENTION, SEQUENCES, SOURCES)
    with pytest.raises(ValueError, match="different lengths"):
        alignment_output.parse_soft("0.1,0.2 0.3")
