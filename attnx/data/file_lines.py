"""The user's files, line by line: which files a path or glob names, and their lines as text.

Every problem is a `RunError` whose message starts with `FILE:LINE:` (or
`FILE:` for the whole file), so the command line shows one line that points
at it. Nothing is skipped or repaired: an empty line is an error, not a line
to drop, since dropping a line of one of two parallel files would silently
misalign every pair after it. The only things removed are line ends (`\\n`
or `\\r\\n`) and a UTF-8 byte order mark at the start of a file, which are
not text.
"""

from __future__ import annotations

import codecs
import glob
import os
from collections.abc import Iterator

from attnx.errors import RunError


def resolve(path: str) -> str:
    """`path` made absolute against the current directory (`~` expanded).

    `config.task.files.*` keys are not named `*_path`, so the entry point does
    not resolve them; attnx never changes directory, so resolving them here,
    when the files are opened, gives the directory the command started in.
    """
    return os.path.abspath(os.path.expanduser(path))


def _is_glob(path: str) -> bool:
    return any(char in path for char in "*?[")


def match_files(pattern: str) -> list[str]:
    """The files that a path or a glob ('data/train-*.tsv') names: absolute, sorted.

    A glob may match several files, read in sorted order; a plain path names
    one file. Returns [] when nothing matches (a missing file, a directory).
    """
    path = resolve(pattern)
    if _is_glob(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    return [path] if os.path.isfile(path) else []


def why_nothing_matches(pattern: str) -> str:
    """The reason `match_files(pattern)` is empty, for an error message."""
    path = resolve(pattern)
    if _is_glob(path):
        return f"no file matches {path}"
    if os.path.isdir(path):
        return f"{path} is a directory, not a file"
    return f"no such file {path}"


def read_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yields (line number from 1, text without its line end) of every line of a UTF-8 file.

    Raises:
      RunError: `FILE:LINE: ...` for invalid UTF-8 and for an empty (or blank)
        line; `FILE: ...` for a file that cannot be read or holds no line.
    """
    try:
        handle = open(path, "rb")  # bytes: a bad byte is reported with its line
    except OSError as error:
        raise RunError(f"{path}: cannot read it: {error.strerror or error}") from error
    number = 0
    with handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise RunError(
                    f"{path}:{number}: invalid UTF-8 at byte {error.start + 1} of the line "
                    f"({raw[error.start : error.start + 4]!r}); the file must be UTF-8 text"
                ) from None
            if not text.strip():
                raise RunError(
                    f"{path}:{number}: empty line (every line must hold an example; remove it "
                    "from the file, and from its parallel file if it has one)"
                )
            yield number, text
    if number == 0:
        raise RunError(f"{path}: the file is empty")
