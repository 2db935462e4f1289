"""attnx.models: the four architectures, behind one seq2seq interface.

`encode(src, train)`, `decode(tgt_in, encoded, train)`, `__call__`, and
incremental decoding through `init_cache(encoded, max_length)` /
`decode_step(tokens)`, so that `attnx.decoding` serves all four.

`make_model_config` and `build_model` turn an experiment's `config.model`
section (a name, an optional preset and field overrides) into a model.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from flax import nnx

from attnx.models import captioner_config, convs2s_config, rnn_config, transformer_config
from attnx.models.captioner import Captioner
from attnx.models.convs2s import ConvS2S
from attnx.models.rnn import RNNEncoderDecoder
from attnx.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to build one architecture from a config section."""

    module: type[nnx.Module]
    config: type
    presets: Mapping[str, Callable[..., Any]]
    # The dataclass fields that receive the tokenizers' vocabulary sizes.
    source_vocab_field: str | None
    target_vocab_field: str


MODELS: dict[str, ModelSpec] = {
    "transformer": ModelSpec(
        Transformer,
        transformer_config.TransformerConfig,
        {
            "tiny": transformer_config.tiny,
            "base": transformer_config.transformer_base,
            "big": transformer_config.transformer_big,
        },
        "src_vocab_size",
        "tgt_vocab_size",
    ),
    "rnn": ModelSpec(
        RNNEncoderDecoder,
        rnn_config.RNNConfig,
        {
            "tiny": rnn_config.tiny,
            "rnnsearch50": rnn_config.rnnsearch50,
            "luong_4layer": rnn_config.luong_4layer,
        },
        "src_vocab_size",
        "tgt_vocab_size",
    ),
    "convs2s": ModelSpec(
        ConvS2S,
        convs2s_config.ConvS2SConfig,
        {
            "tiny": convs2s_config.tiny,
            "cpu_small": convs2s_config.cpu_small,
            "wmt14_en_de": convs2s_config.convs2s_wmt14_en_de,
            "wmt14_en_fr": convs2s_config.convs2s_wmt14_en_fr,
            "wmt16_en_ro": convs2s_config.convs2s_wmt16_en_ro,
        },
        "src_vocab_size",
        "tgt_vocab_size",
    ),
    "captioner": ModelSpec(
        Captioner,
        captioner_config.CaptionerConfig,
        {
            "tiny": captioner_config.tiny,
            "digits_small": captioner_config.digits_small,
            "coco_vgg": captioner_config.coco_vgg,
            "coco_features": captioner_config.coco_features,
        },
        None,
        "vocab_size",
    ),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _convert(name: str, value: Any) -> Any:
    """Config values -> dataclass values: dtype names to dtypes, lists to tuples."""
    if name in ("dtype", "param_dtype") and isinstance(value, str):
        if value not in _DTYPES:
            raise ValueError(f"config.model.{name}={value!r}; choose one of {sorted(_DTYPES)}")
        return _DTYPES[value]
    if isinstance(value, list | tuple):
        return tuple(_convert(name, v) for v in value)
    return value


def make_model_config(
    model_config: Mapping[str, Any],
    *,
    source_vocab_size: int | None,
    target_vocab_size: int,
) -> Any:
    """The architecture's config dataclass from `config.model`.

    `config.model.name` picks the architecture, `config.model.preset` (optional)
    a preset, and every other key overrides a field of the dataclass. The
    vocabulary sizes come from the tokenizers unless the config sets them; a
    config vocabulary smaller than the tokenizer's is an error.
    """
    fields = dict(model_config)
    name = fields.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r}; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    preset = fields.pop("preset", None)
    known = {f.name for f in dataclasses.fields(spec.config)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(
            f"config.model.{unknown[0]} is not a field of {spec.config.__name__} "
            f"(model {name!r}); fields: {sorted(known)}"
        )
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
    if preset is None:
        return spec.config(**fields)
    if preset not in spec.presets:
        raise ValueError(
            f"config.model.preset={preset!r} for model {name!r}; choose one of {sorted(spec.presets)}"
        )
    return dataclasses.replace(spec.presets[preset](), **fields)


def build_model(name: str, config: Any, *, rngs: nnx.Rngs) -> nnx.Module:
    """Instantiates architecture `name` from its config dataclass."""
    return MODELS[name].module(config, rngs=rngs)
