"""The faithfulness part of `--mode=interpret`: does the attention say what the output used?

On the first `config.interpret.faithfulness_examples` examples, teacher-forced
on their references, with the model's own attention (its 'alignment' map:
the RNN's and the captioner's one attention, the mean of the Transformer's
last cross-attention heads, ConvS2S's mean over its layers) as the importance
of each source position for each target token (`attnx.interpret.faithfulness`):

- ERASER (DeYoung et al. 2020): comprehensiveness and sufficiency over the
  top 1, 5, 10, 20 and 50% of the source, and their AOPC, for the attention,
  for gradient x input and for a random importance (the baseline);
- erasing the most-attended position against a random one (the gap);
- every attention map replaced by uniform weights, or permuted among the
  valid keys (Jain and Wallace 2019; Wiegreffe and Pinter 2019): the change
  in p(y_t), the total variation of the output distribution, the share of
  argmax changes;
- Kendall's tau-b of the attention with gradient x input and with
  leave-one-out erasure.

Figures from tokens of one batch at most (the erasures are many forward
passes); every value is a mean over the real target tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from attnx.interpret import attribution, faithfulness, score_figures


def _mean(values: Any, targets: Any) -> float:
    return float(faithfulness.token_mean(jnp.asarray(values), targets))


def _nanmean(values: Any, targets: np.ndarray) -> float:
    """Mean over real tokens where the value is defined (tau is NaN on constant rows)."""
    values = np.asarray(values, np.float64)
    real = (np.asarray(targets) != 0) & np.isfinite(values)
    return float(values[real].mean()) if real.any() else float("nan")


def _curve(scores: Any, targets: Any) -> dict[float, float]:
    """Comprehensiveness per erased fraction (0 at 0%), mean over tokens."""
    means = np.asarray(faithfulness.token_mean(scores.comprehensiveness, targets))
    return {0.0: 0.0, **{b / 100: float(m) for b, m in zip(scores.bins, means, strict=True)}}


def faithfulness_report(
    model: Any,
    src: Any,
    targets: Any,
    attention: Any,
    figure_stem: str,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The faithfulness figures of one batch (`src`, reference `targets`, the model's `attention`).

    Args:
      model: the restored model.
      src: int tokens `[b, s]` or images `[b, H, W, C]`.
      targets: int `[b, t]` references (eos, then padding 0).
      attention: `[b, t, s]` (s = grid cells for images), teacher-forced on `targets`.
      figure_stem: where the erasure curves go (PNG and SVG).
      seed: the random baseline's and the permutations' key.

    Returns:
      The report's `faithfulness` section.
    """
    key = jax.random.key(seed)
    targets = jnp.asarray(targets)
    images = np.asarray(src).ndim == 4
    gradient = attribution.gradient_x_input(model, src, targets, pool_to_grid=images)
    random_importance = jax.random.uniform(jax.random.fold_in(key, 1), attention.shape)
    erasure = {
        "attention": faithfulness.erasure_scores(model, src, targets, attention),
        "gradient x input": faithfulness.erasure_scores(model, src, targets, jnp.abs(gradient)),
        "random": faithfulness.erasure_scores(model, src, targets, random_importance),
    }
    curves = {name: _curve(scores, targets) for name, scores in erasure.items()}
    aopc = {name: _mean(s.aopc_comprehensiveness, targets) for name, s in erasure.items()}
    score_figures.erasure_curves(
        curves,
        figure_stem,
        title="comprehensiveness: erasing the most important source positions",
        aopc_values=aopc,
    )
    gap = faithfulness.erase_most_attended(
        model, src, targets, attention, key=jax.random.fold_in(key, 2)
    )
    uniform = faithfulness.attention_intervention(model, src, targets, edit="uniform")
    permuted = faithfulness.attention_intervention(
        model, src, targets, edit="permute", key=jax.random.fold_in(key, 3), samples=4
    )
    loo = faithfulness.leave_one_out(model, src, targets)
    agreement = faithfulness.rank_agreement(
        model, src, targets, attention, gradient=gradient, loo=loo
    )
    host_targets = np.asarray(targets)
    return {
        "examples": int(np.asarray(src).shape[0]),
        "tokens": int(np.sum(host_targets != 0)),
        "bins_percent": list(erasure["attention"].bins),
        "erasure": {
            name: {
                "aopc_comprehensiveness": aopc[name],
                "aopc_sufficiency": _mean(scores.aopc_sufficiency, targets),
                "comprehensiveness_by_bin": {
                    str(b): v
                    for b, v in zip(scores.bins, list(curves[name].values())[1:], strict=True)
                },
            }
            for name, scores in erasure.items()
        },
        "most_attended_vs_random": {
            "most": _mean(gap.most, targets),
            "random": _mean(gap.random, targets),
            "gap": _mean(gap.gap, targets),
        },
        "uniform_attention": _effects(uniform, targets),
        "permuted_attention": _effects(permuted, targets),
        "kendall_tau": {
            "attention_vs_gradient": _nanmean(agreement.attention_vs_gradient, host_targets),
            "attention_vs_leave_one_out": _nanmean(
                agreement.attention_vs_leave_one_out, host_targets
            ),
        },
    }


def _effects(effects: Any, targets: Any) -> dict[str, float]:
    return {
        "probability_change": _mean(effects.probability_change, targets),
        "total_variation": _mean(effects.total_variation, targets),
        "argmax_changed": _mean(effects.argmax_changed, targets),
    }


def headline(section: Mapping[str, Any]) -> dict[str, float]:
    """The report's top-level faithfulness figures."""
    return {
        "comprehensiveness": section["erasure"]["attention"]["aopc_comprehensiveness"],
        "sufficiency": section["erasure"]["attention"]["aopc_sufficiency"],
        "uniform_attention_gap": section["uniform_attention"]["probability_change"],
        "kendall_tau_gradient": section["kendall_tau"]["attention_vs_gradient"],
        "kendall_tau_leave_one_out": section["kendall_tau"]["attention_vs_leave_one_out"],
    }


def figure_stem(out: str) -> str:
    return os.path.join(out, "figures", "erasure_curves")
