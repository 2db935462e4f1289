"""`config.task.dataset='files'`: the user's TSV, JSONL, parallel text and image-caption files.

Every format reads back exactly; every problem in a file is one `RunError`
line naming the file and the line; every problem in the keys is one
ValueError naming the `config.task` key.
"""

import json
import os
import pathlib

import numpy as np
import PIL.Image
import pytest

from attnx.data import files_kind, tasks
from attnx.errors import RunError

PAIRS = [
    ("3 March 1974", "1974-03-03"),
    ("Sonntag, 2. Januar 2005", "2005-01-02"),
    ("  spaces  kept  ", "ünïcödé ✓"),
]


def write(path: pathlib.Path, content: str | bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def tsv(pairs) -> str:
    return "".join(f"{source}\t{target}\n" for source, target in pairs)


def section(**files) -> dict:
    """A task section as a plain dict (any Mapping works, like config.task)."""
    return {"dataset": "files", "eval_split": "validation", "files": files}


def records(source) -> list[tuple[str, str]]:
    task = tasks.TextPairTask("files", "source", "target")
    return [(task.source_text(record), task.target_text(record)) for record in source]


# --------------------------------------------------------------------------- formats


def test_tsv_reads_back_exactly(tmp_path):
    write(tmp_path / "train.tsv", tsv(PAIRS))
    source = tasks.open_split(section(train=str(tmp_path / "train.tsv")), "train")
    assert len(source) == 3
    assert records(source) == PAIRS
    assert source[1] == {"source": PAIRS[1][0], "target": PAIRS[1][1]}


def test_tsv_header_crlf_bom_and_missing_final_newline(tmp_path):
    content = "\ufeffsource\ttarget\r\n" + tsv(PAIRS[:2]).replace("\n", "\r\n") + "a\tb"
    write(tmp_path / "train.tsv", content)
    source = tasks.open_split(section(train=str(tmp_path / "train.tsv"), header=True), "train")
    assert records(source) == [*PAIRS[:2], ("a", "b")]


def test_a_glob_reads_every_file_in_sorted_order(tmp_path, monkeypatch):
    write(tmp_path / "data" / "part-2.tsv", tsv(PAIRS[2:]))
    write(tmp_path / "data" / "part-1.tsv", tsv(PAIRS[:2]))
    write(tmp_path / "data" / "other.tsv", "x\ty\n")
    monkeypatch.chdir(tmp_path)  # a relative glob is relative to the current directory
    source = tasks.open_split(section(train="data/part-*.tsv"), "train")
    assert records(source) == PAIRS


def test_jsonl_reads_named_and_nested_fields(tmp_path):
    lines = [
        json.dumps({"id": i, "translation": {"en": source, "de": target}}, ensure_ascii=i % 2)
        for i, (source, target) in enumerate(PAIRS)
    ]
    write(tmp_path / "valid.jsonl", "\n".join(lines) + "\n")
    config = section(
        validation=str(tmp_path / "valid.jsonl"),
        format="jsonl",
        source_field="translation/en",
        target_field="translation/de",
    )
    assert records(tasks.open_split(config, "validation")) == PAIRS


def test_text_pairs_read_parallel_files(tmp_path):
    for shard, pairs in (("a", PAIRS[:2]), ("b", PAIRS[2:])):
        write(tmp_path / f"train-{shard}.en", "".join(f"{s}\n" for s, _ in pairs))
        write(tmp_path / f"train-{shard}.de", "".join(f"{t}\n" for _, t in pairs))
    config = section(
        train=str(tmp_path / "train-*"),
        format="text_pairs",
        source_suffix="en",
        target_suffix="de",
    )
    tasks.check_task_config(config)
    assert records(tasks.open_split(config, "train")) == PAIRS


def image_captions(tmp_path, lines, **files) -> list:
    write(tmp_path / "data" / "captions.jsonl", "".join(json.dumps(line) + "\n" for line in lines))
    config = section(
        train=str(tmp_path / "data" / "captions.jsonl"), format="jsonl_images", **files
    )
    return tasks.open_split(config, "train")


def test_jsonl_images_load_when_read(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 8), dtype=np.uint8)
    rgb = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    PIL.Image.fromarray(gray).save(tmp_path / "data" / "gray.png")
    PIL.Image.fromarray(rgb).save(tmp_path / "data" / "rgb.png")
    lines = [
        {"image": "gray.png", "caption": "a gray one"},
        {"image": "rgb.png", "caption": ["first caption", "second caption"]},
    ]
    task = tasks.task_from_config(section(format="jsonl_images"))
    assert isinstance(task, tasks.CaptionTask) and task.caption_choice == "first"

    rgb_source = image_captions(tmp_path, lines, image_channels=3)
    assert len(rgb_source) == 2
    task.check_record(rgb_source[0])
    np.testing.assert_array_equal(task.image(rgb_source[1]), rgb)
    np.testing.assert_array_equal(task.image(rgb_source[0]), np.repeat(gray[..., None], 3, -1))
    assert task.captions(rgb_source[0]) == ["a gray one"]
    assert task.captions(rgb_source[1]) == ["first caption", "second caption"]
    assert task.caption(rgb_source[1]) == "first caption"

    gray_source = image_captions(tmp_path, lines, image_channels=1)
    np.testing.assert_array_equal(task.image(gray_source[0]), gray[..., None])
    expected = np.asarray(PIL.Image.fromarray(rgb).convert("L"))[..., None]
    np.testing.assert_array_equal(task.image(gray_source[1]), expected)


def test_images_are_decoded_only_when_the_image_is_read(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    for name in ("a.png", "b.png"):
        PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / name)
    source = image_captions(
        tmp_path, [{"image": "a.png", "caption": "a"}, {"image": "b.png", "caption": "b"}]
    )
    opened = []
    original = PIL.Image.open
    monkeypatch.setattr(PIL.Image, "open", lambda path: opened.append(path) or original(path))
    task = tasks.task_from_config(section(format="jsonl_images"))
    # Building a vocabulary reads every caption and no image.
    assert list(tasks.sample_texts(task, source, 10)) == ["a", "b"]
    assert opened == []
    task.image(source[1])
    assert opened == [str(tmp_path / "data" / "b.png")]


# --------------------------------------------------------------------------- bad files

# (files to write, config.task.files, split, the message: 'FILE:LINE: ...').
BAD_FILES = {
    "missing column": (
        {"train.tsv": "a\tb\nc d\n"},
        {"train": "train.tsv"},
        r"train\.tsv:2: 1 tab-separated field\(s\), expected 2",
    ),
    "extra column": (
        {"train.tsv": "a\tb\tc\n"},
        {"train": "train.tsv"},
        r"train\.tsv:1: 3 tab-separated field\(s\), expected 2",
    ),
    "empty line": (
        {"train.tsv": "a\tb\n\nc\td\n"},
        {"train": "train.tsv"},
        r"train\.tsv:2: empty line",
    ),
    "blank line": (
        {"train.tsv": "a\tb\nc\td\n \t \n"},
        {"train": "train.tsv"},
        r"train\.tsv:3: empty line",
    ),
    "empty field": (
        {"train.tsv": "a\tb\nc\t\n"},
        {"train": "train.tsv"},
        r"train\.tsv:2: the target \(column 2\) is empty",
    ),
    "invalid UTF-8": (
        {"train.tsv": b"a\tb\nc\xff\td\n"},
        {"train": "train.tsv"},
        r"train\.tsv:2: invalid UTF-8 at byte 2",
    ),
    "empty file": ({"train.tsv": ""}, {"train": "train.tsv"}, r"train\.tsv: the file is empty"),
    "header only": (
        {"train.tsv": "source\ttarget\n"},
        {"train": "train.tsv", "header": True},
        r"train\.tsv: the file holds a header and no pair",
    ),
    "invalid JSON": (
        {"train.jsonl": '{"source": "a", "target": "b"}\n{"source": "a", "target": }\n'},
        {"train": "train.jsonl", "format": "jsonl"},
        r"train\.jsonl:2: invalid JSON: Expecting value at column 27",
    ),
    "missing JSON field": (
        {"train.jsonl": '{"source": "a", "target": "b"}\n{"source": "a", "tgt": "b"}\n'},
        {"train": "train.jsonl", "format": "jsonl"},
        r"train\.jsonl:2: no field 'target' \(config\.task\.files\.target_field\); "
        r"the object has \['source', 'tgt'\]",
    ),
    "JSON not an object": (
        {"train.jsonl": '["a", "b"]\n'},
        {"train": "train.jsonl", "format": "jsonl"},
        r"train\.jsonl:1: expected a JSON object, got an array",
    ),
    "JSON field not a string": (
        {"train.jsonl": '{"source": 7, "target": "b"}\n'},
        {"train": "train.jsonl", "format": "jsonl"},
        r"train\.jsonl:1: field 'source' is a number, expected a string",
    ),
    "empty JSON field": (
        {"train.jsonl": '{"source": "a", "target": ""}\n'},
        {"train": "train.jsonl", "format": "jsonl"},
        r"train\.jsonl:1: field 'target' is empty",
    ),
    "mismatched line counts": (
        {"train.en": "one\ntwo\nthree\n", "train.de": "eins\nzwei\n"},
        {"train": "train", "format": "text_pairs", "source_suffix": "en", "target_suffix": "de"},
        r"train\.en:3: this line has no counterpart in \S*train\.de, which ends after 2 lines",
    ),
    "empty line in a parallel file": (
        {"train.en": "one\ntwo\n", "train.de": "eins\n\n"},
        {"train": "train", "format": "text_pairs", "source_suffix": "en", "target_suffix": "de"},
        r"train\.de:2: empty line",
    ),
    "a glob that matches nothing": (
        {},
        {"train": "shards-*.tsv"},
        r"config\.task\.files\.train='\S*shards-\*\.tsv': no file matches \S*shards-\*\.tsv",
    ),
    "a missing split file": (
        {},
        {"train": "train.tsv"},
        r"config\.task\.files\.train='\S*train\.tsv': no such file \S*train\.tsv",
    ),
    "a split that is not set": (
        {"train.tsv": "a\tb\n"},
        {"train": "train.tsv"},
        r"config\.task\.files\.validation is not set",
    ),
    "a missing parallel file": (
        {"train.en": "one\n"},
        {"train": "train", "format": "text_pairs", "source_suffix": "en", "target_suffix": "de"},
        r"config\.task\.files\.train='\S*train': no such file \S*train\.de \(the target file\)",
    ),
    "a missing image": (
        {"images.jsonl": '{"image": "nope.png", "caption": "a"}\n'},
        {"train": "images.jsonl", "format": "jsonl_images"},
        r"images\.jsonl:1: image 'nope\.png': no such file \S*nope\.png",
    ),
    "an empty caption list": (
        {"images.jsonl": '{"image": "images.jsonl", "caption": []}\n'},
        {"train": "images.jsonl", "format": "jsonl_images"},
        r"images\.jsonl:1: field 'caption' is an empty list",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_FILES))
def test_a_bad_file_is_one_line_naming_file_and_line(tmp_path, problem, monkeypatch):
    contents, files, message = BAD_FILES[problem]
    for name, content in contents.items():
        write(tmp_path / name, content)
    monkeypatch.chdir(tmp_path)
    split = "validation" if "not set" in problem else "train"
    with pytest.raises(RunError, match=message) as error:
        tasks.open_split(section(**files), split)
    assert "\n" not in str(error.value)


def test_an_image_that_does_not_load_names_file_line_and_image(tmp_path):
    (tmp_path / "data").mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / "good.png")
    write(tmp_path / "data" / "bad.png", b"not a png at all")
    lines = [{"image": "good.png", "caption": "a"}, {"image": "bad.png", "caption": "b"}]
    source = image_captions(tmp_path, lines)
    with pytest.raises(
        RunError, match=r"captions\.jsonl:2: image 'bad\.png' \(\S+\) does not load"
    ):
        source[1]["image"]


def test_images_of_another_size_need_image_size(tmp_path):
    (tmp_path / "data").mkdir()
    PIL.Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "data" / "a.png")
    PIL.Image.fromarray(np.zeros((4, 6), np.uint8)).save(tmp_path / "data" / "b.png")
    lines = [{"image": "a.png", "caption": "a"}, {"image": "b.png", "caption": "b"}]
    with pytest.raises(RunError, match=r"captions\.jsonl:2: image 'b\.png' is 4x6 .*image_size"):
        image_captions(tmp_path, lines)[1]["image"]
    # With config.task.image_size the pipeline resizes: any size loads.
    config = section(train=str(tmp_path / "data" / "captions.jsonl"), format="jsonl_images")
    config["image_size"] = (4, 4)
    assert tasks.open_split(config, "train")[1]["image"].shape == (4, 6, 3)


# --------------------------------------------------------------------------- bad keys

# (config.task.files, other config.task keys, the message naming the key).
BAD_KEYS = {
    "format": ({"format": "csv"}, {}, r"config\.task\.files\.format='csv'; choose one of"),
    "suffixes": (
        {"format": "text_pairs", "source_suffix": "en"},
        {},
        r"config\.task\.files\.source_suffix and target_suffix .* got 'en' and None",
    ),
    "header of jsonl": (
        {"format": "jsonl", "header": True},
        {},
        r"config\.task\.files\.header=True applies to format 'tsv', not to .*'jsonl'",
    ),
    "suffix of tsv": (
        {"source_suffix": "en"},
        {},
        r"config\.task\.files\.source_suffix='en' applies to format 'text_pairs'",
    ),
    "channels": (
        {"format": "jsonl_images", "image_channels": 4},
        {},
        r"config\.task\.files\.image_channels=4",
    ),
    "empty field name": (
        {"format": "jsonl", "target_field": ""},
        {},
        r"config\.task\.files\.target_field must name a JSON field",
    ),
    "eval split": ({}, {"eval_split": "dev"}, r"config\.task\.eval_split='dev'"),
    "a TFDS key": (
        {},
        {"source_key": "en"},
        r"config\.task\.source_key='en' .* config\.task\.files\.source_field",
    ),
    "caption_choice of text": (
        {},
        {"caption_choice": "random"},
        r"config\.task\.caption_choice='random' does not apply",
    ),
    "caption_choice of images": (
        {"format": "jsonl_images"},
        {"caption_choice": "single"},
        r"config\.task\.caption_choice='single'; choose one of \['first', 'random'\]",
    ),
    "a builder module": (
        {},
        {"builder_module": "my.builder"},
        r"config\.task\.builder_module='my\.builder' names a TFDS builder",
    ),
    "missing file": ({"validation": "nope.tsv"}, {}, r"config\.task\.files\.validation="),
    "empty glob": ({"test": "nope-*.tsv"}, {}, r"config\.task\.files\.test=.*no file matches"),
}


@pytest.mark.parametrize("problem", list(BAD_KEYS))
def test_check_task_config_names_the_key(tmp_path, problem, monkeypatch):
    files, keys, message = BAD_KEYS[problem]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        tasks.check_task_config({**section(**files), **keys})
    assert "\n" not in str(error.value)


def test_check_task_config_reads_no_data_and_accepts_unset_splits(tmp_path):
    # Unset splits are fine (an experiment file sets none; --mode=summary needs none);
    # set ones must exist. A file full of errors passes: it is not read.
    write(tmp_path / "train.tsv", "no tab here\n\n")
    tasks.check_task_config(section())
    tasks.check_task_config(section(train=str(tmp_path / "train.tsv")))


def test_base_config_defaults_are_the_files_defaults():
    from attnx.training.config import base_config, validate

    config = base_config()
    files = config.task.files.to_dict()
    for key, value in files_kind.DEFAULTS.items():
        assert files[key] == value, key
    assert set(files) == set(files_kind.DEFAULTS) | {
        "train",
        "validation",
        "test",
        "source_suffix",
        "target_suffix",
    }
    config.task.dataset = "files"
    validate(config)
    config.task.files.format = "xml"
    with pytest.raises(ValueError, match=r"config\.task.*config\.task\.files\.format='xml'"):
        validate(config)


def test_file_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    write(tmp_path / "corpus" / "train.tsv", tsv(PAIRS))
    monkeypatch.chdir(tmp_path / "corpus")
    source = tasks.open_split(section(train="train.tsv"), "train")
    monkeypatch.chdir(tmp_path)
    assert records(source) == PAIRS  # read once, at open
    assert os.path.isabs(files_kind.file_lines.resolve("train.tsv"))
