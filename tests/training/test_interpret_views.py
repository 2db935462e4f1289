"""interpret_views.hypothesis_boxes: which gold box each decoded token's panel shows."""

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
