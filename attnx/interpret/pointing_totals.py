"""Pointing scores summed over batches, for every (layer, head) map and named relevance maps.

The interpretability report scores a run's attention against gold (the spans
of `dates`, the boxes of `digit_captions`) one batch at a time; this adds up
the counts, so that the figures over a split are exact corpus-level ratios
(hits over all scored tokens), not means of per-batch ratios.

    totals = PointingTotals()
    for batch in batches:
        score = lambda attention: span_pointing(attention, start, end, source_mask, fields=...)
        totals.add_weights(weights, score)          # every (layer, head) cross-attention
        totals.add("rollout", relevance, score)     # any other [b, t, s] map, by name
    totals.best()       # the best (layer, head) by `metric`
    totals.as_dict()    # {'layer_1/head_2': {...}, 'rollout': {...}}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from attnx.interpret.alignment_scores import PointingScores
from attnx.interpret.alignments import cross_attention_maps

Score = Callable[[np.ndarray], PointingScores]


def map_name(layer: int, head: int) -> str:
    """The report's name of one (layer, head) cross-attention map."""
    return f"layer_{layer}/head_{head}"


@dataclasses.dataclass
class PointingTotals:
    """Sums of `PointingScores` per map.

    Attributes:
      metric: the `PointingScores` attribute that ranks the heads ('accuracy',
        'mass' or 'worst_field_accuracy').
      heads: (layer, head) -> summed scores of that cross-attention map.
      named: name -> summed scores of another map (e.g. 'alignment', 'rollout').
    """

    metric: str = "accuracy"
    heads: dict[tuple[int, int], PointingScores] = dataclasses.field(default_factory=dict)
    named: dict[str, PointingScores] = dataclasses.field(default_factory=dict)

    def add_weights(self, weights: Mapping[str, Any], score: Score) -> None:
        """Scores every (layer, head) cross-attention map of a model's weights dict."""
        for key, attention in cross_attention_maps(weights).items():
            self.heads[key] = self.heads.get(key, PointingScores()) + score(attention)

    def add(self, name: str, attention: np.ndarray, score: Score) -> None:
        """Scores one `[b, t, s]` map under `name`."""
        self.named[name] = self.named.get(name, PointingScores()) + score(np.asarray(attention))

    def best(self) -> tuple[tuple[int, int], PointingScores] | None:
        """The (layer, head) with the highest `metric` (ties: higher mass, then first); None if none."""

        def rank(item: tuple[tuple[int, int], PointingScores]) -> tuple[float, float]:
            value = float(getattr(item[1], self.metric))
            mass = item[1].mass
            return (-value, -(0.0 if math.isnan(mass) else mass))

        scored = [
            item for item in self.heads.items() if not math.isnan(getattr(item[1], self.metric))
        ]
        return min(scored, key=rank) if scored else None

    def as_dict(self) -> dict[str, dict[str, float]]:
        """Every map's scores (`PointingScores.as_dict`), heads first, in layer/head order."""
        result = {map_name(*key): self.heads[key].as_dict() for key in sorted(self.heads)}
        result.update({name: scores.as_dict() for name, scores in self.named.items()})
        return result

    def grid(self, value: str = "accuracy") -> dict[tuple[int, int], float]:
        """(layer, head) -> one value of the scores, for a layers x heads table."""
        return {key: float(getattr(scores, value)) for key, scores in sorted(self.heads.items())}
