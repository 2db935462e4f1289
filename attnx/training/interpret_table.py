r"""The README's interpretability table from the reports of several runs.

  python -m attnx.training.interpret_table /tmp/dates_transformer /tmp/dates_rnn ...

Each argument is the workdir of a run on which `--mode=interpret` ran; its
`interpret/report.json` and `config.json` give one row of a Markdown table on
standard output: the attention (model and mechanism, read from the config),
the checkpoint step, the split and number of examples, and the report's
figures:

  pointing (best)   pointing accuracy of the best (layer, head) map against gold
  best map          that map ('layer_1/head_2', or the RNN's one 'layer_0/head_0')
  mass              attention mass inside the gold span or box, best map
  pointing (rollout / model)
                    the same accuracy for attention rollout down to the source,
                    and for the model's own 'alignment' map (what decoding
                    prints: e.g. the Transformer's last layer averaged over heads)
  comprehensiveness AOPC of erasing the most attended source tokens first
                    (attention's order; random order in brackets)
  uniform gap       mean drop of p(y) when the attention is made uniform
  tau (grad)        Kendall tau between attention and gradient x input

A figure the report does not hold (no gold, no faithfulness section) is '-'.
A workdir without a report is one `FATAL` line naming it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from attnx.errors import RunError

COLUMNS = (
    "run",
    "attention",
    "step",
    "split (examples)",
    "pointing (best)",
    "best map",
    "mass",
    "pointing (rollout / model)",
    "comprehensiveness (random)",
    "uniform gap",
    "tau (grad)",
)


def describe_attention(model: Mapping[str, Any]) -> str:
    """The model and its attention mechanism, as a reader of the table names them."""
    attention = model.get("attention") or {}
    name = model.get("name", "?")
    normalizer = attention.get("normalizer") or "softmax"
    extra = "" if normalizer == "softmax" else f", {normalizer}"
    if name == "rnn":
        if model.get("variant") == "luong":
            local = attention.get("local") or "none"
            score = attention.get("score") or "general"
            kind = f"Luong {score}" + ("" if local == "none" else f", {local}")
        else:
            kind = "Bahdanau"
        return f"RNN, {kind}{extra}"
    if name == "captioner":
        return f"Show, Attend and Tell, {attention.get('kind', 'soft')}{extra}"
    if name == "convs2s":
        return f"ConvS2S, multi-step{extra}"
    if name == "transformer":
        return f"Transformer{extra}"
    return f"{name}{extra}"


def _number(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def row(workdir: str) -> list[str]:
    """One table row for the run in `workdir`.

    Raises:
      RunError: naming the file when the report or the config is missing or unreadable.
    """
    report = _read_json(os.path.join(workdir, "interpret", "report.json"), "--mode=interpret")
    config = _read_json(os.path.join(workdir, "config.json"), "training")
    pointing = report.get("pointing") or {}
    best = pointing.get("best") or {}
    erasure = (report.get("faithfulness") or {}).get("erasure") or {}
    random_order = (erasure.get("random") or {}).get("aopc_comprehensiveness")
    comprehensiveness = _number(report.get("comprehensiveness"))
    if random_order is not None:
        comprehensiveness += f" ({random_order:.3f})"
    rollout = (pointing.get("rollout") or {}).get("accuracy")
    own = (pointing.get("alignment") or {}).get("accuracy")
    return [
        os.path.basename(os.path.normpath(workdir)),
        describe_attention(config.get("model", {})),
        str(report.get("step", "-")),
        f"{report.get('split', '-')} ({report.get('examples', '-')})",
        _number(report.get("pointing_accuracy")),
        f"`{best['map']}`" if best.get("map") else "-",
        _number(report.get("attention_mass")),
        f"{_number(rollout)} / {_number(own)}" if pointing else "-",
        comprehensiveness,
        _number(report.get("uniform_attention_gap")),
        _number(report.get("kendall_tau_gradient"), 2),
    ]


def table(workdirs: Sequence[str]) -> str:
    """The Markdown table of the runs in `workdirs`, in their order."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(workdir)) + " |" for workdir in workdirs]
    return "\n".join(lines) + "\n"


def _read_json(path: str, writer: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise RunError(f"{path}: not found (written by {writer} of that workdir)") from None
    except (OSError, ValueError) as error:
        raise RunError(f"{path}: cannot be read: {error}") from None


def main(argv: Sequence[str]) -> int:
    if not argv or any(arg.startswith("-") for arg in argv):
        print(__doc__.split("\n\n")[0].strip(), file=sys.stderr)
        return 2
    try:
        sys.stdout.write(table(argv))
    except RunError as error:
        print(f"FATAL {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
