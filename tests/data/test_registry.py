"""The dataset registry of attnx.data.tasks: look-up, new kinds, your own TFDS builder module."""

import subprocess
import sys
import textwrap

import pytest

from attnx.data import tasks
from attnx.data.kinds import DatasetKind, dataset_name, named


def test_unknown_dataset_names_every_known_kind():
    with pytest.raises(ValueError, match="Unknown dataset 'my_corpus'") as error:
        tasks.task_from_config({"dataset": "my_corpus"})
    message = str(error.value)
    for known in ("'files'", "'dates'", "'number_words/*'", "'digit_captions'"):
        assert known in message
    for known in ("'wmt*_translate/*'", "'coco_captions'", "builder_module", "source_key"):
        assert known in message
    with pytest.raises(ValueError, match="Unknown dataset 'my_corpus'"):
        tasks.check_task_config({"dataset": "my_corpus"})


DATES_SPANS = ("alignment_start", "alignment_end")


@pytest.mark.parametrize(
    "section, expected",
    [
        ({"dataset": "dates"}, tasks.TextPairTask("dates", "source", "target", DATES_SPANS)),
        (
            {"dataset": "dates:1.0.0"},
            tasks.TextPairTask("dates:1.0.0", "source", "target", DATES_SPANS),
        ),
        # Other fields than the ones the gold spans describe: no gold.
        (
            {"dataset": "dates", "source_key": "target", "target_key": "source"},
            tasks.TextPairTask("dates", "target", "source"),
        ),
        (
            {"dataset": "digit_captions"},
            tasks.CaptionTask("digit_captions", "image", "caption", box_key="boxes"),
        ),
        (
            {"dataset": "wmt14_translate/de-en", "target_key": "en"},
            tasks.TextPairTask("wmt14_translate/de-en", "de", "en"),
        ),
        (
            {"dataset": "coco_captions/2014", "caption_choice": "random"},
            tasks.CaptionTask("coco_captions/2014", "image", "captions/text", "random"),
        ),
        (
            {"dataset": "mnist", "image_key": "image", "caption_key": "label"},
            tasks.CaptionTask("mnist", "image", "label", "single"),
        ),
        (
            {"dataset": "files", "files": {"format": "jsonl"}},
            tasks.TextPairTask("files", "source", "target"),
        ),
    ],
)
def test_each_kind_makes_its_task(section, expected):
    assert tasks.task_from_config(section) == expected


def test_a_new_kind_is_one_entry(monkeypatch):
    records = [{"q": "1 + 1", "a": "2"}, {"q": "2 + 3", "a": "5"}]
    kind = DatasetKind(
        "'sums'",
        named("sums"),
        lambda section: tasks.TextPairTask(dataset_name(section), "q", "a"),
        lambda section, split: records if split == "train" else [],
    )
    monkeypatch.setattr(tasks, "DATASETS", list(tasks.DATASETS))
    tasks.register(kind)
    assert tasks.DATASETS[-1] is not kind  # before the catch-all TFDS kinds
    section = {"dataset": "sums"}
    tasks.check_task_config(section)
    task = tasks.task_from_config(section)
    source = tasks.open_split(section, "train")
    assert [task.target_text(record) for record in source] == ["2", "5"]


def test_importing_tasks_imports_no_bundled_builder():
    code = (
        "import sys\n"
        "from attnx.data import pipeline, tasks\n"
        "from attnx.training import config\n"
        "tasks.check_task_config({'dataset': 'dates'})\n"
        "loaded = {'babel', 'num2words', 'sklearn', 'attnx.data.dates', 'attnx.data.prepare'}\n"
        "print(sorted(loaded & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- builder module

# A user's builder, written as a user would: ArrayRecord files without TensorFlow.
BUILDER = textwrap.dedent(
    '''
    """Questions and answers, a user's own TFDS builder."""
    import tensorflow_datasets as tfds


    class {name}(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {{"question": tfds.features.Text(), "answer": tfds.features.Text()}}
                ),
            )

        def _split_generators(self, dl_manager):
            return {{"train": self._generate_examples(7), "validation": self._generate_examples(3)}}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {{"question": f"{{i}} + {{i}}", "answer": str(2 * i)}}
    '''
)


def builder_section(spec: str, dataset: str, data_dir) -> dict:
    return {
        "dataset": dataset,
        "builder_module": spec,
        "source_key": "question",
        "target_key": "answer",
        "data_dir": str(data_dir),
    }


def test_a_builder_module_given_as_a_file(tmp_path, monkeypatch):
    (tmp_path / "my_sums.py").write_text(BUILDER.format(name="AttnxTestFileSums"))
    monkeypatch.chdir(tmp_path)  # a relative file path, as on the command line
    section = builder_section("my_sums.py", "attnx_test_file_sums", tmp_path / "tfds")
    tasks.check_task_config(section)
    tasks.check_task_config(section)  # imported once: TFDS would refuse a second registration
    task = tasks.task_from_config(section)
    train = tasks.open_split(section, "train")
    assert len(train) == 7 and len(tasks.open_split(section, "validation")) == 3
    pairs = sorted((task.source_text(r), task.target_text(r)) for r in train)
    assert pairs == sorted((f"{i} + {i}", str(2 * i)) for i in range(7))


def test_a_builder_module_given_as_a_module_path(tmp_path, monkeypatch):
    package = tmp_path / "my_project"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sums.py").write_text(BUILDER.format(name="AttnxTestModuleSums"))
    monkeypatch.syspath_prepend(str(tmp_path))
    section = builder_section("my_project.sums", "attnx_test_module_sums", tmp_path / "tfds")
    tasks.check_task_config(section)
    assert len(tasks.open_split(section, "train")) == 7


@pytest.mark.parametrize(
    "spec, dataset, message",
    [
        (
            "no_such_package.my_dataset",
            "x",
            r"config\.task\.builder_module='no_such_package\.my_dataset': no module named "
            r"'no_such_package'",
        ),
        ("missing.py", "x", r"config\.task\.builder_module='missing\.py': no such file"),
        (
            "broken.py",
            "x",
            r"config\.task\.builder_module='broken\.py': importing \S+broken\.py failed: "
            r"RuntimeError: no data here",
        ),
        (
            "empty.py",
            "attnx_test_nothing",
            r"config\.task\.dataset='attnx_test_nothing' is not a TFDS builder of "
            r"config\.task\.builder_module='empty\.py', which defines none",
        ),
    ],
)
def test_a_builder_module_that_fails_is_named(tmp_path, monkeypatch, spec, dataset, message):
    (tmp_path / "broken.py").write_text("raise RuntimeError('no data here')\n")
    (tmp_path / "empty.py").write_text("import tensorflow_datasets as tfds\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        tasks.check_task_config(builder_section(spec, dataset, tmp_path))
    assert "\n" not in str(error.value)


def test_a_builder_module_needs_the_fields():
    with pytest.raises(ValueError, match="give both config.task.source_key and"):
        tasks.task_from_config({"dataset": "mine", "builder_module": "my.module"})


def test_the_bundled_tasks_hand_out_their_gold(dates_data_dir, digits_data_dir):
    # The spans and boxes the interpretability report scores attention against.
    dates = tasks.task_from_config({"dataset": "dates", "data_dir": dates_data_dir})
    record = tasks.open_split({"dataset": "dates", "data_dir": dates_data_dir}, "validation")[0]
    start, end = dates.gold_spans(record)
    source, target = dates.source_text(record), dates.target_text(record)
    assert start.shape == end.shape == (len(target),)
    year = source[start[0] : end[0]]
    assert year.isdigit() and target[:4].endswith(year)  # a 2-digit year ends the 4 digits
    assert start[4] == end[4] == -1  # the first dash comes from no source character

    digits = digits_data_dir
    captions = tasks.task_from_config({"dataset": "digit_captions"})
    record = tasks.open_split({"dataset": "digit_captions", "data_dir": digits}, "validation")[0]
    boxes = captions.gold_boxes(record)
    assert boxes.shape == (len(captions.caption(record)), 4)
    image = captions.image(record)[..., 0]
    for ymin, xmin, ymax, xmax in boxes:
        assert image[ymin:ymax, xmin:xmax].any()  # a digit is drawn inside its box
    assert tasks.task_from_config({"dataset": "number_words/en_de"}).gold_spans({}) is None
