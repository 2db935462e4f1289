"""Whether a checkpoint step on disk is whole, decided from its files alone.

Orbax commits a step atomically (see `checkpoints.py`): a step directory
`DIR/<step>` exists only once everything was written and renamed into place.
That guards against a run killed mid-save, but not against a file damaged
afterwards (a disk or copy error, a truncated sync, a stray edit). So attnx
adds a checksum manifest to every step, inside the commit:

  DIR/<step>/attnx_checksums.json
      {"version": 1, "algorithm": "crc32",
       "files": {"state/_METADATA": [size, crc32], "data/process_0-of-1.json": [...], ...}}

`ChecksummedTemporaryPath` writes it in Orbax's finalize step, after every
item is written and before the commit marker and the rename, so a committed
step always carries it. `find_damage` checks a step against it: a step is
broken only when a listed file is missing, has another size or fails its
checksum, or when a commit marker is missing. A restore that raises on a
step that passes is a bug or a setup problem (a path, a version), never a
reason to move the step aside.

Steps written before attnx kept manifests have none; `find_damage` then
checks only the commit markers, and says so (`has_manifest`).
"""

from __future__ import annotations

import asyncio
import json
import os
import zlib
from collections.abc import Iterable

import orbax.checkpoint as ocp

MANIFEST = "attnx_checksums.json"
# Orbax writes this marker into a step directory (and each item directory)
# before committing it, on local disks and on object stores alike.
COMMIT_MARKER = "commit_success.txt"
# Orbax rewrites its step metadata (the commit time) after the manifest is
# taken; it is checked for being readable JSON instead.
STEP_METADATA = "_CHECKPOINT_METADATA"
_NOT_LISTED = {MANIFEST, COMMIT_MARKER, STEP_METADATA}
_CHUNK = 1 << 22


def _crc32(path: str) -> int:
    value = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            value = zlib.crc32(chunk, value)
    return value


def _files(step_dir: str) -> list[str]:
    """Every file under `step_dir`, as sorted relative paths, except the unlisted top-level ones."""
    found = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            relative = os.path.relpath(os.path.join(root, name), step_dir)
            if relative not in _NOT_LISTED:
                found.append(relative)
    return sorted(found)


def write_manifest(step_dir: str) -> None:
    """Writes the manifest of every file now in `step_dir` (a step's temporary directory)."""
    files = {}
    for relative in _files(step_dir):
        path = os.path.join(step_dir, relative)
        files[relative] = [os.path.getsize(path), _crc32(path)]
    manifest = {"version": 1, "algorithm": "crc32", "files": files}
    tmp = os.path.join(step_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, MANIFEST))


class ChecksummedTemporaryPath(ocp.path.atomicity.AtomicRenameTemporaryPath):
    """Orbax's atomic-rename commit, with the checksum manifest written just before it.

    Orbax uses one temporary-path class for the step directory and for each
    item inside it; the manifest belongs to the step (named by a number) only.
    """

    async def finalize(self) -> None:
        if self.get_final().name.isdigit():
            await asyncio.to_thread(write_manifest, os.fspath(self.get()))
        await super().finalize()


def has_manifest(step_dir: str) -> bool:
    return os.path.isfile(os.path.join(step_dir, MANIFEST))


def find_damage(
    step_dir: str,
    items: Iterable[str],
    *,
    shard: tuple[int, int] = (0, 1),
) -> str | None:
    """Why the step in `step_dir` is broken, naming the file; None if it is whole.

    Args:
      step_dir: a committed step directory, `DIR/<step>`.
      items: the item subdirectories every step has (each with its own commit marker).
      shard: `(index, count)`: check the checksums of every count-th listed file
        starting at index, so that several processes share the reading.
    """
    if not os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
        return f"{step_dir} has no commit marker ({COMMIT_MARKER}): it was never fully written"
    for item in items:
        if not os.path.isfile(os.path.join(step_dir, item, COMMIT_MARKER)):
            return f"item '{item}' is missing or uncommitted in {step_dir}"
    metadata = os.path.join(step_dir, STEP_METADATA)
    if os.path.exists(metadata):
        try:
            with open(metadata, encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as error:
            return f"{metadata} is not readable JSON ({type(error).__name__})"
    manifest_path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(manifest_path):
        return None
    try:
        with open(manifest_path, encoding="utf-8") as f:
            listed = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{manifest_path} is not a readable manifest ({type(error).__name__})"
    index, count = shard
    for position, (relative, (size, crc)) in enumerate(sorted(listed.items())):
        path = os.path.join(step_dir, relative)
        if not os.path.isfile(path):
            return f"{path} is missing"
        actual = os.path.getsize(path)
        if actual != size:
            return f"{path} has {actual} bytes, {size} when it was saved (truncated or overwritten)"
        if position % count == index and _crc32(path) != crc:
            return f"{path} fails its checksum (its bytes changed after it was saved)"
    return None
