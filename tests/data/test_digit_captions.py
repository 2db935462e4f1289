"""Tests of the `digit_captions` dataset against scikit-learn's digits."""

import numpy as np
import PIL.Image
import pytest
from sklearn.datasets import load_digits

from attnx.data import digit_captions

SPLITS = ("train", "validation", "test")


def prepare_small(data_dir: str) -> dict[str, list[dict]]:
    config = digit_captions.DigitCaptionsConfig(
        name="small", num_train=800, num_validation=150, num_test=300
    )
    builder = digit_captions.DigitCaptions(
        config=config, data_dir=data_dir, file_format="array_record"
    )
    builder.download_and_prepare()
    splits = {}
    for split in SPLITS:
        source = builder.as_data_source(split=split)
        splits[split] = [dict(r) for r in source.__getitems__(list(range(len(source))))]
    return splits


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    return prepare_small(str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="session")
def digits():
    return load_digits()


def test_features_and_sizes(prepared):
    assert [len(prepared[s]) for s in SPLITS] == [800, 150, 300]
    for records in prepared.values():
        for r in records:
            assert r["image"].shape == (64, 64, 1) and r["image"].dtype == np.uint8
            n = len(r["caption"])
            assert 2 <= n <= 5
            assert r["boxes"].shape == (n, 4) and r["boxes"].dtype == np.int32
            assert r["digit_index"].shape == (n,) and r["digit_index"].dtype == np.int32


def test_boxes_are_inside_disjoint_and_in_reading_order(prepared):
    for records in prepared.values():
        for r in records:
            ymin, xmin, ymax, xmax = r["boxes"].T
            assert np.all((0 <= ymin) & (ymin < ymax) & (ymax <= 64))
            assert np.all((0 <= xmin) & (xmin < xmax) & (xmax <= 64))
            assert np.all(ymax - ymin == xmax - xmin)  # squares
            assert np.all((10 <= xmax - xmin) & (xmax - xmin <= 20))
            # Horizontal extents are disjoint, separated by a blank column, left to right.
            assert np.all(xmax[:-1] < xmin[1:])


def test_caption_is_the_digits_left_to_right(prepared, digits):
    for records in prepared.values():
        for r in records:
            order = np.argsort(r["boxes"][:, 1])  # by xmin
            labels = digits.target[r["digit_index"][order]]
            assert r["caption"].decode("ascii") == "".join(str(label) for label in labels)


def test_pixels_outside_boxes_are_blank(prepared):
    for records in prepared.values():
        for r in records:
            inside = np.zeros((64, 64), bool)
            for ymin, xmin, ymax, xmax in r["boxes"]:
                inside[ymin:ymax, xmin:xmax] = True
            image = r["image"][..., 0]
            assert np.all(image[~inside] == 0)
            assert image.max() > 100  # the digits are drawn with the full 0..255 range


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def test_each_box_holds_its_digit(prepared, digits):
    worst = 1.0
    for records in prepared.values():
        for r in records:
            image = r["image"][..., 0].astype(np.float32)
            for (ymin, xmin, ymax, xmax), index in zip(r["boxes"], r["digit_index"], strict=True):
                crop = PIL.Image.fromarray(image[ymin:ymax, xmin:xmax])
                # Area-average back down to 8x8 and compare with the scan itself.
                small = np.asarray(crop.resize((8, 8), PIL.Image.Resampling.BOX))
                worst = min(worst, _correlation(small, digits.images[index]))
    assert worst > 0.85  # 0.92 on the default test split


def test_test_digits_never_seen_in_training(prepared, digits):
    used = {
        split: np.unique(np.concatenate([r["digit_index"] for r in records]))
        for split, records in prepared.items()
    }
    assert not np.intersect1d(used["train"], used["test"]).size
    assert not np.intersect1d(used["train"], used["validation"]).size
    assert not np.intersect1d(used["validation"], used["test"]).size
    # By content too: no test scan has the pixels of any training-pool scan.
    pools = digit_captions.digit_pools(digits.images, seed=0)
    assert set(used["train"]) <= set(pools["train"].tolist())
    train_pixels = {digits.images[i].tobytes() for i in pools["train"]}
    assert not any(digits.images[i].tobytes() in train_pixels for i in used["test"])
    # The pools partition all 1,797 scans.
    sizes = [len(pools[s]) for s in SPLITS]
    assert sum(sizes) == len(digits.images)
    assert len(np.unique(np.concatenate(list(pools.values())))) == len(digits.images)


def test_two_preparations_give_identical_examples(prepared, tmp_path):
    again = prepare_small(str(tmp_path))
    for split in SPLITS:
        for one, two in zip(prepared[split], again[split], strict=True):
            for key in one:
                np.testing.assert_array_equal(one[key], two[key])
