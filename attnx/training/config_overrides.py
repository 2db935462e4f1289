"""Setting config fields by name: the command line's `--config.k=v` and a sweep's trials.

Both go through `apply_overrides(config, {key: value})`, so whatever a user
can set on the command line a sweep can vary, with the same checks:

* `model.name` and `model.preset` come first: a new architecture (or preset)
  replaces the whole `config.model` section with every field of that
  architecture, sized for the experiment's task (`model_section`), so that
  `--config.model.name=rnn --config.model.hidden_dim=64` works on an
  experiment written for the Transformer. The experiment's own model fields,
  which were for the other architecture, are dropped; its preset is kept
  when the new architecture has one of that name ('tiny', 'small').
* every other key must exist; a value given as text (the command line) is
  parsed by the type of the field it sets (a bool, int, float, str or tuple;
  'None' clears a field that may be unset); a typed value (a sweep) must fit it.

Errors are ValueErrors naming the key, with the nearest existing key when it
looks like a typo.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_path

from attnx.layers.attention_config import AttentionConfig
from attnx.models import model_section, spec_of

# Applied before every other key: they choose what the model section holds.
MODEL_CHOICES = ("model.name", "model.preset")


def _placeholder_type(annotation: Any) -> type | None:
    """The single simple type in `X | None` (int, float, str, bool, tuple), else None."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        inner = args[0]
        if inner in (int, float, str, bool):
            return inner
        if inner is tuple or typing.get_origin(inner) is tuple:
            return tuple
    return None


def _section_dict(values: Mapping[str, Any], dataclass_type: type) -> ml_collections.ConfigDict:
    """A ConfigDict of `values`, unset fields typed by `dataclass_type`'s annotations."""
    hints = typing.get_type_hints(dataclass_type)
    section = ml_collections.ConfigDict()
    for key, value in values.items():
        if value is None and _placeholder_type(hints.get(key)) is not None:
            value = config_dict.placeholder(_placeholder_type(hints[key]))
        elif key == "attention" and isinstance(value, Mapping):
            value = _section_dict(value, AttentionConfig)
        section[key] = value
    return section


def model_config_dict(section: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """`config.model` from a `model_section(...)` dict, with typed unset fields."""
    spec = spec_of(section["name"])
    model = _section_dict({k: v for k, v in section.items() if k != "preset"}, spec.config)
    model.preset = config_dict.placeholder(str)
    model.preset = section.get("preset")
    return model


def task_lengths(config: ml_collections.ConfigDict) -> dict[str, int | None]:
    """The task's longest source and target, which size position tables."""
    return {
        "source": config.task.get("max_source_length"),
        "target": config.task.get("max_target_length"),
    }


def switch_model(config: ml_collections.ConfigDict, name: str, preset: str | None) -> None:
    """Replaces `config.model` with every field of architecture `name` at `preset`."""
    spec = spec_of(name)
    if preset is not None and preset not in spec.presets:
        raise ValueError(
            f"config.model.preset={preset!r} is not a preset of the {name}; give "
            f"--config.model.preset=one of {sorted(spec.presets)}"
        )
    section = model_section(name, preset, lengths=task_lengths(config))
    model = model_config_dict(section)
    with config.unlocked():
        config.model = model
    if config.is_locked:
        config.lock()


def set_model(
    config: ml_collections.ConfigDict, name: str, preset: str | None = None, **fields: Any
) -> None:
    """What an experiment file calls: `config.model` = architecture `name` at `preset`.

    Every field of the architecture is in the section (sized for `config.task`,
    which must be set first), then `fields` are set, e.g.
    `set_model(config, 'transformer', 'small', max_length=64)`; attention keys
    go in a dict, `attention={'normalizer': 'entmax15'}`.
    """
    switch_model(config, name, preset)
    attention = fields.pop("attention", None) or {}
    overrides = {f"model.{key}": value for key, value in fields.items()}
    overrides.update({f"model.attention.{key}": value for key, value in attention.items()})
    apply_overrides(config, overrides)


def _keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            keys += _keys(value, prefix + key + ".")
    return keys


def _no_such_key(config: ml_collections.ConfigDict, key: str) -> ValueError:
    """Names `key` and, when it looks like a typo, the key that was probably meant."""
    parent, _, leaf = key.rpartition(".")
    try:
        section = config_path.get_value(parent, config) if parent else config
        siblings = list(section.keys()) if isinstance(section, ml_collections.ConfigDict) else []
    except (AttributeError, KeyError):
        siblings = []
    # A shortened key ('norm') or a typo among its own section's keys first.
    close = [name for name in siblings if name.startswith(leaf)][:1] or difflib.get_close_matches(
        leaf, siblings, n=1, cutoff=0.6
    )
    if close:
        close = [f"{parent}.{close[0]}" if parent else close[0]]
    else:
        close = difflib.get_close_matches(key, _keys(config), n=1, cutoff=0.75)
    hint = f'; Did you mean "{close[0]}"?' if close else ""
    return ValueError(f"config.{key} is not a config key{hint}")


def _field_type(config: ml_collections.ConfigDict, key: str) -> type:
    try:
        return config_path.get_type(key, config)
    except (AttributeError, KeyError):
        raise _no_such_key(config, key) from None


def parse_value(config: ml_collections.ConfigDict, key: str, text: str) -> Any:
    """`text` (a command line's value) as the type of the field `key` holds."""
    field_type = config_path.normalize_type(_field_type(config, key))
    optional = config_path.is_optional(key, config)
    if optional and text in ("None", "none"):
        return None
    try:
        if field_type is bool:
            return flags.BooleanParser().parse(text)
        if field_type is int:
            return flags.IntegerParser().parse(text)
        if field_type is float:
            return flags.FloatParser().parse(text)
        if field_type is str:
            return text
        if field_type is tuple or config_path.get_origin(field_type) is tuple:
            value = ast.literal_eval(text)
            return tuple(value) if isinstance(value, list | tuple) else (value,)
        if issubclass(field_type, ml_collections.ConfigDict):
            raise ValueError(f"config.{key} is a section; set its keys (config.{key}.X=...)")
    except (ValueError, SyntaxError) as error:
        raise ValueError(
            f"config.{key}={text!r} is not a {field_type.__name__}: {' '.join(str(error).split())}"
        ) from None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    _field_type(config, key)  # An unknown key, named.
    try:
        config_path.set_value(key, config, value)
    except (AttributeError, KeyError):
        raise _no_such_key(config, key) from None
    except TypeError as error:
        raise ValueError(f"config.{key}={value!r}: {' '.join(str(error).split())}") from None


def apply_overrides(
    config: ml_collections.ConfigDict,
    overrides: Mapping[str, Any],
    *,
    from_text: bool = False,
) -> dict[str, Any]:
    """Sets `overrides` (dotted key -> value) on `config` in place; returns the typed values.

    Args:
      config: an experiment config (locked or not).
      overrides: e.g. `{'model.name': 'rnn', 'model.hidden_dim': 64}`.
      from_text: the values are command-line text, parsed by each field's type.

    Raises:
      ValueError: naming the first key that does not exist or whose value does not fit.
    """
    applied: dict[str, Any] = {}
    choices = {key: overrides[key] for key in MODEL_CHOICES if key in overrides}
    if choices:
        name = str(choices.get("model.name", config.model.name))
        if "model.preset" in choices:
            preset = choices["model.preset"]
            preset = None if preset in (None, "None", "none") else str(preset)
        else:
            # The experiment's size carries over where the new architecture has it.
            preset = config.model.get("preset")
            if (
                name != config.model.name
                and preset is not None
                and preset not in spec_of(name).presets
            ):
                raise ValueError(
                    f"config.model.name={name!r}: the experiment's preset {preset!r} is not a "
                    f"preset of the {name}; add --config.model.preset=one of "
                    f"{sorted(spec_of(name).presets)}"
                )
        if name != config.model.name or preset != config.model.get("preset"):
            switch_model(config, name, preset)
        applied.update(
            {"model.name": name, **({"model.preset": preset} if "model.preset" in choices else {})}
        )
    for key, value in overrides.items():
        if key in MODEL_CHOICES:
            continue
        if from_text and isinstance(value, str):
            value = parse_value(config, key, value)
        _set(config, key, value)
        applied[key] = value
    return applied


def attention_keys() -> list[str]:
    """The keys of `config.model.attention`, for messages and docs."""
    return [field.name for field in dataclasses.fields(AttentionConfig)]
