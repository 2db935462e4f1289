"""The attention mechanism as one set of choices: `AttentionConfig` and what a model supports.

Every architecture in attnx reads the same keys (`config.model.attention.*`
in an experiment), where they mean something:

  normalizer      'softmax', 'sparsemax' (Martins & Astudillo 2016) or 'entmax15'
                  (Peters et al. 2019): weights from scores.
  score           'dot' q.k, 'scaled_dot' q.k / sqrt(d) (Vaswani et al. 2017),
                  'general' q W k and 'concat' v tanh(W [q; k]) (Luong et al. 2015),
                  'additive' v tanh(W q + U k) (Bahdanau et al. 2014), 'location'
                  W q over source positions (Luong et al. 2015).
  positions       'sinusoidal', 'learned', 'rotary' (Su et al. 2021), 't5_relative'
                  (Raffel et al. 2020), 'shaw_relative' (Shaw et al. 2018), 'none'.
  local           'none'; 'local_m' (monotonic: a window around the query's own
                  position) or 'local_p' (predicted: a window around a learned
                  position, with a Gaussian, Luong et al. 2015); `window` is the
                  half-width D.
  implementation  the kernel of `attnx.layers.attention` (None: chosen per device).
  num_kv_heads    key/value heads (grouped-query, Ainslie et al. 2023; 1 =
                  multi-query, Shazeer 2019); None: one per query head.
  dropout_rate    dropout on the attention weights.
  kind            'soft' (a weighted average) or 'hard' (a sampled location,
                  trained with REINFORCE; Xu et al. 2015).
  gate            the gating scalar beta on the context (Xu et al. 2015, sec. 4.2.1).

`score`, `positions` and `gate` default to None, "the architecture's own"
(the Transformer's scaled dot product, RNNsearch's additive score, ...). An
architecture says what it accepts with an `AttentionSupport`, whose `resolve`
fills those defaults and refuses any other value with one message naming the
key and the values allowed, before a parameter is made.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from attnx.layers import normalizers as normalizers_lib

NORMALIZERS = ("softmax", "sparsemax", "entmax15")  # and any `register_normalizer` adds
SCORES = ("dot", "scaled_dot", "general", "additive", "concat", "location")
POSITIONS = ("sinusoidal", "learned", "rotary", "t5_relative", "shaw_relative", "none")
LOCALITY = ("none", "local_m", "local_p")
IMPLEMENTATIONS = (None, "reference", "xla", "cudnn", "chunked", "splash")
KINDS = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """The choices that make an attention mechanism (see the module docstring)."""

    normalizer: str = "softmax"
    score: str | None = None
    positions: str | None = None
    local: str = "none"
    window: int | None = None
    implementation: str | None = None
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    kind: str = "soft"
    gate: bool | None = None

    @property
    def is_local(self) -> bool:
        return self.local != "none"


KEY = "config.model.attention"


def _refuse(key: str, value: Any, allowed: tuple, architecture: str) -> ValueError:
    return ValueError(
        f"{KEY}.{key}={value!r} is not available in the {architecture}; choose one of "
        f"{list(allowed)}"
    )


@dataclasses.dataclass(frozen=True)
class AttentionSupport:
    """What one architecture accepts for each key of `AttentionConfig`, and its defaults.

    Attributes:
      architecture: its name in messages ('transformer', ...).
      score, positions: the values accepted; the first is the default (used for None).
      normalizer, local, implementation, kind: the values accepted.
      num_kv_heads, dropout: whether those keys may be set at all.
      gate: whether `gate` may be set; its default when it may.
    """

    architecture: str
    score: tuple[str, ...]
    positions: tuple[str, ...] = ("none",)
    # None: every registered normalizer (`attnx.layers.normalizers.register_normalizer`).
    normalizer: tuple[str, ...] | None = None
    local: tuple[str, ...] = ("none",)
    implementation: tuple[str | None, ...] = (None,)
    kind: tuple[str, ...] = ("soft",)
    num_kv_heads: bool = False
    dropout: bool = False
    gate: bool | None = None

    def resolve(self, attention: AttentionConfig | dict[str, Any] | None) -> AttentionConfig:
        """`attention` with the architecture's defaults filled in; ValueError naming a bad key."""
        if attention is None:
            attention = AttentionConfig()
        elif not isinstance(attention, AttentionConfig):
            known = {field.name for field in dataclasses.fields(AttentionConfig)}
            unknown = sorted(set(attention) - known)
            if unknown:
                raise ValueError(
                    f"{KEY}.{unknown[0]} is not an attention key; the keys are {sorted(known)}"
                )
            attention = AttentionConfig(**attention)
        a = attention
        name = self.architecture
        registered = tuple(normalizers_lib.NORMALIZERS)
        for key, allowed, universe in (
            ("normalizer", self.normalizer or registered, registered),
            ("local", self.local, LOCALITY),
            ("implementation", self.implementation, IMPLEMENTATIONS),
            ("kind", self.kind, KINDS),
        ):
            value = getattr(a, key)
            if value not in universe:
                raise ValueError(f"{KEY}.{key}={value!r}; choose one of {list(universe)}")
            if value not in allowed:
                raise _refuse(key, value, allowed, name)
        for key, allowed, universe in (
            ("score", self.score, SCORES),
            ("positions", self.positions, POSITIONS),
        ):
            value = getattr(a, key)
            if value is None:
                continue
            if value not in universe:
                raise ValueError(f"{KEY}.{key}={value!r}; choose one of {list(universe)}")
            if value not in allowed:
                raise _refuse(key, value, allowed, name)
        if a.num_kv_heads is not None:
            if not self.num_kv_heads:
                raise ValueError(
                    f"{KEY}.num_kv_heads={a.num_kv_heads}: the {name} has one attention head "
                    "per query; leave it unset"
                )
            if a.num_kv_heads < 1:
                raise ValueError(f"{KEY}.num_kv_heads must be >= 1, got {a.num_kv_heads}")
        if not 0.0 <= a.dropout_rate < 1.0:
            raise ValueError(f"{KEY}.dropout_rate must be in [0, 1), got {a.dropout_rate}")
        if a.dropout_rate and not self.dropout:
            raise ValueError(
                f"{KEY}.dropout_rate={a.dropout_rate}: the {name} has no dropout on its "
                "attention weights; leave it at 0"
            )
        if a.gate is not None and self.gate is None:
            raise ValueError(f"{KEY}.gate={a.gate}: the {name} has no attention gate")
        if a.is_local:
            if a.window is None or a.window < 1:
                raise ValueError(
                    f"{KEY}.local={a.local!r} needs {KEY}.window >= 1 (the half-width D), "
                    f"got {a.window}"
                )
        elif a.window is not None:
            raise ValueError(f"{KEY}.window={a.window} is used only with local attention")
        if a.normalizer != "softmax" and a.implementation not in (None, "reference"):
            raise ValueError(
                f"{KEY}.normalizer={a.normalizer!r} needs the weights themselves: "
                f"{KEY}.implementation must be None or 'reference', not {a.implementation!r}"
            )
        return dataclasses.replace(
            a,
            score=a.score or self.score[0],
            positions=a.positions or self.positions[0],
            gate=self.gate if a.gate is None else a.gate,
        )
