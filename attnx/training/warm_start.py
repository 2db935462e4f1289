"""Starting a run from another run's parameters (`config.train.warm_start_dir`).

Fine-tuning, as fairseq's `--finetune-from-model`: the new run's parameters
are read from a checkpoint in another workdir, while its step, optimizer
state, random numbers, loss-term state and data position start fresh. E.g.
hard attention initialised from a soft-attention run of the same captioner
(`experiments/digits_spatial.py:hard`).

Only a run with no checkpoint of its own warm-starts: a resumed run
continues from its own newest checkpoint, so a preemption never sends it
back to the source, and a source deleted after the start does not matter.

Which step of the source: `config.train.warm_start_step` when set, else the
source run's best step by its own `checkpoint.best_metric` (read from its
config.json), else its newest step. Nothing in the source is written.
"""

from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from attnx.errors import RunError
from attnx.training import checkpoint_integrity as integrity
from attnx.training.checkpoint_items import ProcessJsonRestore, abstract_target, path_name

# The checkpoint's items (as `checkpoints` names them) and the subtree of the
# train state that a warm start reads.
STATE_ITEM, DATA_ITEM, META_ITEM = "state", "data", "meta"
PARAMS = "params"


@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint step of another run to take parameters from."""

    workdir: str  # The source run's workdir.
    step: int

    @property
    def directory(self) -> str:
        return os.path.join(self.workdir, "checkpoints")

    @property
    def step_dir(self) -> str:
        return os.path.join(self.directory, str(self.step))


def _committed_steps(directory: str) -> list[int]:
    """The committed steps in a checkpoints directory (half-written ones have no marker)."""
    if not os.path.isdir(directory):
        return []
    return sorted(
        int(name)
        for name in os.listdir(directory)
        if name.isdigit() and os.path.exists(os.path.join(directory, name, integrity.COMMIT_MARKER))
    )


def _best_step(workdir: str, steps: list[int]) -> int | None:
    """The source run's best step by its own best metric, from its config.json and metrics."""
    try:
        with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
            checkpoint = json.load(f).get("checkpoint", {})
    except (OSError, ValueError):
        return None
    metric, mode = checkpoint.get("best_metric"), checkpoint.get("best_mode", "max")
    if not metric:
        return None
    scored = {}
    for step in steps:
        path = os.path.join(workdir, "checkpoints", str(step), "metrics", "metrics")
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get(metric)
        except (OSError, ValueError):
            continue
        if isinstance(value, int | float):
            scored[step] = float(value)
    if not scored:
        return None
    pick = max if mode == "max" else min
    # Ties go to the later step, as Orbax's BestN keeps it.
    return pick(sorted(scored), key=lambda s: (scored[s], s) if mode == "max" else (scored[s], -s))


def find_source(config: Any, own_checkpoints: str) -> Source | None:
    """The step this run warm-starts from, or None (not asked for, or resuming).

    Called before anything expensive is built, so that a wrong directory or
    step stops the run at once.

    Args:
      config: the experiment config (`train.warm_start_dir`, `train.warm_start_step`).
      own_checkpoints: this run's checkpoints directory.

    Raises:
      RunError: the experiment requires a source and none is given (the key is
        None), or the source has no committed checkpoint, or not the step asked
        for, or is this run's own workdir.
    """
    workdir = config.train.get("warm_start_dir", "")
    if workdir == "":
        return None
    if _committed_steps(own_checkpoints):
        logging.info(
            "train.warm_start_dir=%s is not read: this run resumes from its own checkpoints.",
            workdir,
        )
        return None
    if workdir is None:
        # An experiment that only makes sense as a fine-tuning leaves the key unset
        # (a placeholder), so that it cannot silently train from scratch.
        raise RunError(
            "config.train.warm_start_dir is required by this experiment (it fine-tunes "
            "another run: see the experiment's docstring for the run to start from); "
            "pass --config.train.warm_start_dir=<that run's workdir>"
        )
    directory = os.path.join(workdir, "checkpoints")
    if os.path.realpath(directory) == os.path.realpath(own_checkpoints):
        raise RunError(
            f"config.train.warm_start_dir={workdir} is this run's own workdir; give "
            "another run's workdir (a run resumes from its own checkpoints by itself)"
        )
    steps = _committed_steps(directory)
    if not steps:
        raise RunError(
            f"config.train.warm_start_dir={workdir}: no committed checkpoint in {directory}"
        )
    wanted = int(config.train.get("warm_start_step") or 0)
    if wanted:
        if wanted not in steps:
            raise RunError(
                f"config.train.warm_start_step={wanted}: no such step in {directory} "
                f"(steps: {steps})"
            )
        step = wanted
    else:
        best = _best_step(workdir, steps)
        step = steps[-1] if best is None else best
    return Source(workdir, step)


def adopt_vocabulary(source: Source, vocab_dir: str) -> None:
    """Copies the source run's vocabulary into this run's `vocab_dir`.

    The embedding and output rows are the source's token ids, so the new run
    must read text with the source's vocabulary, not one built anew (a
    SentencePiece model trained again differs). A vocabulary this run already
    has is kept if it is the same, and is an error if not (it is never replaced).

    Raises:
      RunError: this run's vocabulary differs from the source's.
    """
    source_vocab = os.path.join(source.workdir, "vocab")
    if not os.path.isdir(source_vocab):
        logging.warning(
            "Warm start: %s has no vocab directory; this run builds its own, which must "
            "give the same token ids as the source run's.",
            source.workdir,
        )
        return
    if not os.path.exists(vocab_dir):
        staging = f"{vocab_dir}.warm-start-{os.getpid()}"
        shutil.copytree(source_vocab, staging)
        try:
            os.rename(staging, vocab_dir)
        except OSError:
            shutil.rmtree(staging)  # Another process of this run copied it first.
            if not os.path.exists(vocab_dir):
                raise
        logging.info("Warm start: the vocabulary of %s copied to %s.", source.workdir, vocab_dir)
    differing = filecmp.dircmp(source_vocab, vocab_dir)
    if differing.left_only or differing.right_only or differing.diff_files:
        raise RunError(
            f"config.train.warm_start_dir={source.workdir}: this run's vocabulary {vocab_dir} "
            f"differs from the source's {source_vocab} (files {differing.diff_files or '-'}, "
            f"only in the source {differing.left_only or '-'}, only here "
            f"{differing.right_only or '-'}); the parameters' token rows would mean other "
            "tokens: start in a new workdir, or move the vocab directory aside"
        )


def restore_params(source: Source, target: Any) -> Any:
    """The source step's parameters, placed like `target` (this run's parameters).

    Args:
      source: from `find_source`.
      target: this run's parameter tree (jax.Arrays with shardings); the
        result has its structure, and each leaf its shape, dtype and sharding.

    Raises:
      RunError: the step's files are damaged, or its parameters do not match this
        model (naming the first parameter that differs: a different model config).
    """
    problem = integrity.find_damage(
        source.step_dir, (STATE_ITEM,), shard=(jax.process_index(), jax.process_count())
    )
    if problem:
        raise RunError(f"config.train.warm_start_dir: step {source.step} is damaged: {problem}")
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore)
    # Registered only so that Orbax does not warn that it leaves them unread.
    registry.add(DATA_ITEM, ProcessJsonRestore)
    registry.add(META_ITEM, ocp.args.JsonRestore)
    manager = ocp.CheckpointManager(
        source.directory,
        options=ocp.CheckpointManagerOptions(
            read_only=True, create=False, enable_async_checkpointing=False
        ),
        handler_registry=registry,
    )
    try:
        stored = manager.item_metadata(source.step)[STATE_ITEM].tree[PARAMS]
        wanted = {
            path_name(path): abstract_target(leaf)
            for path, leaf in jax.tree.leaves_with_path(target)
        }
        have = {path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(stored)}
        _check_match(source, wanted, have)
        # The stored tree's own structure, each leaf placed as this run places it.
        abstract = jax.tree.map_with_path(lambda path, _: wanted[path_name(path)], stored)
        restored = manager.restore(
            source.step,
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.PyTreeRestore(
                        item={PARAMS: abstract},
                        # This run's shardings, not the source's (another topology).
                        restore_args=ocp.checkpoint_utils.construct_restore_args(
                            {PARAMS: abstract}
                        ),
                        partial_restore=True,
                    )
                }
            ),
        )[STATE_ITEM][PARAMS]
    finally:
        manager.close()
    by_name = {path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(restored)}
    logging.info(
        "Warm start: %d parameter arrays from step %d of %s.",
        len(by_name),
        source.step,
        source.directory,
    )
    return jax.tree.map_with_path(lambda path, _: by_name[path_name(path)], target)


def _check_match(source: Source, wanted: dict[str, Any], have: dict[str, Any]) -> None:
    where = f"config.train.warm_start_dir: step {source.step} of {source.directory}"
    missing, extra = sorted(set(wanted) - set(have)), sorted(set(have) - set(wanted))
    if missing or extra:
        raise RunError(
            f"{where} holds other parameters than this model (only in this model: "
            f"{missing[:5]}; only in the checkpoint: {extra[:5]}): the model config "
            "differs from the source run's (see its config.json)"
        )
    for name, leaf in wanted.items():
        shape, dtype = tuple(have[name].shape), have[name].dtype
        if shape != tuple(leaf.shape) or str(dtype) != str(leaf.dtype):
            raise RunError(
                f"{where}: parameter '{name}' is {dtype}{list(shape)} there but "
                f"{leaf.dtype}{list(leaf.shape)} in this model: the model config differs "
                "from the source run's (see its config.json)"
            )
