"""A `files` dataset goes through the same pipeline as a TFDS source: packing, sharding, resuming."""

import json
import os
import subprocess
import sys

import numpy as np

from attnx.data import pipeline, tasks

NUM_PAIRS = 37


def write_corpus(directory) -> dict:
    """A TSV of pairs whose characters say which pair they come from; its task section."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(NUM_PAIRS):
        source = chr(0x4E00 + i) * int(rng.integers(1, 8))
        target = chr(0x3400 + i) * int(rng.integers(1, 5))
        lines.append(f"{source}\t{target}\n")
    path = os.path.join(directory, "train.tsv")
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(lines)
    return {"dataset": "files", "files": {"train": path, "validation": path}}


# The same pipeline in this process and in a new one (`_RESTORE` below).
OPTIONS = dict(
    max_source_length=12,
    max_target_length=8,
    batch_size=4,
    packing=True,
    seed=3,
    process_index=0,
    process_count=1,
)

_RESTORE = """
import json, sys
import numpy as np
from attnx.data import pipeline, tasks, tokenizers
config, options, state, vocab_dir, out = json.loads(sys.argv[1])
source = tasks.open_split(config, "train")
iterator = pipeline.make_pipeline(
    source, tasks.task_from_config(config), tokenizers.load_tokenizer(vocab_dir), **options
)
iterator.set_state(state)
np.savez(out, **next(iterator))
"""


def test_packed_files_pipeline_resumes_in_a_new_process(tmp_path):
    config = json.loads(json.dumps(write_corpus(tmp_path)))
    task = tasks.task_from_config(config)
    source = tasks.open_split(config, "train")
    vocab_dir = str(tmp_path / "vocab")
    tokenizer = pipeline.build_or_load_task_tokenizer("char", vocab_dir, task, source)
    assert tokenizer.vocab_size == 4 + 2 * NUM_PAIRS

    iterator = pipeline.make_pipeline(source, task, tokenizer, **OPTIONS)
    # 12 packed batches of 4 rows cross the first epoch boundary (37 pairs).
    first = [next(iterator) for _ in range(12)]
    assert set(first[0]) == {
        "inputs",
        "targets",
        "inputs_segmentation",
        "inputs_position",
        "targets_segmentation",
        "targets_position",
    }
    assert max(int(batch["inputs_segmentation"].max()) for batch in first) >= 2  # packed
    state = iterator.get_state()
    expected = next(iterator)

    out = tmp_path / "restored.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    arguments = json.dumps([config, OPTIONS, state, vocab_dir, str(out)])
    subprocess.run([sys.executable, "-c", _RESTORE, arguments], check=True, env=env, timeout=300)
    restored = dict(np.load(out))
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(restored[key], value, err_msg=key)


def test_two_processes_evaluate_every_pair_once(tmp_path):
    config = write_corpus(tmp_path)
    task = tasks.task_from_config(config)
    source = tasks.open_split(config, "validation")
    tokenizer = pipeline.build_or_load_task_tokenizer("char", str(tmp_path / "v"), task, source)
    seen = []
    for process_index in range(2):
        for batch in pipeline.make_pipeline(
            source,
            task,
            tokenizer,
            max_source_length=12,
            max_target_length=8,
            batch_size=6,
            num_epochs=1,
            shuffle=False,
            with_index=True,
            process_index=process_index,
            process_count=2,
        ):
            seen.extend(int(i) for i in batch["index"] if i >= 0)
            for row, index in zip(batch["targets"], batch["index"], strict=True):
                if index >= 0:
                    assert tokenizer.decode(row) == task.target_text(source[int(index)])
    assert sorted(seen) == list(range(NUM_PAIRS))


def test_image_captions_from_files_make_batches(tmp_path):
    import PIL.Image

    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        size = (6, 8) if i % 2 else (10, 12)  # sizes differ: image_size resizes them
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": [f"{i}{i}", f"{i}"]}) + "\n")
    (tmp_path / "captions.jsonl").write_text("".join(lines))
    config = {
        "dataset": "files",
        "image_size": (8, 8),
        "caption_choice": "random",
        "files": {"train": str(tmp_path / "captions.jsonl"), "format": "jsonl_images"},
    }
    tasks.check_task_config(config)
    task = tasks.task_from_config(config)
    source = tasks.open_split(config, "train")
    tokenizer = pipeline.build_or_load_task_tokenizer("char", str(tmp_path / "v"), task, source)
    batch = next(
        pipeline.make_pipeline(
            source,
            task,
            tokenizer,
            max_target_length=4,
            batch_size=4,
            image_size=(8, 8),
            process_index=0,
            process_count=1,
        )
    )
    assert batch["image"].shape == (4, 8, 8, 3) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["targets"].shape == (4, 4)
