"""Tests of attnx.data.tasks: dataset names -> fields of the model inputs."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from attnx.data import tasks


def test_bundled_text_tasks_read_source_and_target():
    record = {"source": "3. März 1999".encode(), "target": b"1999-03-03", "locale": b"de"}
    for name in ("dates", "number_words/en_de", "number_words/digits_en"):
        task = tasks.get_task(name)
        assert isinstance(task, tasks.TextPairTask)
        assert task.source_text(record) == "3. März 1999"
        assert task.target_text(record) == "1999-03-03"
        assert task.texts(record) == ["3. März 1999", "1999-03-03"]


@pytest.mark.parametrize(
    "name, keys, expected",
    [
        ("wmt14_translate/de-en", {}, ("en", "de")),
        ("wmt14_translate/fr-en", {}, ("en", "fr")),
        ("wmt_t2t_translate/de-en", {}, ("en", "de")),
        ("wmt14_translate/de-en", {"source_key": "de"}, ("de", "en")),
        ("wmt14_translate/de-en", {"target_key": "en"}, ("de", "en")),
        ("wmt14_translate/fr-en", {"source_key": "fr", "target_key": "en"}, ("fr", "en")),
    ],
)
def test_wmt_direction(name, keys, expected):
    task = tasks.get_task(name, **keys)
    assert (task.source_key, task.target_key) == expected


def test_wmt_language_not_in_pair_is_named():
    with pytest.raises(ValueError, match="source_key='fr'.*'de', 'en'"):
        tasks.get_task("wmt14_translate/de-en", source_key="fr")
    with pytest.raises(ValueError, match="both 'en'"):
        tasks.get_task("wmt14_translate/de-en", source_key="en", target_key="en")


def test_unknown_dataset_is_named():
    with pytest.raises(ValueError, match="'my_corpus'"):
        tasks.get_task("my_corpus")
    task = tasks.get_task("my_corpus", source_key="q", target_key="a")
    assert (task.source_key, task.target_key) == ("q", "a")
    with pytest.raises(ValueError, match="not both"):
        tasks.get_task("my_corpus", source_key="q", image_key="image")


def test_keys_of_the_other_kind_of_task_are_named():
    with pytest.raises(ValueError, match="'dates' is text to text"):
        tasks.get_task("dates", caption_key="caption")
    with pytest.raises(ValueError, match="'number_words/en_de' is text to text"):
        tasks.get_task("number_words/en_de", caption_choice="random")
    with pytest.raises(ValueError, match="'coco_captions/2014' is image to text"):
        tasks.get_task("coco_captions/2014", target_key="text")


def test_missing_field_names_field_and_dataset():
    task = tasks.get_task("my_corpus", source_key="question", target_key="answer")
    with pytest.raises(KeyError, match="'my_corpus'.*'answer'.*available: \\['question'\\]"):
        task.check_record({"question": b"why"})


def test_digit_captions_task():
    image = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64, 1)
    record = {"image": image, "caption": b"4071", "boxes": np.zeros((4, 4), np.int32)}
    task = tasks.get_task("digit_captions")
    task.check_record(record)
    np.testing.assert_array_equal(task.image(record), image)
    assert task.caption(record) == "4071"


def _coco_record(captions):
    # The structure tfds.data_source gives for coco_captions: a Sequence of dicts
    # comes back as a dict of per-caption arrays.
    return {
        "image": np.zeros((5, 7, 3), np.uint8),
        "image/id": 42,
        "captions": {
            "text": np.array([c.encode() for c in captions], dtype=object),
            "id": np.arange(len(captions)),
        },
    }


def test_coco_captions_first_and_random_caption():
    captions = ["a cat on a mat", "a small cat", "the cat sleeps"]
    record = _coco_record(captions)
    first = tasks.get_task("coco_captions")
    first.check_record(record)
    assert first.caption(record) == captions[0]
    assert first.texts(record) == captions
    random = tasks.get_task("coco_captions", caption_choice="random")
    rng = np.random.default_rng(0)
    drawn = {random.caption(record, rng) for _ in range(50)}
    assert drawn == set(captions)
    with pytest.raises(ValueError, match="caption_choice='all'"):
        tasks.get_task("coco_captions", caption_choice="all")


def test_image_field_must_be_an_image():
    task = tasks.get_task("digit_captions")
    with pytest.raises(ValueError, match="'image' has shape \\(64, 64\\)"):
        task.check_record({"image": np.zeros((64, 64), np.uint8), "caption": b"1"})


def test_to_text_accepts_tfds_text_values():
    assert tasks.to_text(b"\xc3\xa9t\xc3\xa9") == "été"
    assert tasks.to_text("été") == "été"
    assert tasks.to_text(np.array(b"abc", dtype=object)) == "abc"
    with pytest.raises(TypeError, match="int"):
        tasks.to_text(3)


def test_sample_texts_spreads_over_the_split():
    source = [{"source": f"s{i}".encode(), "target": f"t{i}".encode()} for i in range(10)]
    task = tasks.get_task("dates")
    assert list(tasks.sample_texts(task, source, 3)) == ["s0", "t0", "s4", "t4", "s9", "t9"]
    assert len(list(tasks.sample_texts(task, source, 100))) == 20


def test_wmt_source_under_mock_data():
    with tfds.testing.mock_data(num_examples=6):
        source = tasks.open_source("wmt14_translate/de-en", "train")
        assert len(source) == 6
        task = tasks.get_task("wmt14_translate/de-en")
        task.check_record(source[0])
        assert isinstance(task.source_text(source[0]), str)
        assert isinstance(task.target_text(source[0]), str)
