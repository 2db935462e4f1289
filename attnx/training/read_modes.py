"""The modes that read a trained run: `eval`, `decode` and `visualize`.

Each restores the newest whole checkpoint read-only (nothing is moved, so
they may run beside a live training run of the same workdir) and writes
only under `WORKDIR/<mode>/`, never into the training record:

  eval       evaluates it: `eval/metrics.jsonl` (rows marked `"mode": "eval"`),
             a TensorBoard run of its own (`eval/tensorboard/`), attention
             plots in `eval/plots/step_N/`;
  decode     beam-searches the whole evaluation split into
             `decode/predictions_step_N.tsv` (source, reference, hypothesis,
             score), warning about source characters outside the vocabulary;
             with `--config.decode.print_alignment=hard|soft` also
             `decode/alignments_step_N.pharaoh` (or `.soft`), a line per row
             of the predictions (`attnx.interpret.alignment_output`); its
             metrics go to `decode/metrics.jsonl`. With
             `--config.decode.input=FILE` (or `-`) it decodes your own inputs
             instead, printing hypotheses to stdout (`interactive.py`);
  visualize  plots the attention of `config.eval.num_plots` examples into
             `visualize/plots/step_N/` (and its TensorBoard run); no metrics,
             which over a handful of examples would mean nothing.

Each reads `config.eval.split` (default `config.task.eval_split`, the split
training evaluates on): `--mode=eval --config.eval.split=test` scores the
test split. Metrics of the training's evaluation split are named `eval/...`
as in training; those of any other split after it (`test/bleu`,
`test/exact_match`), and its outputs carry its name
(`decode/predictions_test_step_N.tsv`, `eval/plots/test_step_N/`).

An output that already exists (the same step decoded twice) is moved aside,
not replaced.
"""

from __future__ import annotations

import os

import ml_collections
from absl import logging

from attnx.training import workdir as workdir_lib
from attnx.training.logging import MetricsWriter
from attnx.training.run import Run

MODES = workdir_lib.READ_ONLY_MODES


def _fresh(path: str) -> str:
    workdir_lib.move_aside(path, f"--mode output {os.path.basename(path)}")
    return path


def read_run(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict[str, float]:
    """Runs read-only `mode` on the run in `workdir`; returns its metrics ({} for visualize)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; choose one of {MODES}")
    workdir = workdir_lib.resolve(workdir, what="workdir")
    if mode == "decode" and config.get("decode") and config.decode.input:
        # Your own inputs, not the evaluation split: no data, no files written.
        from attnx.training.interactive import run_input_mode

        run_input_mode(config, workdir)
        return {}
    if mode == "interpret":
        from attnx.training.interpret_mode import run_interpret_mode

        return run_interpret_mode(config, workdir)
    run = Run.build(config, workdir, mode=mode)
    try:
        run.restore()
        step = int(run.state.step)
        logging.info("--mode=%s on step %d of %s, split %r", mode, step, workdir, run.eval_split)
        out = os.path.join(workdir, mode)
        # Outputs of a split other than the training's evaluation split carry its name.
        tag = "" if run.eval_split == config.task.eval_split else f"{run.eval_split}_"
        writer = MetricsWriter(out, total_steps=config.train.steps, mode=mode)
        try:
            if mode == "eval":
                results = run.evaluate(
                    step, writer, plot_dir=_fresh(os.path.join(out, "plots", f"{tag}step_{step}"))
                )
            elif mode == "decode":
                path = _fresh(os.path.join(out, f"predictions_{tag}step_{step}.tsv"))
                kind = config.decode.get("print_alignment")
                if kind is not None:
                    suffix = "pharaoh" if kind == "hard" else "soft"
                    options = {
                        "alignments_path": _fresh(
                            os.path.join(out, f"alignments_{tag}step_{step}.{suffix}")
                        ),
                        "alignment_kind": kind,
                    }
                else:
                    options = {}
                results = run.evaluate(
                    step,
                    writer,
                    plot_dir=None,
                    eval_config={"max_examples": 2**31 - 1, "num_plots": 0},
                    predictions_path=path,
                    warn_unknown_characters=True,
                    **options,
                )
                logging.info("Wrote %s", path)
                if options:
                    logging.info("Wrote %s", options["alignments_path"])
            else:
                plot_dir = _fresh(os.path.join(out, "plots", f"{tag}step_{step}"))
                run.evaluate(
                    step,
                    writer,
                    plot_dir=plot_dir,
                    eval_config={"max_examples": config.eval.num_plots},
                    write_metrics=False,
                )
                logging.info("Plotted the attention of step %d into %s", step, plot_dir)
                results = {}
        finally:
            writer.close()
    finally:
        run.checkpointer.close()
    return results
