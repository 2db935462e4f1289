"""Tests of `prepare` / `load_source`: names, errors, mocked TFDS datasets, determinism,
and TFDS datasets whose builder needs TensorFlow (coco_captions), prepared elsewhere."""

import importlib.util
import io
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from attnx.data import pipeline, tasks
from attnx.data import prepare as prepare_lib

# The fallback for builders that need TensorFlow is only taken without it.
TENSORFLOW_INSTALLED = importlib.util.find_spec("tensorflow") is not None
needs_no_tensorflow = pytest.mark.skipif(TENSORFLOW_INSTALLED, reason="TensorFlow is installed")


@pytest.mark.parametrize(
    "name, split, message",
    [
        ("datez", "train", "Unknown dataset 'datez'.*'dates'"),
        ("number_words/en_xx", "train", "Unknown config 'en_xx'.*'en_de', 'en_fr', 'digits_en'"),
        ("dates", "tran", "Unknown split 'tran'.*'train', 'validation', 'test'"),
        ("dates", "train+tset[:10]", "Unknown split 'tset'"),
        ("digit_captions/big", "train", "Unknown config 'big'.*'default'"),
        ("wmt14_translate/de-xx", "train", "Unknown config 'de-xx'.*'de-en'"),
        ("mnist/foo", "train", "Unknown config 'foo'.*no configs"),
        ("not a name", "train", "'not a name' is not of the form"),
    ],
)
def test_bad_names_are_named_before_any_work(tmp_path, name, split, message):
    with pytest.raises(ValueError, match=message):
        prepare_lib.load_source(name, split, data_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing was generated or downloaded


def test_bad_name_in_prepare(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset 'number_word'.*'number_words'"):
        prepare_lib.prepare("number_word/en_de", data_dir=str(tmp_path))


def test_bundled_builders_are_registered():
    assert set(prepare_lib.BUNDLED_BUILDERS) == {"dates", "number_words", "digit_captions"}
    for name, builder_cls in prepare_lib.BUNDLED_BUILDERS.items():
        assert tfds.builder_cls(name) is builder_cls
        assert str(builder_cls.VERSION) == "1.0.0" and "1.0.0" in builder_cls.RELEASE_NOTES


@pytest.mark.parametrize("name", ["wmt14_translate/de-en", "wmt14_translate/fr-en"])
def test_tfds_datasets_go_through_the_same_path(tmp_path, name):
    with tfds.testing.mock_data(num_examples=7):
        source = prepare_lib.load_source(name, "train", data_dir=str(tmp_path))
        assert len(source) == 7
        record = source[3]
    language = name.split("/")[1].split("-")[0]
    assert set(record) == {language, "en"}


_PREPARE_SMALL = textwrap.dedent(
    """
    import sys
    from attnx.data import dates, digit_captions, number_words

    data_dir = sys.argv[1]
    builders = [
        dates.Dates(config=dates.DatesConfig(
            name="tiny", num_train=300, num_validation=50, num_test=50), data_dir=data_dir),
        number_words.NumberWords(config=number_words.NumberWordsConfig(
            name="tiny", num_train=300, num_validation=50, num_test=50), data_dir=data_dir),
        digit_captions.DigitCaptions(config=digit_captions.DigitCaptionsConfig(
            name="tiny", num_train=100, num_validation=20, num_test=20), data_dir=data_dir),
    ]
    for builder in builders:
        builder.download_and_prepare(file_format="array_record")
    """
)


def _read_all(data_dir: str) -> dict:
    records = {}
    for name in ("dates/tiny", "number_words/tiny", "digit_captions/tiny"):
        dataset, config = name.split("/")
        builder_cls = prepare_lib.BUNDLED_BUILDERS[dataset]
        builder = builder_cls(config=_tiny_config(builder_cls), data_dir=data_dir)
        for split in ("train", "validation", "test"):
            source = builder.as_data_source(split=split)
            records[name, split] = source.__getitems__(list(range(len(source))))
    return records


def _tiny_config(builder_cls):
    config_cls = type(builder_cls.BUILDER_CONFIGS[0])
    sizes = (100, 20, 20) if builder_cls.name == "digit_captions" else (300, 50, 50)
    return config_cls(name="tiny", num_train=sizes[0], num_validation=sizes[1], num_test=sizes[2])


def test_preparation_does_not_depend_on_the_process(tmp_path):
    """Two processes with different str hash seeds write the same examples in the same order."""
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        data_dir = str(tmp_path / hash_seed)
        subprocess.run(
            [sys.executable, "-c", _PREPARE_SMALL, data_dir],
            env=env,
            check=True,
            capture_output=True,
        )
    first, second = _read_all(str(tmp_path / "1")), _read_all(str(tmp_path / "2"))
    assert first.keys() == second.keys()
    for key, records in first.items():
        assert len(records) == len(second[key]) > 0
        for one, two in zip(records, second[key], strict=True):
            assert one.keys() == two.keys()
            for feature in one:
                np.testing.assert_array_equal(one[feature], two[feature])


# Split sizes of the stand-in for coco_captions (TFDS's splits: Karpathy and Li's).
COCO_SPLITS = {"train": 6, "val": 3, "test": 2, "restval": 1}


def coco_caption(split: str, index: int, caption: int) -> str:
    return f"{split} picture {index} caption {caption}"


def coco_gray_level(split: str, index: int) -> int:
    """Each image is one gray level, which JPEG keeps exactly: the test can recognise it."""
    return 10 * list(COCO_SPLITS).index(split) + 20 * index + 5


class CocoCaptionsStandIn(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """What `tfds build coco_captions` writes, in miniature and without TensorFlow.

    Same name, config ('2014'), version (1.1.0), splits and feature spec as
    TFDS's CocoCaptions (tensorflow_datasets/object_detection/coco.py and
    coco_captions.py), so the files land in <data_dir>/coco_captions/2014/1.1.0
    exactly as a copy of a real preparation would.
    """

    name = "coco_captions"
    # No directory of builder code (with a checksums file) to find: the test
    # module is not in a package, and TFDS's search for one fails here.
    code_path = None
    VERSION = tfds.core.Version("1.1.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014")]

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "image/filename": tfds.features.Text(),
                "image/id": np.int64,
                "objects": tfds.features.Sequence(
                    {
                        "id": np.int64,
                        "area": np.int64,
                        "bbox": tfds.features.BBoxFeature(),
                        "label": tfds.features.ClassLabel(num_classes=80),
                        "is_crowd": np.bool_,
                    }
                ),
                "captions": tfds.features.Sequence({"text": np.str_, "id": np.int64}),
            }
        )
        return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split, n) for split, n in COCO_SPLITS.items()}

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            # Encoding an array as JPEG would need TensorFlow; TFDS stores encoded bytes as is.
            pixels = np.full((12 + index, 9, 3), coco_gray_level(split, index), np.uint8)
            jpeg = io.BytesIO()
            Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
            jpeg.seek(0)
            yield (
                index,
                {
                    "image": jpeg,
                    "image/filename": f"COCO_{split}_{index:04d}.jpg",
                    "image/id": 1000 + index,
                    "objects": {
                        "id": [index],
                        "area": [20],
                        "bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)],
                        "label": [index % 80],
                        "is_crowd": [False],
                    },
                    # 1 to 3 captions per image, as COCO has several.
                    "captions": [
                        {"text": coco_caption(split, index, c), "id": 10 * index + c}
                        for c in range(1 + index % 3)
                    ],
                },
            )


class OlderCocoCaptionsStandIn(CocoCaptionsStandIn, skip_registration=True):
    """An older version, to test which of several prepared versions is read."""

    name = "coco_captions"  # TFDS names every subclass after itself otherwise.
    VERSION = tfds.core.Version("1.0.0")


def write_prepared_coco_captions(data_dir, builder_cls=CocoCaptionsStandIn) -> str:
    """Writes the stand-in into `data_dir`; returns its version directory."""
    builder = builder_cls(config="2014", data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return str(builder.data_dir)


@pytest.fixture(scope="module")
def coco_data_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    assert write_prepared_coco_captions(data_dir) == str(data_dir / "coco_captions/2014/1.1.0")
    return str(data_dir)


@needs_no_tensorflow
def test_tfds_builder_of_coco_captions_needs_tensorflow(tmp_path):
    """The reason for the fallback: TFDS's own builder cannot even be made."""
    with pytest.raises(ImportError) as error:
        tfds.builder("coco_captions", data_dir=str(tmp_path))
    assert prepare_lib._needs_tensorflow(error.value)
    assert not prepare_lib._needs_tensorflow(ModuleNotFoundError("x", name="tensorflow_text"))


@needs_no_tensorflow
@pytest.mark.parametrize(
    "name", ["coco_captions", "coco_captions/2014", "coco_captions:1.1.0", "coco_captions:1.*.*"]
)
def test_coco_captions_prepared_elsewhere_is_read_without_tensorflow(coco_data_dir, name):
    source = prepare_lib.load_source(name, "train", data_dir=coco_data_dir)
    assert len(source) == COCO_SPLITS["train"]
    records = [source[i] for i in range(len(source))]
    assert sorted(int(r["image/id"]) for r in records) == [1000 + i for i in range(6)]
    for record in records:
        index = int(record["image/id"]) - 1000
        assert set(record) == {"image", "image/filename", "image/id", "objects", "captions"}
        assert record["image"].shape == (12 + index, 9, 3) and record["image"].dtype == np.uint8
        np.testing.assert_allclose(record["image"], coco_gray_level("train", index), atol=1)
        expected = [coco_caption("train", index, c) for c in range(1 + index % 3)]
        assert [t.decode() for t in record["captions"]["text"]] == expected
        np.testing.assert_allclose(record["objects"]["bbox"], [[0.1, 0.2, 0.5, 0.6]], rtol=1e-6)


@needs_no_tensorflow
def test_coco_captions_splits_and_versions_are_checked(coco_data_dir):
    for split, size in COCO_SPLITS.items():
        assert len(prepare_lib.load_source("coco_captions", split, coco_data_dir)) == size
    with pytest.raises(ValueError, match="Unknown split 'validation'.*'train', 'val'"):
        prepare_lib.load_source("coco_captions", "validation", coco_data_dir)
    # TFDS's builder class knows its versions, before needing TensorFlow.
    with pytest.raises(AssertionError, match="coco_captions cannot be loaded at version 2.0.0"):
        prepare_lib.load_source("coco_captions:2.0.0", "train", coco_data_dir)


@needs_no_tensorflow
def test_coco_captions_not_prepared_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        prepare_lib.load_source("coco_captions", "train", data_dir=str(tmp_path))
    message = str(error.value)
    assert "'coco_captions' is not prepared" in message
    assert "tfds build coco_captions/2014 --file_format=array_record" in message
    assert f"to {tmp_path / 'coco_captions'}" in message
    assert not any(tmp_path.iterdir())


@needs_no_tensorflow
def test_newest_complete_version_is_read(tmp_path):
    config_dir = tmp_path / "coco_captions" / "2014"
    write_prepared_coco_captions(tmp_path, OlderCocoCaptionsStandIn)
    # An unfinished TFDS write (no dataset_info.json) is not a prepared version.
    (config_dir / "1.2.0").mkdir(parents=True)
    only_old = prepare_lib.prepare("coco_captions", data_dir=str(tmp_path))
    assert (only_old.data_dir, str(only_old.version)) == (str(config_dir / "1.0.0"), "1.0.0")
    with pytest.raises(FileNotFoundError, match="coco_captions/2014/1.1.0/dataset_info.json"):
        prepare_lib.prepare("coco_captions:1.1.0", data_dir=str(tmp_path))
    write_prepared_coco_captions(tmp_path)
    newest = prepare_lib.prepare("coco_captions", data_dir=str(tmp_path))
    assert (newest.data_dir, str(newest.version)) == (str(config_dir / "1.1.0"), "1.1.0")
    assert str(prepare_lib.prepare("coco_captions:1.0.*", str(tmp_path)).version) == "1.0.0"


@needs_no_tensorflow
def test_coco_captions_end_to_end_through_the_captioning_pipeline(coco_data_dir, tmp_path):
    """Name -> prepared files -> task -> tokenizer -> evaluation and training batches."""
    task = tasks.get_task("coco_captions", caption_choice="random")
    train = tasks.open_source("coco_captions", "train", coco_data_dir)
    tokenizer = pipeline.build_or_load_task_tokenizer("char", str(tmp_path), task, train)
    options = dict(max_target_length=40, image_size=(8, 8), extra_fields={"image/id": ()})

    # Evaluation: each image once, with one of its captions (drawn at random).
    evaluation = pipeline.make_pipeline(
        train,
        task,
        tokenizer,
        batch_size=4,
        num_epochs=1,
        shuffle=False,
        process_index=0,
        process_count=1,
        **options,
    )
    seen = []
    for batch in evaluation:
        assert batch["image"].shape == (4, 8, 8, 3) and batch["targets"].shape == (4, 40)
        for image, targets, image_id in zip(
            batch["image"], batch["targets"], batch["image/id"], strict=True
        ):
            if image_id < 0:  # a padding row
                assert (targets == 0).all() and (image == 0).all()
                continue
            index = int(image_id) - 1000
            seen.append(index)
            np.testing.assert_allclose(image, coco_gray_level("train", index) / 255, atol=2 / 255)
            captions = [coco_caption("train", index, c) for c in range(1 + index % 3)]
            assert tokenizer.decode(targets) in captions
    assert sorted(seen) == list(range(COCO_SPLITS["train"]))

    # Training: global arrays on the 8-device mesh; over 13 epochs every caption is drawn.
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
    training = pipeline.make_pipeline(
        train,
        task,
        tokenizer,
        batch_size=8,
        seed=1,
        process_index=0,
        process_count=1,
        sharding=sharding,
        **options,
    )
    drawn = set()
    for _ in range(10):
        batch = next(training)
        assert isinstance(batch["image"], jax.Array) and batch["image"].sharding == sharding
        for targets, image_id in zip(
            np.asarray(batch["targets"]), np.asarray(batch["image/id"]), strict=True
        ):
            drawn.add((int(image_id) - 1000, tokenizer.decode(targets)))
    every_caption = {
        (i, coco_caption("train", i, c))
        for i in range(COCO_SPLITS["train"])
        for c in range(1 + i % 3)
    }
    assert drawn == every_caption


class NeedsTensorflowToGenerate(tfds.core.GeneratorBasedBuilder):
    """A registered builder whose object can be made but whose generation imports TensorFlow."""

    code_path = None  # as in CocoCaptionsStandIn
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"x": np.int64})
        )

    def _split_generators(self, dl_manager):
        import tensorflow  # noqa: F401  (what some TFDS builders do)

        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"x": 0}


@needs_no_tensorflow
def test_generation_that_needs_tensorflow_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="tfds build needs_tensorflow_to_generate "):
        prepare_lib.load_source("needs_tensorflow_to_generate", "train", data_dir=str(tmp_path))
