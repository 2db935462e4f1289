"""What a checkpoint step holds besides Orbax's pytree: per-process JSON, names, targets.

ProcessJsonHandler   the `data` item: every process saves and restores its own
                     JSON dict (its data iterator's position).
config_hash          the short hash of an experiment config stored in `meta`.
abstract_target      a restore target's leaves as shape, dtype and sharding.
check_target         a restore target against a step's stored tree, so that a
                     changed model is named as such instead of failing deep in
                     Orbax (and is never taken for a broken checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class ProcessJsonHandler(ocp.CheckpointHandler):
    """Each process saves and restores its own JSON dict: `process_<i>-of-<n>.json`."""

    def save(self, directory: epath.Path, args: ProcessJsonSave) -> None:
        directory = epath.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / _process_file_name()).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: ProcessJsonRestore | None = None) -> Any:
        """This process's dict, or None when another number of processes wrote it."""
        path = epath.Path(directory) / _process_file_name()
        if path.exists():
            return json.loads(path.read_text())
        written = sorted(p.name for p in epath.Path(directory).glob("process_*.json"))
        if not written:
            raise FileNotFoundError(f"no per-process JSON files in {directory}")
        # Another process count's positions mean nothing to this process's
        # iterator; the caller repositions the data by the step instead.
        logging.warning(
            "checkpoint: the data iterator state in %s was written by other processes (%s); "
            "this run has %d processes.",
            directory,
            written[0],
            jax.process_count(),
        )
        return None


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
    state: Mapping[str, Any]


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
    pass


def _process_file_name() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def config_hash(config: Any) -> str:
    """A short, stable hash of an experiment config (ConfigDict or mapping)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(as_dict, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def attnx_version() -> str:
    try:
        return importlib.metadata.version("attnx")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def path_name(path: tuple[Any, ...]) -> str:
    """Orbax's name for a pytree leaf: its keys joined by dots (`opt_state.0.mu.w`)."""
    parts = []
    for key in path:
        for field in ("key", "name", "idx"):
            if hasattr(key, field):
                parts.append(str(getattr(key, field)))
                break
        else:
            parts.append(str(key))
    return ".".join(parts)


def abstract_target(leaf: Any) -> jax.ShapeDtypeStruct:
    """The restore target of one leaf: shape, dtype and the sharding to place it on."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"restore: every target leaf needs a sharding (got {leaf!r}); pass jax.Arrays or "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...)"
        )
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)


def _stored_shape_dtype(leaf: jax.ShapeDtypeStruct) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype as Orbax stores the leaf (typed PRNG keys are stored as key data)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    return tuple(leaf.shape), np.dtype(leaf.dtype)


def check_target(step: int, abstract: Any, metadata: Any) -> None:
    """Raises ValueError naming the first leaf whose name, shape or dtype differs."""
    stored = {
        leaf.name: leaf
        for leaf in jax.tree.leaves(metadata.tree)
        if hasattr(leaf, "name") and hasattr(leaf, "shape")
    }
    wanted = {path_name(path): leaf for path, leaf in jax.tree.leaves_with_path(abstract)}
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    if missing or extra:
        raise ValueError(
            f"checkpoint step {step} does not match the restore target: leaves only in "
            f"the target: {missing[:5]}; only in the checkpoint: {extra[:5]}"
        )
    for name, leaf in wanted.items():
        shape, dtype = _stored_shape_dtype(leaf)
        have = stored[name]
        if tuple(have.shape) != shape or np.dtype(have.dtype) != dtype:
            raise ValueError(
                f"checkpoint step {step}: '{name}' is {have.dtype}{list(have.shape)} in "
                f"the checkpoint but {dtype}{list(shape)} in the restore target"
            )
