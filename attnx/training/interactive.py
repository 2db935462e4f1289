r"""Your own inputs to a trained run: `--mode=decode --config.decode.input=FILE` (or `-`).

  python -m attnx.main --config=experiments/dates_transformer.py --workdir=DIR \
      --mode=decode --config.decode.input=dates.txt        # or - for standard input
  echo "3 March 1974" | python -m attnx.main ... --mode=decode --config.decode.input=-

One input a line (UTF-8; for a captioner, the path of an image). The run is
loaded as `attnx.load(DIR)` loads it (its own `config.json`, vocabulary and
newest whole checkpoint, read-only, onto one device) and decoded through the
same methods, so both give the same hypotheses. From the command line only the
`config.decode` keys are read: a `config.model` value, or a task or eval
setting that decoding uses (tokenizer, lengths, image size, beam, batch,
length penalty), that differs from the run's own is named in a warning and
not used.

Output, on standard output, in the style of `fairseq-interactive` (i counts
the inputs from 0; fields are separated by tabs):

  S-i   SOURCE                the input line as read (a captioner: the path)
  H-i   SCORE   HYPOTHESIS    config.decode.nbest lines, best first; SCORE is
                              beam search's length-normalised log-prob
  A-i   s-t s-t ...           with config.decode.print_alignment=hard, after
                              each H line, in Pharaoh order (by s, then t):
                              for every output token t but the final eos
                              (0-based), the source token s it attends to most
                              (0-based, eos not counted; for a captioner the
                              grid cell, row-major)
  A-i   w,w,.. w,w,.. ...     with config.decode.print_alignment=soft: for
                              every output token but eos, its weights over the
                              source tokens (eos left out) or grid cells

An empty line gets `S-i` and one `H-i` line with an empty score and
hypothesis, with no model call. Logs and warnings go to standard error: a line
with characters the vocabulary never saw (read as <unk>: one warning naming
them) or longer than the run allows (truncated: a warning naming the line).
A missing input file, invalid UTF-8 or an image that cannot be read stops the
run with one `FATAL` line naming the file and line (the results of earlier
batches are already out).

Batches: inputs are read lazily and decoded `config.decode.batch_size` at a
time (default: the run's `config.eval.batch_size`; 1 when standard input is a
terminal), and each batch's output is flushed as soon as it is decoded: a
terminal gets an answer per line, a pipe per batch (set
`--config.decode.batch_size=1` for an answer per line through a pipe).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

import ml_collections
from absl import logging

from attnx import inference
from attnx.errors import RunError
from attnx.interpret import alignment_output, alignments

# What the input mode takes from the run's config, and a differing command line does not change.
_RUN_KEYS = (
    "task.tokenizer",
    "task.max_source_length",
    "task.max_target_length",
    "task.image_size",
    "eval.beam_size",
    "eval.batch_size",
    "eval.length_penalty",
    "eval.alpha",
)


def _flat(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _used_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The model section and `_RUN_KEYS`, flat, as `record_config` writes them (JSON values)."""
    as_json = json.loads(json.dumps(config.to_dict(), default=repr))
    flat = _flat(as_json.get("model", {}), "model.")
    for key in _RUN_KEYS:
        section, name = key.split(".")
        if name in as_json.get(section, {}):
            flat[key] = as_json[section][name]
    return flat


def _warn_differences(
    command_line: ml_collections.ConfigDict, run: ml_collections.ConfigDict
) -> None:
    """Names the command-line values that the run's own config overrules.

    Only keys that both configs hold are compared: a run recorded by another
    attnx version may lack fields that have defaults now, which is no conflict.
    """
    ours, theirs = _used_settings(command_line), _used_settings(run)
    changed = [
        f"{key}: {ours[key]!r} (command line) vs {theirs[key]!r} (run)"
        for key in sorted(set(ours) & set(theirs))
        if ours[key] != theirs[key]
    ]
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        logging.warning(
            "--config.decode.input decodes with the run's own config.json; these command-line "
            "values differ from it and are not used: %s%s",
            "; ".join(changed[:5]),
            more,
        )


def _open(path: str) -> tuple[IO[bytes], str]:
    """The input as a binary stream, and how messages name it."""
    if path == "-":
        return sys.stdin.buffer, "standard input"
    try:
        return open(path, "rb"), path  # Closed by decode_inputs.
    except OSError as error:
        raise RunError(
            f"config.decode.input={path}: cannot read it ({error.strerror or error})"
        ) from None


def _lines(stream: IO[bytes], where: str) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line end), read one line at a time."""
    for number, raw in enumerate(stream, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RunError(
                f"config.decode.input: line {number} of {where} is not UTF-8 "
                f"({error.reason} at byte {error.start})"
            ) from None
        yield number, text.rstrip("\r\n")


def _batches(lines: Iterator[tuple[int, str]], size: int) -> Iterator[list[tuple[int, str]]]:
    batch = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def format_result(index: int, result: inference.Result, *, alignment: str | None) -> str:
    """The output lines of input `index` (see the module docstring), each ending in a newline.

    `alignment` ('hard', 'soft' or None) must be what `result` was decoded with.
    """
    lines = [f"S-{index}\t{result.source}"]
    if not result.hypotheses:
        lines.append(f"H-{index}\t\t")
    for hypothesis in result.hypotheses:
        lines.append(f"H-{index}\t{hypothesis.score:.6f}\t{hypothesis.text}")
        if alignment == "hard":
            lines.append(f"A-{index}\t{alignments.to_pharaoh(hypothesis.alignment)}")
        elif alignment == "soft":
            lines.append(f"A-{index}\t{alignment_output.format_soft(hypothesis.soft_alignment)}")
    return "".join(line + "\n" for line in lines)


def decode_inputs(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stdout: IO[str] | None = None,
) -> int:
    """Decodes every line of `config.decode.input` with the run in `workdir`; returns the count.

    Raises:
      RunError: a missing or unreadable input, run or image, or an nbest
        larger than the beam, naming the key, file or line.
    """
    stdout = sys.stdout if stdout is None else stdout
    options = config.decode
    stream, where = _open(options.input)  # Before the model: a typo fails at once.
    try:
        started = time.time()
        model = inference.TrainedModel.restore(inference.read_run_config(workdir), workdir)
        restored = time.time() - started
        _warn_differences(config, model.config)
        beam_size = options.beam_size or model.default_beam_size
        if options.nbest > beam_size:
            raise RunError(
                f"config.decode.nbest={options.nbest} is more than the beam of {beam_size} "
                "hypotheses (config.decode.beam_size, default the run's config.eval.beam_size)"
            )
        interactive = options.input == "-" and sys.stdin.isatty()
        batch_size = options.batch_size or (1 if interactive else model.default_batch_size)
        decode = model.caption if model.image_source else model.translate
        logging.info(
            "Decoding %s with step %d of %s: beam %d, %d-best, batches of %d%s",
            where,
            model.step,
            workdir,
            beam_size,
            options.nbest,
            batch_size,
            " (one input a line; Ctrl-D ends)" if interactive else "",
        )
        count = 0
        started = time.time()
        for batch in _batches(_lines(stream, where), batch_size):
            results = decode(
                [text for _, text in batch],
                beam_size=beam_size,
                nbest=options.nbest,
                alignment=options.print_alignment,
                batch_size=batch_size,
                names=[f"line {number} of {where}" for number, _ in batch],
            )
            for result in results:
                stdout.write(format_result(count, result, alignment=options.print_alignment))
                count += 1
            stdout.flush()  # A pipe or a terminal sees each batch as soon as it is decoded.
        logging.info(
            "Decoded %d inputs in %.1f s (loading the run took %.1f s)",
            count,
            time.time() - started,
            restored,
        )
        return count
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def run_input_mode(config: ml_collections.ConfigDict, workdir: str) -> None:
    """`decode_inputs` to standard output, as `read_modes` runs it.

    A reader that stops early (`| head`) ends it quietly, and Ctrl-C with exit
    status 130 and no traceback.
    """
    try:
        decode_inputs(config, workdir)
    except BrokenPipeError:
        # Whoever reads the output has gone: nothing more to say, and nothing to flush at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except KeyboardInterrupt:
        # Ctrl-C ends an interactive session; what was decoded is already out.
        logging.info("Interrupted.")
        raise SystemExit(130) from None
