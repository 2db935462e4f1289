"""attnx.models: the four architectures, behind one seq2seq interface.

`encode(src, train)`, `decode(tgt_in, encoded, train)`, `__call__`, and
incremental decoding through `init_cache(encoded, max_length)` /
`decode_step(tokens)`, so that `attnx.decoding` serves all four.

`make_model_config` and `build_model` turn an experiment's `config.model`
section (a name, an optional preset and field overrides) into a model.
"""

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from attnx.layers.attention_config import AttentionConfig
from attnx.models import (
    caption_loss_terms,
    captioner_config,
    convs2s_config,
    rnn_config,
    transformer_config,
)
from attnx.models.captioner import Captioner
from attnx.models.convs2s import ConvS2S
from attnx.models.loss_terms import LossTerms
from attnx.models.rnn import RNNEncoderDecoder
from attnx.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture from a config section, and what it needs.

    Attributes:
      module / config: the `nnx.Module` and its config dataclass.
      presets: named constructors of the config dataclass. 'tiny' (tests and
        smoke runs) and 'small' (the bundled tasks on a few CPU cores) exist
        for every architecture, so that switching `config.model.name` keeps
        the experiment's size.
      source_vocab_field / target_vocab_field: the dataclass fields that get
        the tokenizers' vocabulary sizes.
      source_kind: 'text' or 'image', what `encode` reads; a task must provide it.
      packing: whether the model takes packed rows (segment ids and positions).
      length_fields: dataclass fields sized from the task: name -> which task
        lengths bound it ('source', 'target' or 'both').
      loss_terms: `loss_terms(model_config, config.train) -> LossTerms | None`,
        what the architecture adds to the token cross-entropy and the extra
        train state those terms carry (`attnx.models.loss_terms`); None for
        the token loss alone.
      train_keys: the `config.train` keys only this architecture's loss terms
        read (e.g. the captioner's `attention_penalty`); another architecture
        refuses them when they are set.
      width: the attribute of the config dataclass giving the model's width,
        the d_model of the Transformer's learning-rate schedule (Vaswani et al.
        eq. 3), which any architecture may train with.
      source_embedding: the dotted path, from the model, of the source token
        table (a `[vocab, dim]` parameter the encoder reads by `jnp.take` or
        `nnx.Embed`), e.g. 'encoder.embedding'; None for a source that is not
        tokens (an image). Attribution methods differentiate with respect to
        the embedded source through it (`attnx.interpret.attribution`).
    """

    module: type[nnx.Module]
    config: type
    presets: Mapping[str, Callable[..., Any]]
    source_vocab_field: str | None
    target_vocab_field: str
    source_kind: str = "text"
    packing: bool = False
    length_fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    width: str = "d_model"
    loss_terms: Callable[[Any, Mapping[str, Any]], LossTerms | None] | None = None
    train_keys: tuple[str, ...] = ()
    source_embedding: str | None = None


MODELS: dict[str, ModelSpec] = {
    "transformer": ModelSpec(
        Transformer,
        transformer_config.TransformerConfig,
        {
            "tiny": transformer_config.tiny,
            "small": transformer_config.small,
            "base": transformer_config.transformer_base,
            "big": transformer_config.transformer_big,
        },
        "src_vocab_size",
        "tgt_vocab_size",
        packing=True,
        length_fields={"max_length": "both"},
        source_embedding="source_embedding.embedding",
    ),
    "rnn": ModelSpec(
        RNNEncoderDecoder,
        rnn_config.RNNConfig,
        {
            "tiny": rnn_config.tiny,
            "small": rnn_config.small,
            "rnnsearch50": rnn_config.rnnsearch50,
            "luong_4layer": rnn_config.luong_4layer,
        },
        "src_vocab_size",
        "tgt_vocab_size",
        length_fields={"max_source_length": "source"},
        width="decoder_dim",
        source_embedding="encoder.embedding",
    ),
    "convs2s": ModelSpec(
        ConvS2S,
        convs2s_config.ConvS2SConfig,
        {
            "tiny": convs2s_config.tiny,
            "small": convs2s_config.small,
            "cpu_small": convs2s_config.cpu_small,
            "wmt14_en_de": convs2s_config.convs2s_wmt14_en_de,
            "wmt14_en_fr": convs2s_config.convs2s_wmt14_en_fr,
            "wmt16_en_ro": convs2s_config.convs2s_wmt16_en_ro,
        },
        "src_vocab_size",
        "tgt_vocab_size",
        length_fields={"max_length": "both"},
        width="embed_dim",
        source_embedding="source_embedding.embedding",
    ),
    "captioner": ModelSpec(
        Captioner,
        captioner_config.CaptionerConfig,
        {
            "tiny": captioner_config.tiny,
            "small": captioner_config.digits_small,
            "digits_small": captioner_config.digits_small,
            "coco_vgg": captioner_config.coco_vgg,
            "coco_features": captioner_config.coco_features,
        },
        None,
        "vocab_size",
        source_kind="image",
        width="hidden_dim",
        loss_terms=caption_loss_terms.caption_loss_terms,
        train_keys=caption_loss_terms.TRAIN_KEYS,
    ),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Config keys of `config.model` that are not fields of the architecture's dataclass.
SECTION_KEYS = ("name", "preset")


def register_model(name: str, spec: ModelSpec) -> None:
    """Adds an architecture: `config.model.name=name` then builds `spec.module`.

    The module follows the seq2seq interface of the module docstring; its
    config dataclass has the vocabulary fields `spec` names and a `mechanism`
    property returning the resolved `AttentionConfig` (see `AttentionSupport`).

    Raises:
      ValueError: `name` is taken.
    """
    if name in MODELS:
        raise ValueError(f"register_model: {name!r} is taken; choose another name")
    MODELS[name] = spec


def spec_of(name: str) -> ModelSpec:
    """The `ModelSpec` of architecture `name`; ValueError naming the choices."""
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name]


def _dtype_name(value: Any) -> Any:
    for name, dtype in _DTYPES.items():
        if value is dtype or (value is not None and jnp.dtype(value) == jnp.dtype(dtype)):
            return name
    return value


def _section_value(value: Any) -> Any:
    if isinstance(value, AttentionConfig):
        return dataclasses.asdict(value)
    return value


def model_section(
    name: str,
    preset: str | None = None,
    *,
    lengths: Mapping[str, int | None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Every field of architecture `name` (its `preset`, else its defaults), as a config section.

    The vocabulary sizes are left None (the tokenizer gives them). `lengths`
    (`{'source': n, 'target': m}`, e.g. the task's maximum lengths) sizes the
    fields that depend on them (learned positions, the location score).
    `overrides` replace fields, e.g. `model_section('transformer', 'small', d_model=64)`.
    """
    spec = spec_of(name)
    if preset is not None and preset not in spec.presets:
        raise ValueError(
            f"config.model.preset={preset!r} for model {name!r}; choose one of {sorted(spec.presets)}"
        )
    config = spec.presets[preset]() if preset is not None else spec.config()
    section: dict[str, Any] = {"name": name, "preset": preset}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in ("dtype", "param_dtype"):
            value = _dtype_name(value)
        section[field.name] = _section_value(value)
    for field in (spec.source_vocab_field, spec.target_vocab_field):
        if field is not None:
            section[field] = None
    lengths = dict(lengths or {})
    for field, which in spec.length_fields.items():
        known = [lengths.get(k) for k in (("source", "target") if which == "both" else (which,))]
        known = [n for n in known if n is not None]
        if known:
            # Room for bos/eos and the longest side.
            section[field] = max(int(section[field] or 0), max(known) + 2)
    unknown = sorted(set(overrides) - set(section))
    if unknown:
        raise ValueError(
            f"config.model.{unknown[0]} is not a field of {spec.config.__name__} (model {name!r})"
        )
    section.update({k: _section_value(v) for k, v in overrides.items()})
    return section


def _convert(name: str, value: Any) -> Any:
    """Config values -> dataclass values: dtype names to dtypes, lists to tuples."""
    if name in ("dtype", "param_dtype") and isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"config.model.{name}={value!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    if isinstance(value, list | tuple):
        return tuple(_convert(name, v) for v in value)
    return value


def _allowed_types(annotation: Any) -> tuple[type, ...] | None:
    """The runtime types a dataclass field annotation admits; None if not checked."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        parts = [_allowed_types(arg) for arg in typing.get_args(annotation)]
        if any(p is None for p in parts):
            return None
        return tuple(t for p in parts for t in p)
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (float, int)
    if annotation in (int, str, bool):
        return (annotation,)
    if origin is tuple or annotation is tuple:
        return (tuple,)
    return None  # Any, dtypes, nested layouts: the dataclass checks them.


def _check_types(spec: ModelSpec, fields: Mapping[str, Any]) -> None:
    hints = typing.get_type_hints(spec.config)
    for name, value in fields.items():
        allowed = _allowed_types(hints.get(name))
        if allowed is None:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False  # True is an int to Python, not to a config.
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = " or ".join(sorted({t.__name__ for t in allowed}))
            raise ValueError(
                f"config.model.{name}={value!r} is a {type(value).__name__}; the "
                f"{spec.config.__name__} field takes {names}"
            )


def make_model_config(
    model_config: Mapping[str, Any],
    *,
    source_vocab_size: int | None,
    target_vocab_size: int,
) -> Any:
    """The architecture's config dataclass from `config.model`.

    `config.model.name` picks the architecture, `config.model.preset` (optional)
    a preset, `config.model.attention` the mechanism (`AttentionConfig`), and
    every other key sets a field of the dataclass. The vocabulary sizes come
    from the tokenizers unless the config sets them; a config vocabulary
    smaller than the tokenizer's is an error. Every error is a ValueError
    naming the key (`config.model.X`).
    """
    fields = dict(model_config)
    spec = spec_of(fields.pop("name", None))
    name = model_config["name"]
    preset = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"config.model.{unknown[0]} is not a field of {spec.config.__name__} "
            f"(model {name!r}); fields: {sorted(known)}"
        )
    attention = fields.pop("attention", None)
    if attention is not None and not isinstance(attention, AttentionConfig):
        attention = dict(attention)
        keys = {f.name for f in dataclasses.fields(AttentionConfig)}
        extra = sorted(set(attention) - keys)
        if extra:
            raise ValueError(
                f"config.model.attention.{extra[0]} is not an attention key; the keys are "
                f"{sorted(keys)}"
            )
        attention = AttentionConfig(**attention)
    for field, needed in (
        (spec.source_vocab_field, source_vocab_size),
        (spec.target_vocab_field, target_vocab_size),
    ):
        if field is None or needed is None:
            continue
        given = fields.get(field)
        if given is None:
            fields[field] = needed
        elif given < needed:
            raise ValueError(
                f"config.model.{field}={given} is smaller than the tokenizer's vocabulary "
                f"of {needed} tokens"
            )
    fields = {key: _convert(key, value) for key, value in fields.items()}
    _check_types(spec, fields)
    if attention is not None:
        fields["attention"] = attention
    if preset is not None and preset not in spec.presets:
        raise ValueError(
            f"config.model.preset={preset!r} for model {name!r}; choose one of {sorted(spec.presets)}"
        )
    base = spec.presets[preset]() if preset is not None else None
    try:
        if base is None:
            return spec.config(**fields)
        return dataclasses.replace(base, **fields)
    except TypeError as error:  # A value the dataclass's own checks cannot compare.
        raise ValueError(f"config.model ({name}): {error}") from None


def model_width(name: str, config: Any) -> int | None:
    """The width of a built config (`ModelSpec.width`), None if it has none."""
    return getattr(config, spec_of(name).width, None)


def make_loss_terms(name: str, config: Any, train: Mapping[str, Any]) -> LossTerms | None:
    """The loss terms of architecture `name` (built config `config`) for `config.train`."""
    factory = spec_of(name).loss_terms
    return None if factory is None else factory(config, train)


def build_model(name: str, config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates architecture `name` from its config dataclass."""
    return spec_of(name).module(config, rngs=rngs)
