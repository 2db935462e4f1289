"""Tests of attnx.data.pipeline: sharding, checkpointing, packing, real TFDS sources."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnx.data import pipeline, tasks, tokenizers

NUM_EXAMPLES = 23
# Example i is written only in its own characters (source chr(0x4E00 + i),
# target chr(0x3400 + i)): every token says which example it comes from.
SOURCE_BASE, TARGET_BASE = 0x4E00, 0x3400


def tiny_source(num_examples: int = NUM_EXAMPLES) -> list[dict]:
    """A random-access source in the format of tfds.data_source (text as bytes)."""
    rng = np.random.default_rng(0)
    return [
        {
            "source": (chr(SOURCE_BASE + i) * int(rng.integers(1, 8))).encode(),
            "target": (chr(TARGET_BASE + i) * int(rng.integers(1, 5))).encode(),
            "id": np.int32(i),
        }
        for i in range(num_examples)
    ]


def tiny_tokenizer(source: list[dict]) -> tokenizers.CharacterTokenizer:
    task = tasks.get_task("dates")
    return tokenizers.CharacterTokenizer.from_texts(t for r in source for t in task.texts(r))


def tiny_pipeline(packing: bool, **kwargs) -> pipeline.BatchIterator:
    """The pipeline the checkpoint test rebuilds in a new process."""
    source = tiny_source()
    options = dict(
        max_source_length=12,
        max_target_length=8,
        batch_size=4,
        packing=packing,
        seed=7,
        process_index=0,
        process_count=1,
    )
    if not packing:
        options["extra_fields"] = {"id": ()}
    options.update(kwargs)
    return pipeline.make_pipeline(
        source, tasks.get_task("dates"), tiny_tokenizer(source), **options
    )


def owners(ids: np.ndarray, tokenizer: tokenizers.CharacterTokenizer, base: int) -> np.ndarray:
    """The example each token belongs to, read from its character (-1 for pad/eos)."""
    result = np.full(ids.shape, -1)
    for index, token in np.ndenumerate(ids):
        if token >= 4:
            result[index] = ord(tokenizer.characters[token - 4]) - base
    return result


def test_state_restored_in_a_new_process_gives_the_next_batch(tmp_path):
    # One new process checks both the padded and the packed pipeline.
    expected, states = {}, {}
    for packing in (False, True):
        iterator = tiny_pipeline(packing)
        # 9 batches of 4 rows cross the first epoch boundary (23 examples).
        for _ in range(9):
            next(iterator)
        states[packing] = iterator.get_state()
        expected[packing] = next(iterator)
    state_path = tmp_path / "states.json"
    # The state must be JSON-serialisable.
    state_path.write_text(json.dumps([states[False], states[True]]))
    script = (
        "import json, sys, numpy as np\n"
        f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
        "import test_pipeline\n"
        f"states = json.loads(open({str(state_path)!r}).read())\n"
        "for packing, state in zip((False, True), states):\n"
        "    iterator = test_pipeline.tiny_pipeline(packing)\n"
        "    iterator.set_state(state)\n"
        f"    np.savez(f'{tmp_path}/batch_{{packing}}.npz', **next(iterator))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)
    for packing in (False, True):
        restored = dict(np.load(tmp_path / f"batch_{packing}.npz"))
        assert restored.keys() == expected[packing].keys()
        for key, value in expected[packing].items():
            np.testing.assert_array_equal(restored[key], value, err_msg=f"{key} {packing=}")
        # A fresh iterator (state not restored) would give another batch.
        fresh = next(tiny_pipeline(packing))
        assert not np.array_equal(fresh["inputs"], expected[packing]["inputs"])


def test_two_processes_read_each_example_once_per_epoch():
    # Evaluation: one pass, 23 examples, shards padded to equal length.
    seen = []
    batch_counts = []
    for process_index in range(2):
        batches = list(
            tiny_pipeline(
                False, num_epochs=1, process_index=process_index, process_count=2, batch_size=6
            )
        )
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch["inputs"].shape == (3, 12)
            ids = batch["id"][batch["targets"][:, 0] > 0]
            seen.extend(ids.tolist())
        # Padding rows hold no example and carry id -1.
    assert batch_counts[0] == batch_counts[1]
    assert sorted(seen) == list(range(NUM_EXAMPLES))

    # Packed evaluation: the shards pack into different numbers of rows (4 and 3
    # batches of 2 here), so the shorter one is padded with empty batches.
    source = tiny_source()
    tokenizer = tiny_tokenizer(source)
    seen, batch_counts, batches_with_examples = [], [], []
    for process_index in range(2):
        batches = list(
            tiny_pipeline(
                True, num_epochs=1, process_index=process_index, process_count=2, batch_size=4
            )
        )
        batch_counts.append(len(batches))
        batches_with_examples.append(sum(b["inputs_segmentation"].max() > 0 for b in batches))
        for batch in batches:
            assert {k: v.shape for k, v in batch.items()} == {
                "inputs": (2, 12),
                "inputs_segmentation": (2, 12),
                "inputs_position": (2, 12),
                "targets": (2, 8),
                "targets_segmentation": (2, 8),
                "targets_position": (2, 8),
            }
            owner = owners(batch["inputs"], tokenizer, SOURCE_BASE)
            for row, segments in enumerate(batch["inputs_segmentation"]):
                # The first token of each segment says which example it holds.
                starts = np.flatnonzero(batch["inputs_position"][row] == 0)
                seen.extend(owner[row, starts[segments[starts] > 0]].tolist())
            empty = batch["targets_segmentation"].max(axis=1) == 0
            for value in batch.values():
                assert (value[empty] == 0).all()
    assert batch_counts[0] == batch_counts[1]
    assert sorted(batches_with_examples) == [3, 4], "the test must need padding"
    assert sorted(seen) == list(range(NUM_EXAMPLES))

    # Training: shuffled, repeated; the first epoch of each process (12 examples
    # each for 24 examples) covers the dataset once.
    source = tiny_source(24)
    seen = []
    for process_index in range(2):
        iterator = pipeline.make_pipeline(
            source,
            tasks.get_task("dates"),
            tiny_tokenizer(source),
            max_source_length=12,
            max_target_length=8,
            batch_size=6,
            seed=3,
            process_index=process_index,
            process_count=2,
            extra_fields={"id": ()},
        )
        for _ in range(4):
            seen.extend(next(iterator)["id"].tolist())
    assert sorted(seen) == list(range(24))


def global_batches(process_count: int, steps: int, **kwargs) -> list[dict[str, np.ndarray]]:
    """The first `steps` global batches, put together from every process's rows."""
    iterators = [
        tiny_pipeline(False, process_index=p, process_count=process_count, **kwargs)
        for p in range(process_count)
    ]
    batches = []
    for _ in range(steps):
        parts = [next(iterator) for iterator in iterators]
        batches.append({k: np.concatenate([part[k] for part in parts]) for k in parts[0]})
    return batches


@pytest.mark.parametrize("training", [True, False])
def test_global_batches_do_not_depend_on_the_process_count(training):
    # Sources longer than 5 tokens (eos included) are dropped: in training
    # their rows are refilled, in evaluation they become empty rows.
    options = dict(batch_size=4, max_source_length=5, with_index=True)
    if training:
        steps = 12  # two epochs of 23 examples
    else:
        options.update(num_epochs=1, shuffle=False)
        steps = 6  # 23 examples padded to 24
    expected = global_batches(1, steps, **options)
    assert any(b["id"].min() >= 0 for b in expected)
    for process_count in (2, 4):
        got = global_batches(process_count, steps, **options)
        for step, (want, batch) in enumerate(zip(expected, got, strict=True)):
            for key in want:
                np.testing.assert_array_equal(
                    batch[key], want[key], err_msg=f"{key} step {step} {process_count=}"
                )
    if not training:
        # The evaluation stream ends at the same batch for every process count.
        for process_count in (1, 2, 4):
            count = len(list(tiny_pipeline(False, process_count=process_count, **options)))
            assert count == steps


def test_start_batch_resumes_on_another_process_count():
    # A run that consumed 7 global batches on 1 process continues on 4 (and
    # back): the next batches are those the 1-process run would have read.
    options = dict(batch_size=4, max_source_length=5)
    expected = global_batches(1, 10, **options)[7:]
    for process_count in (4, 1):
        got = global_batches(process_count, 3, start_batch=7, **options)
        for want, batch in zip(expected, got, strict=True):
            for key in want:
                np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
    with pytest.raises(ValueError, match="start_batch=2"):
        tiny_pipeline(True, start_batch=2)


def test_training_refills_the_rows_of_examples_too_long_to_keep():
    source = tiny_source()
    fits = {i for i, r in enumerate(source) if len(tasks.to_text(r["source"])) + 1 <= 4}
    assert 0 < len(fits) < NUM_EXAMPLES
    iterator = tiny_pipeline(False, max_source_length=4, with_index=True)
    seen = []
    for _ in range(40):
        batch = next(iterator)
        # Every row holds an example that fits; 'index' names the record.
        assert (batch["targets"][:, 0] > 0).all()
        np.testing.assert_array_equal(batch["index"], batch["id"])
        seen.extend(batch["id"].tolist())
    assert set(seen) == fits


def test_maximum_lengths_that_drop_every_example_are_an_error():
    source = [{"source": b"12345", "target": b"2000-01-01", "id": np.int32(0)}] * 3
    tokenizer = tiny_tokenizer(source)
    with pytest.raises(ValueError, match="max_source_length=4, max_target_length=8"):
        pipeline.make_pipeline(
            source,
            tasks.get_task("dates"),
            tokenizer,
            max_source_length=4,
            max_target_length=8,
            batch_size=2,
        )


def test_shuffle_is_seeded_and_changes_every_epoch():
    def first_epochs(seed):
        iterator = tiny_pipeline(False, batch_size=1, seed=seed, length_policy="truncate")
        ids = [int(next(iterator)["id"][0]) for _ in range(2 * NUM_EXAMPLES)]
        return ids[:NUM_EXAMPLES], ids[NUM_EXAMPLES:]

    epoch_1, epoch_2 = first_epochs(5)
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(NUM_EXAMPLES))
    assert epoch_1 != epoch_2
    assert first_epochs(5) == (epoch_1, epoch_2)
    assert first_epochs(6)[0] != epoch_1


def test_packed_rows_never_attend_across_examples():
    source = tiny_source()
    tokenizer = tiny_tokenizer(source)
    iterator = tiny_pipeline(True, num_epochs=1, batch_size=3)
    unpacked = {}
    rows_with_several = 0
    for batch in iterator:
        for row in range(batch["inputs"].shape[0]):
            inputs, targets = batch["inputs"][row], batch["targets"][row]
            in_seg, tgt_seg = batch["inputs_segmentation"][row], batch["targets_segmentation"][row]
            in_owner = owners(inputs, tokenizer, SOURCE_BASE)
            tgt_owner = owners(targets, tokenizer, TARGET_BASE)
            # eos belongs to the example of the token before it.
            for owner, ids in ((in_owner, inputs), (tgt_owner, targets)):
                for k in range(1, len(ids)):
                    if ids[k] == tokenizers.EOS_ID:
                        owner[k] = owner[k - 1]
            # The masks a model builds from segment ids, written out in numpy.
            masks = [
                (in_seg[:, None] == in_seg[None, :]) & (in_seg[:, None] > 0),
                (tgt_seg[:, None] == tgt_seg[None, :]) & (tgt_seg[:, None] > 0),
                (tgt_seg[:, None] == in_seg[None, :]) & (tgt_seg[:, None] > 0),
            ]
            pairs = [(in_owner, in_owner), (tgt_owner, tgt_owner), (tgt_owner, in_owner)]
            for mask, (query_owner, key_owner) in zip(masks, pairs, strict=True):
                q, k = np.nonzero(mask)
                np.testing.assert_array_equal(query_owner[q], key_owner[k])
                assert (query_owner[q] >= 0).all()
            # Padding is segment 0 and holds only pad tokens.
            assert (inputs[in_seg == 0] == 0).all() and (targets[tgt_seg == 0] == 0).all()
            rows_with_several += in_seg.max() > 1
            for segment in range(1, in_seg.max() + 1):
                for name, seg in (("inputs", in_seg), ("targets", tgt_seg)):
                    position = batch[f"{name}_position"][row][seg == segment]
                    np.testing.assert_array_equal(position, np.arange(len(position)))
                example = int(in_owner[in_seg == segment][0])
                assert example not in unpacked, "an example was packed twice"
                unpacked[example] = (inputs[in_seg == segment], targets[tgt_seg == segment])
    assert rows_with_several > 0, "the test data must pack several examples into some rows"
    # Unpacking gives back every original example exactly.
    assert sorted(unpacked) == list(range(NUM_EXAMPLES))
    task = tasks.get_task("dates")
    for example, (inputs, targets) in unpacked.items():
        record = source[example]
        np.testing.assert_array_equal(inputs, [*tokenizer.encode(task.source_text(record)), 2])
        np.testing.assert_array_equal(targets, [*tokenizer.encode(task.target_text(record)), 2])


def test_length_policy_drop_and_truncate():
    source = tiny_source()
    lengths = [len(tasks.to_text(r["source"])) + 1 for r in source]
    kept = {i for i, n in enumerate(lengths) if n <= 4}
    dropped = list(tiny_pipeline(False, max_source_length=4, num_epochs=1, shuffle=False))
    ids = np.concatenate([b["id"] for b in dropped])
    assert set(ids[ids >= 0].tolist()) == kept
    truncated = np.concatenate(
        [
            b["inputs"]
            for b in tiny_pipeline(
                False, max_source_length=4, num_epochs=1, shuffle=False, length_policy="truncate"
            )
        ]
    )
    assert truncated.shape == (24, 4)
    # Every truncated row keeps its eos at the end of its (shortened) content.
    expected_lengths = [min(n, 4) for n in lengths] + [0]
    np.testing.assert_array_equal((truncated > 0).sum(1), expected_lengths)
    long_rows = [i for i, n in enumerate(lengths) if n > 4]
    assert (truncated[long_rows, 3] == tokenizers.EOS_ID).all()


def test_tokens_per_batch_fixes_the_number_of_rows():
    batch = next(tiny_pipeline(True, batch_size=None, tokens_per_batch=60))
    # 60 tokens // max(12, 8) = 5 rows.
    assert batch["inputs"].shape == (5, 12) and batch["targets"].shape == (5, 8)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="process_count=3"):
        tiny_pipeline(False, process_count=3)
    with pytest.raises(ValueError, match="exactly one of batch_size and tokens_per_batch"):
        tiny_pipeline(False, tokens_per_batch=40)
    with pytest.raises(ValueError, match="length_policy='cut'"):
        tiny_pipeline(False, length_policy="cut")
    with pytest.raises(KeyError, match="'alignment'"):
        tiny_pipeline(False, extra_fields={"alignment": (8,)})
    with pytest.raises(ValueError, match="extra_fields"):
        tiny_pipeline(True, extra_fields={"id": ()})
    with pytest.raises(ValueError, match="with_index"):
        tiny_pipeline(True, with_index=True)
    with pytest.raises(ValueError, match="worker_count=2: packed evaluation"):
        tiny_pipeline(True, num_epochs=1, worker_count=2)


def test_captioning_batches_images_targets_and_boxes():
    rng = np.random.default_rng(1)
    source = []
    for i in range(5):
        digits = "".join(str(d) for d in rng.integers(0, 10, 2 + i % 2))
        boxes = rng.integers(0, 60, (len(digits), 4)).astype(np.int32)
        image = rng.integers(0, 256, (16, 16, 1)).astype(np.uint8)
        source.append({"image": image, "caption": digits.encode(), "boxes": boxes})
    task = tasks.get_task("digit_captions")
    tokenizer = tokenizers.CharacterTokenizer("0123456789")
    batches = list(
        pipeline.make_pipeline(
            source,
            task,
            tokenizer,
            max_target_length=6,
            batch_size=2,
            num_epochs=1,
            shuffle=False,
            process_index=0,
            process_count=1,
            image_size=(16, 16),
            extra_fields={"boxes": (3, 4)},
        )
    )
    assert len(batches) == 3
    for b, batch in enumerate(batches):
        assert batch["image"].dtype == np.float32 and batch["image"].shape == (2, 16, 16, 1)
        for row in range(2):
            index = 2 * b + row
            if index >= len(source):  # The padding row of the last batch.
                assert (batch["targets"][row] == 0).all() and (batch["image"][row] == 0).all()
                continue
            record = source[index]
            np.testing.assert_allclose(batch["image"][row], record["image"] / 255.0)
            assert tokenizer.decode(batch["targets"][row]) == record["caption"].decode()
            n = len(record["boxes"])
            np.testing.assert_array_equal(batch["boxes"][row, :n], record["boxes"])
            assert (batch["boxes"][row, n:] == -1).all()


def test_coco_like_images_are_resized_and_captions_drawn():
    captions = ["a b", "c d", "e f"]
    source = [
        {
            "image": np.full((10 + i, 7, 3), 255, np.uint8),
            "captions": {"text": np.array([c.encode() for c in captions], dtype=object)},
        }
        for i in range(4)
    ]
    task = tasks.get_task("coco_captions", caption_choice="random")
    tokenizer = tokenizers.ByteTokenizer()
    iterator = pipeline.make_pipeline(
        source,
        task,
        tokenizer,
        max_target_length=5,
        batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
        image_size=(8, 8),
    )
    drawn = set()
    for _ in range(6):
        batch = next(iterator)
        assert batch["image"].shape == (4, 8, 8, 3)
        np.testing.assert_allclose(batch["image"], 1.0)
        drawn.update(tokenizer.decode(row) for row in batch["targets"])
    assert drawn == set(captions)


def test_worker_processes_give_the_same_batches():
    expected = [next(it) for it in [tiny_pipeline(False)] for _ in range(3)]
    with tiny_pipeline(False, worker_count=1) as with_workers:
        for batch in expected:
            got = next(with_workers)
            for key in batch:
                np.testing.assert_array_equal(got[key], batch[key], err_msg=key)


def test_wmt_end_to_end_under_mock_data(tmp_path):
    """tfds.data_source + SentencePiece trained on the mock text + packing + global arrays."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    with tfds.testing.mock_data(num_examples=24):
        name = "wmt14_translate/de-en"
        task = tasks.get_task(name)
        train = tasks.open_source(name, "train")
        vocab_dir = tmp_path / "vocab"
        tokenizer = pipeline.build_or_load_task_tokenizer(
            "sentencepiece", vocab_dir, task, train, vocab_size=16
        )
        assert (vocab_dir / tokenizers.SENTENCEPIECE_FILE).is_file()
        train_batches = pipeline.make_pipeline(
            train,
            task,
            tokenizer,
            max_source_length=48,
            max_target_length=48,
            batch_size=8,
            packing=True,
            process_index=0,
            process_count=1,
            sharding=sharding,
        )
        batch = next(train_batches)
        assert set(batch) == {
            "inputs",
            "targets",
            "inputs_segmentation",
            "inputs_position",
            "targets_segmentation",
            "targets_position",
        }
        for value in batch.values():
            assert isinstance(value, jax.Array) and value.shape == (8, 48)
            assert value.dtype == np.int32 and value.sharding == sharding
        assert int(batch["targets_segmentation"].max()) >= 1

        validation = tasks.open_source(name, "validation")
        references = {task.target_text(record) for record in validation}
        decoded = []
        for eval_batch in pipeline.make_pipeline(
            validation,
            task,
            tokenizer,
            max_source_length=48,
            max_target_length=48,
            batch_size=8,
            num_epochs=1,
            shuffle=False,
            process_index=0,
            process_count=1,
            sharding=sharding,
        ):
            targets = np.asarray(eval_batch["targets"])
            decoded.extend(tokenizer.decode(row) for row in targets if row[0] > 0)
    # Mock text is random letters and spaces; SentencePiece normalises runs of spaces.
    assert len(decoded) > 0
    assert {" ".join(t.split()) for t in decoded} <= {" ".join(r.split()) for r in references}
