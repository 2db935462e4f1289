"""interpret_views.hypothesis_boxes: which gold box each panel shows; a page example's labels."""

import numpy as np

from attnx.interpret.example_views import example_maps
from attnx.training.evaluate import token_labels_with_eos
from attnx.training.interpret_views import hypothesis_boxes

GOLD = [[0, 0, 10, 10], [0, 12, 10, 22], [0, 24, 10, 34]]


def test_a_right_hypothesis_gets_every_box_and_none_for_eos():
    assert hypothesis_boxes(GOLD, ["3", "0", "7", "</s>"], "307") == [*GOLD, None]


def test_a_changed_digit_gets_no_box_and_the_others_keep_theirs():
    assert hypothesis_boxes(GOLD, ["3", "1", "7", "</s>"], "307") == [GOLD[0], None, GOLD[2], None]


def test_a_longer_or_shorter_hypothesis_never_reads_past_the_gold():
    # The run that found this crashed: 3 labels ('1', '2', '</s>') against 2 boxes.
    assert hypothesis_boxes(GOLD[:2], ["1", "2", "</s>"], "12") == [GOLD[0], GOLD[1], None]
    longer = hypothesis_boxes(GOLD[:2], ["1", "2", "5", "</s>"], "12")
    assert longer == [GOLD[0], GOLD[1], None, None]
    assert hypothesis_boxes(GOLD, ["3", "</s>"], "307") == [GOLD[0], None]


class _Characters:
    """Token ids 4.. are the letters a.. (0 pad, 1 bos, 2 eos, 3 unk)."""

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 4) for i in ids)


def test_a_hypothesis_cut_at_the_length_limit_has_no_eos_label():
    # The run that found this: an untrained numbers_convs2s:tiny filled all 72
    # positions without eos; '</s>' made 73 labels against a 72-row map.
    ended, cut = np.array([4, 5, 2, 0]), np.array([4, 5, 6])
    assert token_labels_with_eos(_Characters(), ended) == ["a", "b", "</s>"]
    assert token_labels_with_eos(_Characters(), cut) == ["a", "b", "c"]
    source = token_labels_with_eos(_Characters(), np.array([4, 2]))
    weights = {"decoder/layer_0/attention": np.full((3, 2), 0.5)}
    [mean] = example_maps(weights, source, token_labels_with_eos(_Characters(), cut))
    assert mean.query_labels == ["a", "b", "c"] and mean.key_labels == ["a", "</s>"]
