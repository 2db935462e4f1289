"""grain input pipelines: from a random-access source to global batches.

The pipeline, in grain's Dataset API:

  example indices
    -> seeded shuffle, reshuffled every epoch (the same on every process)
    -> repeat (training) or n passes padded to whole global batches (evaluation)
    -> read + tokenise (+ image to float) + length policy
    -> this process's rows of each global batch
    -> pad to fixed shapes, or pack several examples per row
    -> batch (fixed shapes, so jit never recompiles)
    -> optional worker processes
    -> global `jax.Array`s on the mesh

Every process builds the same global stream of examples and reads only its
rows of each global batch (rows [p b, (p + 1) b) of a batch of B = b x
process_count rows), so a global batch holds the same examples, in the same
order, whether 1 or 64 processes read it: a run's losses do not depend on the
number of hosts. Each process reads and tokenises only its own rows.

Batches are dicts of arrays:

  'inputs'   [B, S] int32   source ids, ending with eos (text tasks)
  'image'    [B, H, W, C] float32 in [0, 1]   (captioning tasks)
  'targets'  [B, T] int32   target ids, ending with eos; 0 is padding. The
                            model shifts right and prepends bos itself.
  'index'    [B] int32      with `with_index`: the record each row holds (-1: none)
  packed rows also carry 'inputs_segmentation', 'inputs_position',
  'targets_segmentation', 'targets_position' [B, S|T] int32 (Flax WMT / T5
  convention): segment ids count the examples of a row from 1, 0 marks
  padding; positions restart at 0 in every example.

A row whose targets are all padding holds no example. Evaluation (a finite
number of epochs) pads every epoch to whole global batches with such rows, and
turns an example that is too long (length_policy='drop') into one, so every
example it keeps is scored once. Training never sees such examples: the row
of an example that is too long is filled by another drawn at random (seeded
by the row's global position, so again the same for any process count).

Packing fills rows from the examples of one process, so packed batches depend
on the process count. Packed evaluation packs only real examples; since the
number of rows a process's examples pack into depends on their lengths, every
process counts the packed batches of every process and appends empty batches
up to the largest count, so here too all processes run the same number of
steps (a multi-host evaluation step is a collective: one process short of
batches would hang the others).

The iterator's state (`get_state()` / `set_state()`) is a JSON-serialisable
dict, so training saves it in its checkpoint and resumes on the next batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from attnx.data import tasks as tasks_lib
from attnx.data import tokenizers as tokenizers_lib

LENGTH_POLICIES = ("drop", "truncate")
# Index of the padding examples that fill the last global batch of an evaluation.
_NO_EXAMPLE = -1
# Draws of another example for one too long to train on, before an empty row.
_REPLACEMENT_ATTEMPTS = 16
# Records read up front to check that the maximum lengths keep most examples.
_LENGTH_CHECK_RECORDS = 256
# Packed-feature names in grain's packing -> attnx (Flax WMT / T5) names.
_PACKING_KEYS = {"_segment_ids": "_segmentation", "_positions": "_position"}


@dataclasses.dataclass(frozen=True)
class _Preprocess(grain.transforms.RandomMap):
    """Reads example `index` and turns it into unbatched model inputs.

    A dataclass of picklable fields, so worker processes can run it. An
    example too long to keep (length_policy='drop') is replaced by up to
    `replacement_attempts` others drawn at random; if none fits (or attempts
    is 0), the result is an empty example (all padding, `drop_as_empty`) or
    None (to be filtered out, before packing).
    """

    source: Sequence[Mapping[str, Any]]
    task: tasks_lib.Task
    tokenizer: tokenizers_lib.Tokenizer
    max_source_length: int
    max_target_length: int
    length_policy: str
    pad: bool
    drop_as_empty: bool
    replacement_attempts: int
    image_size: tuple[int, int] | None
    extra_fields: tuple[tuple[str, tuple[int, ...]], ...]
    with_index: bool

    def random_map(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        index = int(index)
        if index == _NO_EXAMPLE:
            return self._empty() if self.drop_as_empty else None
        example = self.example(index, rng)
        for _ in range(self.replacement_attempts if example is None else 0):
            # Too long to keep: another example, drawn from this row's own
            # generator, takes its place, so the global batch stays full.
            example = self.example(int(rng.integers(len(self.source))), rng)
            if example is not None:
                break
        if example is None:
            return self._empty() if self.drop_as_empty else None
        return example

    def example(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray] | None:
        """Record `index` as model inputs, or None if it is too long to keep."""
        record = self.source[index]
        if isinstance(self.task, tasks_lib.TextPairTask):
            example = {
                "inputs": self._ids(self.task.source_text(record), self.max_source_length),
                "targets": self._ids(self.task.target_text(record), self.max_target_length),
            }
        else:
            example = {
                "image": self._image(self.task.image(record)),
                "targets": self._ids(self.task.caption(record, rng), self.max_target_length),
            }
        if any(value is None for value in example.values()):
            return None
        for name, shape in self.extra_fields:
            example[name] = _pad_field(name, np.asarray(record[name]), shape)
        if self.with_index:
            example["index"] = np.int32(index)
        if self.pad:
            for key in ("inputs", "targets"):
                if key in example:
                    example[key] = _pad_1d(example[key], self._max_length(key))
        return example

    def _max_length(self, key: str) -> int:
        return self.max_source_length if key == "inputs" else self.max_target_length

    def _ids(self, text: str, max_length: int) -> np.ndarray | None:
        """Token ids of `text` followed by eos, or None if too long to keep."""
        ids = self.tokenizer.encode(text)
        if len(ids) + 1 > max_length:
            if self.length_policy == "drop":
                return None
            ids = ids[: max_length - 1]
        return np.append(ids, tokenizers_lib.EOS_ID).astype(np.int32)

    def _image(self, image: np.ndarray) -> np.ndarray:
        """uint8 [h, w, c] -> float32 [H, W, c] in [0, 1], resized to image_size if set."""
        if self.image_size is not None and image.shape[:2] != tuple(self.image_size):
            height, width = self.image_size
            channels = image.shape[2]
            pil = Image.fromarray(image[..., 0] if channels == 1 else image)
            image = np.asarray(pil.resize((width, height), Image.BILINEAR))
            image = image.reshape(height, width, channels)
        return image.astype(np.float32) / 255.0

    def _empty(self) -> dict[str, np.ndarray]:
        """An all-padding example: it counts for nothing in losses and metrics."""
        example: dict[str, np.ndarray] = {
            "targets": np.zeros(self.max_target_length, np.int32),
        }
        if isinstance(self.task, tasks_lib.TextPairTask):
            example["inputs"] = np.zeros(self.max_source_length, np.int32)
        else:
            image = self.task.image(self.source[0])
            height, width = self.image_size or image.shape[:2]
            example["image"] = np.zeros((height, width, image.shape[2]), np.float32)
        for name, shape in self.extra_fields:
            example[name] = np.full(shape, -1, np.int32)
        if self.with_index:
            example["index"] = np.int32(_NO_EXAMPLE)
        return example


def _is_example(example: dict[str, np.ndarray] | None) -> bool:
    return example is not None


def _pad_1d(ids: np.ndarray, length: int) -> np.ndarray:
    return np.pad(ids, (0, length - len(ids)))


def _pad_field(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Pads an extra field to `shape` with -1 (0 is a valid index or coordinate)."""
    if value.ndim != len(shape) or any(v > s for v, s in zip(value.shape, shape, strict=True)):
        raise ValueError(f"Extra field {name!r} has shape {value.shape}, larger than {shape}.")
    fill = -1 if np.issubdtype(value.dtype, np.integer) else np.nan
    padded = np.full(shape, fill, value.dtype)
    padded[tuple(slice(0, n) for n in value.shape)] = value
    return padded


def _rename_packing_keys(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    renamed = {}
    for key, value in row.items():
        for grain_suffix, attnx_suffix in _PACKING_KEYS.items():
            if key.endswith(grain_suffix):
                key = key[: -len(grain_suffix)] + attnx_suffix
        renamed[key] = value
    return renamed


def _pad_batch(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a short last batch with empty rows (0; -1 in extra fields)."""
    padded = {}
    for key, value in batch.items():
        missing = rows - value.shape[0]
        if missing == 0:
            padded[key] = value
            continue
        fill = 0 if key in ("inputs", "targets", "image") else -1
        filler = np.full((missing, *value.shape[1:]), fill, value.dtype)
        padded[key] = np.concatenate([value, filler])
    return padded


def _empty_packed_batch(rows: int, source_length: int, target_length: int) -> dict:
    """A batch of packed rows holding no example (segment 0 everywhere)."""
    lengths = {"inputs": source_length, "targets": target_length}
    batch = {}
    for name, length in lengths.items():
        for suffix in ("", "_segmentation", "_position"):
            batch[name + suffix] = np.zeros((rows, length), np.int32)
    return batch


class _ProcessRows(grain.MapDataset):
    """This process's rows of every global batch of a global stream of examples.

    Global batch k holds stream positions [k B, (k + 1) B); process p reads
    the rows [k B + p b, k B + (p + 1) b) of it, with b = B / process_count.
    Every process builds the same global stream (same seed), so the rows that
    make up a global batch do not depend on how many processes read them.
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(
        self,
        parent: grain.MapDataset,
        *,
        global_batch_size: int,
        process_index: int,
        process_count: int,
    ):
        super().__init__(parent)
        self._global_batch_size = global_batch_size
        self._local_batch_size = global_batch_size // process_count
        self._offset = process_index * self._local_batch_size
        self._length = len(parent) // global_batch_size * self._local_batch_size

    def __len__(self) -> int:
        return self._length

    def _global_position(self, index: int) -> int:
        batch, row = divmod(index, self._local_batch_size)
        return batch * self._global_batch_size + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._global_position(index)]

    def __str__(self) -> str:
        return (
            f"_ProcessRows(global_batch_size={self._global_batch_size}, "
            f"offset={self._offset}, rows={self._local_batch_size})"
        )


def _process_rows(
    process_index: int,
    *,
    num_records: int,
    process_count: int,
    preprocess: _Preprocess,
    num_epochs: int | None,
    shuffle: bool,
    seed: int,
    packed_lengths: dict[str, int] | None,
    global_batch_size: int,
    start_batch: int = 0,
) -> grain.IterDataset:
    """The unbatched rows of one process: examples, or packed rows if packed_lengths.

    `start_batch` skips the rows of the first global batches (unpacked only).
    """
    indices = grain.MapDataset.range(num_records)
    if num_epochs is not None:
        # Pad every epoch to whole global batches with rows that hold no
        # example, so every process runs the same number of steps.
        missing = -num_records % global_batch_size
        if missing:
            filler = grain.MapDataset.source([_NO_EXAMPLE] * missing)
            indices = grain.MapDataset.concatenate([indices, filler])
    if shuffle:
        # Past the first epoch grain's shuffle draws a new permutation per epoch.
        indices = indices.shuffle(seed=seed)
    indices = indices.repeat(num_epochs)
    # The random generator of an example is keyed by its global position, so a
    # random caption choice or replacement is also the same for any process count.
    examples = indices.random_map(preprocess, seed=seed)
    rows = _ProcessRows(
        examples,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    if packed_lengths is None:
        if start_batch:
            rows = rows[start_batch * (global_batch_size // process_count) :]
        return rows.to_iter_dataset()
    # Packing fills rows from this process's examples only: packed batches
    # depend on the process count (each process packs its own stream).
    rows = rows.filter(_is_example).to_iter_dataset()
    rows = grain.experimental.FirstFitPackIterDataset(
        rows,
        length_struct=packed_lengths,
        num_packing_bins=global_batch_size // process_count,
        seed=seed,
        shuffle_bins=shuffle,
    )
    return rows.map(_rename_packing_keys)


def _check_lengths(
    source: Sequence[Mapping[str, Any]],
    task: tasks_lib.Task,
    tokenizer: tokenizers_lib.Tokenizer,
    max_source_length: int | None,
    max_target_length: int,
) -> None:
    """Fails if length_policy='drop' would drop every example; warns if it drops many.

    Reads up to _LENGTH_CHECK_RECORDS records spread over the source: a
    maximum length below the data's would otherwise train on nothing but
    replacements of replacements, or on empty rows.
    """
    count = min(len(source), _LENGTH_CHECK_RECORDS)
    too_long = 0
    for index in np.linspace(0, len(source) - 1, count).astype(int):
        record = source[int(index)]
        if isinstance(task, tasks_lib.TextPairTask):
            texts = [(task.source_text(record), max_source_length)]
            texts.append((task.target_text(record), max_target_length))
        else:
            texts = [(text, max_target_length) for text in task.captions(record)]
        too_long += any(len(tokenizer.encode(text)) + 1 > limit for text, limit in texts)
    limits = f"max_target_length={max_target_length}"
    if max_source_length is not None:
        limits = f"max_source_length={max_source_length}, {limits}"
    if too_long == count:
        raise ValueError(
            f"Dataset {task.dataset!r}: none of {count} records read fits {limits} "
            "(eos included) under length_policy='drop'; raise the maximum lengths or use "
            "length_policy='truncate'."
        )
    if too_long > 0.1 * count:
        logging.warning(
            "Dataset %r: %d of %d records read are longer than %s and are dropped.",
            task.dataset,
            too_long,
            count,
            limits,
        )


def to_global_batch(
    batch: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding
) -> dict[str, jax.Array]:
    """Assembles the per-process batches of all processes into global arrays.

    Args:
      batch: this process's rows, arrays [B_local, ...].
      sharding: where the global batch lives, e.g.
        NamedSharding(mesh, P(('data', 'fsdp'))); its leading axis splits rows.

    Returns:
      The global batch, arrays [B_local * process_count, ...].
    """
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in batch.items()
    }


class BatchIterator(Iterator[dict[str, Any]]):
    """Iterates over batches; checkpointable through get_state / set_state.

    Yields numpy per-process batches, or global `jax.Array`s when built with a
    sharding.
    """

    def __init__(self, dataset: grain.IterDataset, sharding: jax.sharding.Sharding | None):
        self._iterator = iter(dataset)
        self._sharding = sharding

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self._iterator)
        if self._sharding is None:
            return batch
        return to_global_batch(batch, self._sharding)

    def get_state(self) -> dict[str, Any]:
        """The position in the data, a JSON-serialisable dict."""
        return self._iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        """Moves to the position `state` returned by `get_state`."""
        self._iterator.set_state(state)

    def close(self) -> None:
        """Stops worker processes and prefetch threads, and frees their shared memory."""
        self._iterator.close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def make_pipeline(
    source: Sequence[Mapping[str, Any]],
    task: tasks_lib.Task,
    tokenizer: tokenizers_lib.Tokenizer,
    *,
    max_target_length: int,
    max_source_length: int | None = None,
    batch_size: int | None = None,
    tokens_per_batch: int | None = None,
    length_policy: str = "drop",
    packing: bool = False,
    num_epochs: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    image_size: tuple[int, int] | None = None,
    extra_fields: Mapping[str, Sequence[int]] | None = None,
    with_index: bool = False,
    start_batch: int = 0,
    sharding: jax.sharding.Sharding | None = None,
) -> BatchIterator:
    """Builds the input pipeline of one process.

    Args:
      source: random access records (`tfds.data_source(...)`, or any object
        with __len__ and __getitem__ returning dicts).
      task: how records become inputs (`tasks.task_from_config`).
      tokenizer: turns the text into ids.
      max_target_length: T, the length of 'targets' rows (eos included).
      max_source_length: S, the length of 'inputs' rows (text tasks only).
      batch_size: global number of rows per batch (all processes together).
      tokens_per_batch: instead of batch_size: global rows =
        tokens_per_batch // max(S, T); with packing every row holds several
        examples, so this bounds the tokens of a step, not the examples.
      length_policy: 'drop' examples longer than the maximum lengths, or
        'truncate' them (eos is kept).
      packing: pack several examples per row (text tasks); adds the
        segmentation / position keys.
      num_epochs: None repeats forever (training); n makes n passes, each
        padded to whole global batches (evaluation). Every process yields the
        same number of batches; with packing, each process tokenises the whole
        split once more to count them (see the module docstring).
      shuffle: reshuffle (seeded) at every epoch.
      seed: seed of shuffling, packing and caption choice.
      process_index: this process, default `jax.process_index()`.
      process_count: number of processes, default `jax.process_count()`.
      worker_count: number of worker processes (0 = none, read in threads);
        at most 1 for packed evaluation, whose batch count is computed for one
        stream of rows (several workers would each pack a slice).
      worker_buffer_size: batches each worker keeps ready.
      image_size: (H, W) to which images are resized; needed when images differ
        in size.
      extra_fields: record fields to carry along for evaluation, each padded
        with -1 to the given shape, e.g. {'boxes': (5, 4)}; not with packing.
      with_index: add 'index' [B] int32, the source index of each row's record
        (-1 for a row without one), e.g. to look up every reference caption
        of an image in evaluation; not with packing.
      start_batch: begin at this global batch of the stream (the number of
        batches a run has consumed), without reading the ones before: resumes
        a run on a different number of processes, whose iterator states do
        not carry over. Not with packing (a process's packed rows depend on
        every example it packed before).
      sharding: if given, batches come as global `jax.Array`s with this sharding
        (see `to_global_batch`); else as this process's numpy arrays.

    Returns:
      A checkpointable iterator over batches.

    Raises:
      ValueError / KeyError naming the wrong argument or record field, before
      any data is read beyond the first record.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    text_task = isinstance(task, tasks_lib.TextPairTask)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    if length_policy not in LENGTH_POLICIES:
        raise ValueError(f"length_policy={length_policy!r}, expected one of {LENGTH_POLICIES}.")
    if text_task and (max_source_length is None or max_source_length < 2):
        raise ValueError(
            f"Dataset {task.dataset!r}: max_source_length must be >= 2, got {max_source_length}."
        )
    if not text_task:
        if max_source_length is not None:
            raise ValueError(f"Dataset {task.dataset!r} has images: max_source_length is unused.")
        if packing:
            raise ValueError(f"Dataset {task.dataset!r}: packing applies only to text tasks.")
    if max_target_length < 2:
        raise ValueError(f"max_target_length must be >= 2, got {max_target_length}.")
    if (extra_fields or with_index) and packing:
        raise ValueError("extra_fields and with_index cannot be carried through packing.")
    if packing and num_epochs is not None and worker_count > 1:
        raise ValueError(
            f"worker_count={worker_count}: packed evaluation (num_epochs={num_epochs}) "
            "supports at most 1 worker process, so that every process can count its batches."
        )
    if (batch_size is None) == (tokens_per_batch is None):
        raise ValueError("Give exactly one of batch_size and tokens_per_batch.")
    if tokens_per_batch is not None:
        batch_size = tokens_per_batch // max(max_source_length or 0, max_target_length)
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"The global batch has {batch_size} rows, which must be a positive multiple of "
            f"process_count={process_count}."
        )
    if start_batch < 0 or (start_batch and packing):
        raise ValueError(
            f"start_batch={start_batch}: must be >= 0, and 0 with packing (packed rows "
            "depend on every example packed before them)."
        )
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be None or >= 1, got {num_epochs}.")
    if len(source) == 0:
        raise ValueError(f"Dataset {task.dataset!r}: the source is empty.")
    task.check_record(source[0])
    for name in extra_fields or {}:
        if name not in source[0]:
            raise KeyError(f"Dataset {task.dataset!r}: no field {name!r} for extra_fields.")
    if length_policy == "drop":
        _check_lengths(source, task, tokenizer, max_source_length, max_target_length)
    local_batch_size = batch_size // process_count
    training = num_epochs is None

    preprocess = _Preprocess(
        source=source,
        task=task,
        tokenizer=tokenizer,
        max_source_length=max_source_length or 0,
        max_target_length=max_target_length,
        length_policy=length_policy,
        pad=not packing,
        # An empty example would take a whole packed row: packing drops them
        # (and packed evaluation evens out the processes with empty batches).
        drop_as_empty=not packing,
        # Training keeps its batches full; evaluation scores every example it
        # keeps exactly once.
        replacement_attempts=_REPLACEMENT_ATTEMPTS if training and not packing else 0,
        image_size=tuple(image_size) if image_size is not None else None,
        extra_fields=tuple((k, tuple(v)) for k, v in (extra_fields or {}).items()),
        with_index=with_index,
    )
    shard_rows = functools.partial(
        _process_rows,
        num_records=len(source),
        process_count=process_count,
        preprocess=preprocess,
        num_epochs=num_epochs,
        shuffle=shuffle,
        seed=seed,
        packed_lengths=(
            {"inputs": max_source_length, "targets": max_target_length} if packing else None
        ),
        global_batch_size=batch_size,
    )
    dataset = shard_rows(process_index, start_batch=start_batch)
    missing_batches = 0
    if packing and not training:
        # How many rows a process's examples pack into depends on their
        # lengths. Every process packs the examples of every process
        # (tokenising, not training on, the whole evaluation split) to learn
        # the largest count, and pads up to it with empty batches, so all
        # processes run the same number of steps.
        counts = [
            math.ceil(sum(1 for _ in shard_rows(shard)) / local_batch_size)
            for shard in range(process_count)
        ]
        missing_batches = max(counts) - counts[process_index]
    dataset = dataset.batch(local_batch_size, drop_remainder=training)
    if not training:
        dataset = dataset.map(functools.partial(_pad_batch, rows=local_batch_size))
    if missing_batches:
        empty = _empty_packed_batch(local_batch_size, max_source_length, max_target_length)
        filler = grain.MapDataset.source([empty]).repeat(missing_batches)
        # cycle_length=1 chains the datasets: this shard's batches, then the filler.
        dataset = grain.experimental.InterleaveIterDataset([dataset, filler], cycle_length=1)
    if worker_count > 0:
        # grain's workers read absl flags; outside absl.app (tests, notebooks)
        # nothing has parsed them, so take their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=worker_count, per_worker_buffer_size=worker_buffer_size
            )
        )
    return BatchIterator(dataset, sharding)


def build_or_load_task_tokenizer(
    kind: str,
    directory: str,
    task: tasks_lib.Task,
    train_source: Sequence[Mapping[str, Any]],
    vocab_size: int | None = None,
    *,
    max_sentences: int = 1_000_000,
) -> tokenizers_lib.Tokenizer:
    """Loads the run's tokenizer from `directory`, or builds it from the training split.

    The character vocabulary reads every training record; SentencePiece reads
    up to `max_sentences` records spread over the split (source and target
    text share one vocabulary, as in the Flax WMT example).
    """
    max_records = len(train_source) if kind == "char" else max_sentences
    return tokenizers_lib.build_or_load_tokenizer(
        kind,
        directory,
        lambda: tasks_lib.sample_texts(task, train_source, max_records),
        vocab_size,
        max_sentences=2 * max_sentences,
    )
