"""Which split an example of a bundled dataset belongs to, from a stable hash of its key."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def split_of(key: str, fractions: Sequence[tuple[str, float]]) -> str:
    """The split that `key` (a source string, a number written in digits) belongs to.

    `fractions` are (split name, fraction) pairs summing to 1. The position of
    the key in [0, 1) comes from BLAKE2b, which, unlike `hash()`, does not
    change between processes, so a dataset prepares the same way everywhere.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    position = int.from_bytes(digest, "big") / 2.0**64
    cumulative = 0.0
    for name, fraction in fractions:
        cumulative += fraction
        if position < cumulative:
            return name
    return fractions[-1][0]
