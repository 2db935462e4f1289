"""Imports the user's own TFDS builder module (`config.task.builder_module`).

Defining a `tfds.core.GeneratorBasedBuilder` subclass registers it with TFDS
under its name (the class name in snake_case, or its `name` attribute), so
once its module is imported, `config.task.dataset` can name it like any TFDS
dataset. The module is given as a module path ('my_project.my_dataset', found
on sys.path) or as a file ('path/to/my_dataset.py', relative to the current
directory). Importing is idempotent: a module already imported is not
imported again (TFDS refuses to register a name twice).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from types import ModuleType

from etils import epath

KEY = "config.task.builder_module"


def _is_file(spec: str) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def _imported_from(path: str) -> ModuleType | None:
    """A module of sys.modules loaded from `path`, if any."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and os.path.realpath(file) == path:
            return module
    return None


def _import_file(spec: str) -> ModuleType:
    path = os.path.realpath(os.path.abspath(os.path.expanduser(spec)))
    if not os.path.isfile(path):
        raise ValueError(f"{KEY}={spec!r}: no such file {path}.")
    module = _imported_from(path)
    if module is not None:
        return module
    stem = os.path.splitext(os.path.basename(path))[0]
    name = stem
    if not stem.isidentifier() or stem in sys.modules:
        # Another module already has the file's name: one derived from the path.
        name = f"attnx_builder_{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ValueError(f"{KEY}={spec!r}: {path} is not a Python module.")
    module = importlib.util.module_from_spec(loader_spec)
    # Registered before running, as `import` does (dataclasses and pickling look it up).
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ValueError(
            f"{KEY}={spec!r}: importing {path} failed: {type(error).__name__}: {error}"
        ) from error
    return module


def import_builder_module(spec: str) -> ModuleType:
    """Imports `spec`, a module path or a .py file, and returns the module.

    The builders it defines get their `code_path` set to their file when they
    have none: TFDS 4.9.10 finds the source of a builder inside a package
    through `importlib_resources`, which it does not install on Python >= 3.9
    (attnx's own builders set it the same way).

    Raises:
      ValueError: naming config.task.builder_module, the module and the cause,
        for a module that is not found or fails while it is imported.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{KEY} must be a module path or a .py file, got {spec!r}.")
    module = _import_file(spec) if _is_file(spec) else _import_module(spec)
    for builder in builders_of(module).values():
        if builder.__module__ == module.__name__ and "code_path" not in vars(builder):
            builder.code_path = epath.Path(inspect.getfile(builder))
    return module


def _import_module(spec: str) -> ModuleType:
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as error:
        if error.name and spec.startswith(error.name):
            raise ValueError(
                f"{KEY}={spec!r}: no module named {error.name!r} on sys.path; install the "
                "package that holds it, or give the file (path/to/my_dataset.py)."
            ) from error
        raise ValueError(
            f"{KEY}={spec!r}: importing it failed: {type(error).__name__}: {error}"
        ) from error
    except Exception as error:
        raise ValueError(
            f"{KEY}={spec!r}: importing it failed: {type(error).__name__}: {error}"
        ) from error


def builders_of(module: ModuleType) -> dict[str, type]:
    """The concrete TFDS builders the module defines or imports, by TFDS name."""
    # Imported here: TFDS takes seconds to import, and only a builder module needs it.
    import tensorflow_datasets as tfds

    builders = {}
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and issubclass(value, tfds.core.DatasetBuilder)
            and not inspect.isabstract(value)
        ):
            builders[value.name] = value
    return builders
