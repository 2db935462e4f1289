"""`--mode=interpret`: one interpretability report of a trained run, in `WORKDIR/interpret/`.

Restores the newest whole checkpoint read-only and reads the first
`config.interpret.max_examples` examples of `config.interpret.split` (default
`config.task.eval_split`):

  report.json          the step, split and example count; pointing accuracy and
                       attention mass against the task's gold (spans on `dates`,
                       boxes on `digit_captions`) per layer/head, for the best
                       head, the model's own 'alignment' and the rollout
                       relevance; faithfulness and agreement figures
  alignments.pharaoh   one line per example: the hard alignment (source-target,
                       0-based, the tokenizer's tokens without bos/eos: characters
                       under the char tokenizer) of the best beam hypothesis
  hypotheses.tsv       source, reference, hypothesis per line, the same order
  figures/             PNG and SVG: head grids, spatial overlays, rollout maps,
                       erasure curves, the layers x heads score table
  index.html           one self-contained page to browse the examples

Scores against gold are teacher-forced on the references (what attention
does when the model reads the right output); the alignments file is on the
model's own beam-search output.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from attnx import decoding
from attnx.interpret import alignment_output, html_page, rollout, score_figures
from attnx.interpret.pointing_totals import PointingTotals, map_name
from attnx.training import gold, interpret_faithfulness, steps
from attnx.training import interpret_views as views
from attnx.training import workdir as workdir_lib
from attnx.training.run import Run

REPORT = "report.json"


def _examples(run: Run, limit: int) -> Iterator[dict[str, Any]]:
    """Host copies of the evaluation batches' real rows, `limit` rows at most, in batches."""
    seen = 0
    for batch in run.eval_batches():
        host = {key: np.asarray(jax.device_get(value)) for key, value in batch.items()}
        keep = np.flatnonzero(host["index"] >= 0)[: max(limit - seen, 0)]
        if keep.size == 0:
            break
        seen += keep.size
        yield {key: value[keep] for key, value in host.items()}
        if seen >= limit:
            break


def _fresh(path: str) -> str:
    workdir_lib.move_aside(path, "--mode=interpret output")
    os.makedirs(path)
    return path


def interpret_run(run: Run, step: int, out: str) -> dict[str, Any]:
    """Writes the report of the restored `run` (step `step`) into `out`; returns report.json's dict."""
    config = run.config
    settings = config.interpret
    _fresh(out)
    model = nnx.merge(run.graphdef, run.state.params, run.rest)
    graphdef, state = nnx.split(model)

    @jax.jit
    def teacher_forced(state, batch):
        return steps.forward(nnx.merge(graphdef, state), batch, train=False, return_weights=True)

    page: list[Any] = []
    faithfulness = None
    totals = PointingTotals(metric=settings.head_metric)
    gold_kind = None
    examples = 0
    rows_written: list[tuple[str, str, str]] = []
    pharaoh_lines: list[str] = []
    for batch in _examples(run, settings.max_examples):
        device_batch = {k: v for k, v in batch.items() if k != "index"}
        _, weights = teacher_forced(state, device_batch)
        weights = jax.device_get(weights)
        rows = batch["targets"].shape[1]
        scorer = gold.scorer(
            run.task, run.eval_source, batch, rows, tokenizer=config.task.tokenizer
        )
        if scorer is not None:
            gold_kind = scorer.kind
            totals.add_weights(weights, scorer.score)
            totals.add("alignment", weights["alignment"], scorer.score)
            totals.add("rollout", np.asarray(rollout.source_relevance(weights)), scorer.score)

        if faithfulness is None and settings.faithfulness_examples > 0:
            n = settings.faithfulness_examples
            src_rows = (batch["image"] if run.captions else batch["inputs"])[:n]
            faithfulness = interpret_faithfulness.faithfulness_report(
                model,
                src_rows,
                batch["targets"][:n],
                np.asarray(weights["alignment"])[:n],
                interpret_faithfulness.figure_stem(out),
                seed=int(config.train.seed),
            )

        # The model's own output: beam search, its alignment of the best hypothesis.
        src = batch["image"] if run.captions else batch["inputs"]
        result = decoding.beam_search(
            model,
            src,
            beam_size=config.eval.beam_size,
            length_penalty=config.eval.length_penalty,
            alpha=config.eval.alpha,
            max_length=config.task.max_target_length,
            return_weights=True,
        )
        sequences = np.asarray(result.sequences)[:, 0]
        lines = alignment_output.lines(
            "hard",
            np.asarray(result.alignments)[:, 0],
            sequences,
            None if run.captions else np.asarray(batch["inputs"]),
        )
        for row, index in enumerate(batch["index"]):
            pharaoh_lines.append(lines[row])
            references = run.task.references(run.eval_source[int(index)])
            rows_written.append(
                (run.source_text(int(index)), references[0], run.tokenizer.decode(sequences[row]))
            )

        # Every map of the best hypotheses, for the page and the figures: the
        # teacher-forced re-run of a hypothesis gives the maps its search saw.
        wanted = settings.page_examples - len(page)
        if wanted > 0:
            hypotheses = {**device_batch, "targets": sequences}
            _, seen = teacher_forced(state, hypotheses)
            seen = jax.device_get(seen)
            relevance = np.asarray(rollout.source_relevance(seen))
            for row in range(min(wanted, len(batch["index"]))):
                page.append(
                    views.page_example(
                        run,
                        {k: v[row] for k, v in seen.items()},
                        relevance[row],
                        batch,
                        row,
                        sequences[row],
                        rows_written[examples + row],
                        figures=os.path.join(out, "figures", f"example_{len(page)}")
                        if len(page) < settings.figures
                        else None,
                    )
                )
        examples += len(batch["index"])

    report: dict[str, Any] = {
        "step": step,
        "split": config.task.eval_split,
        "examples": examples,
        "checkpoint": os.path.join(run.workdir, "checkpoints", str(step)),
        "gold": gold_kind,
    }
    if gold_kind is not None:
        best = totals.best()
        scores = totals.as_dict()
        report["pointing"] = {
            "metric": settings.head_metric,
            "per_head": {k: v for k, v in scores.items() if k.startswith("layer_")},
            "alignment": scores["alignment"],
            "rollout": scores["rollout"],
        }
        if best is not None:
            (layer, head), best_scores = best
            report["pointing"]["best"] = {
                "map": map_name(layer, head),
                "layer": layer,
                "head": head,
                **best_scores.as_dict(),
            }
            report["pointing_accuracy"] = best_scores.accuracy
            report["attention_mass"] = best_scores.mass
    if faithfulness is not None:
        report["faithfulness"] = faithfulness
        report.update(interpret_faithfulness.headline(faithfulness))
    if gold_kind is not None and totals.heads:
        score_figures.head_table_figure(
            totals.grid(settings.head_metric),
            os.path.join(out, "figures", f"heads_{settings.head_metric}"),
            metric=f"{settings.head_metric} against gold {gold_kind}",
        )
    html_page.write_page(
        os.path.join(out, "index.html"),
        page,
        title=f"{config.model.name} on {config.task.dataset}, step {step}",
        summary=_summary(report),
    )
    with open(os.path.join(out, "alignments.pharaoh"), "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in pharaoh_lines)
    with open(os.path.join(out, "hypotheses.tsv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(("source", "reference", "hypothesis"))
        writer.writerows(rows_written)
    with open(os.path.join(out, REPORT), "w", encoding="utf-8") as f:
        json.dump(_finite(report), f, indent=2, sort_keys=False)
        f.write("\n")
    logging.info("Wrote the interpretability report of step %d into %s", step, out)
    return report


def _summary(report: Mapping[str, Any]) -> dict[str, Any]:
    """The page's headline figures."""
    summary = {"step": report["step"], "split": report["split"], "examples": report["examples"]}
    pointing = report.get("pointing")
    if pointing and "best" in pointing:
        best = pointing["best"]
        summary[f"pointing accuracy (best head, {best['map']})"] = best["accuracy"]
        summary["attention mass (best head)"] = best["mass"]
        summary["pointing accuracy (rollout)"] = pointing["rollout"]["accuracy"]
    for key in ("comprehensiveness", "uniform_attention_gap", "kendall_tau_gradient"):
        if key in report:
            summary[key.replace("_", " ")] = report[key]
    return summary


def _finite(value: Any) -> Any:
    """NaN (a score over no token) as null: JSON has no NaN."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_interpret_mode(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """`--mode=interpret` on the run in `workdir`; returns the headline figures."""
    config = ml_collections.ConfigDict(config.to_dict())
    if config.interpret.split:
        config.task.eval_split = config.interpret.split
    run = Run.build(config, workdir, mode="interpret")
    try:
        run.restore()
        step = int(run.state.step)
        report = interpret_run(run, step, os.path.join(workdir, "interpret"))
    finally:
        run.checkpointer.close()
    return {
        f"interpret/{k}": float(v)
        for k, v in report.items()
        if k in ("pointing_accuracy", "attention_mass") and v is not None
    }
