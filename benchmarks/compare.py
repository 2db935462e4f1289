"""attnx against PyTorch (eager, torch.compile) and plain Flax: the training step, all four models.

For each model, every round runs attnx (`benchmarks.train_step`), the PyTorch
peer eager and compiled (`benchmarks.peers.torch_step`) and, for the
Transformer, plain Flax (`benchmarks.peers.flax_transformer`), each in a fresh
process, one after another (the order rotates every round, so that none
always runs first or last), at the cpu-small settings
(`benchmarks/peers/settings.py`). The float32 matrix-product ceiling is
measured at the start of every round. Then it prints one summary JSON line
per (model, framework) and a Markdown table:

  step ms    median over the rounds of each run's median step
  tokens/s   target tokens per second at that median
  peak RSS   the run's peak resident memory (median over rounds)
  warm-up s  process start to the end of the warm-up steps: building,
             compiling (XLA or inductor, with an empty cache) and 3 steps
  MFU        model FLOPs per step / step time / matmul ceiling; the FLOPs are
             XLA's cost analysis of attnx's compiled step, used for every
             framework of that model (the same model, the same work)
  speedup    peer step ms / attnx step ms (> 1: attnx is faster)

  python -m benchmarks.compare                       # all models, 3 rounds
  python -m benchmarks.compare --models transformer --rounds 5 --wait-idle 600

Timings are only meaningful on an otherwise idle machine: `--wait-idle S`
waits up to S seconds for one before every run, and each result says how many
cores other processes used while it was timed (`other_load`, the largest of
its rounds). PyTorch comes from the 'bench' extra (`pip install -e '.[bench]'`);
without it only attnx and plain Flax run.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.peers import machine, settings  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (label, framework, mode) in the table's order; attnx is the reference of the ratios.
FRAMEWORKS = (
    ("attnx", "attnx", "jit"),
    ("torch-eager", "torch", "eager"),
    ("torch-compile", "torch", "compile"),
    ("flax", "flax", "jit"),
)
LABELS = tuple(label for label, _, _ in FRAMEWORKS)


def command(label: str, model: str, steps: int, warmup: int) -> list[str] | None:
    """The command that times `model` in framework `label`, or None where there is no peer."""
    common = ["--steps", str(steps), "--warmup", str(warmup)]
    if label == "attnx":
        return [sys.executable, "-m", "benchmarks.train_step", "--models", model, *common]
    if label in ("torch-eager", "torch-compile"):
        mode = label.split("-")[1]
        return [sys.executable, "-m", "benchmarks.peers.torch_step", "--model", model] + [
            "--mode",
            mode,
            *common,
        ]
    if label == "flax":
        if model != "transformer":
            return None  # the plain-Flax peer exists for the Transformer only
        return [sys.executable, "-m", "benchmarks.peers.flax_transformer", *common]
    raise ValueError(f"compare: unknown framework {label!r}; choose from {LABELS}")


def parse_json_lines(text: str) -> list[dict]:
    """The JSON objects among `text`'s lines (a child also prints logs and warnings)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                records.append(value)
    return records


def run_child(cmd: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """Runs one benchmark process; returns (its last JSON record or None, why not)."""
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    records = [r for r in parse_json_lines(done.stdout) if "step_ms_median" in r]
    if done.returncode != 0 or not records:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exit code {done.returncode}: {tail[:300]}"
    return records[-1], ""


def ceiling(timeout_s: float) -> dict:
    """The float32 matmul ceiling now: the faster of JAX's and (if installed) PyTorch's."""
    best: dict = {}
    for framework in ("jax", "torch"):
        if framework == "torch" and importlib.util.find_spec("torch") is None:
            continue
        cmd = [sys.executable, "-m", "benchmarks.peers.machine", "--framework", framework]
        try:
            out = subprocess.run(
                cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
            ).stdout
        except subprocess.TimeoutExpired:
            continue
        for record in parse_json_lines(out):
            if record.get("gflops", 0) > best.get("gflops", 0):
                best = record
    return best


def summarize(records: list[dict], ceiling_gflops: float | None) -> list[dict]:
    """One summary per (model, framework) from the runs' records (see the module docstring).

    Each record has 'model', 'label' and either the child's fields
    (step_ms_median, peak_rss_mb, warmup_s, other_load, params, gflop_per_step
    for attnx) or 'error'. FLOPs come from the model's attnx records.
    """
    out = []
    models = list(dict.fromkeys(r["model"] for r in records))
    for model in models:
        mine = [r for r in records if r["model"] == model]
        flops = [r["gflop_per_step"] for r in mine if r.get("gflop_per_step")]
        gflop = statistics.median(flops) if flops else None
        rows = {}
        for label in LABELS:
            runs = [r for r in mine if r["label"] == label]
            good = [r for r in runs if "error" not in r]
            if not runs:
                continue
            row = dict(kind="summary", model=model, framework=label, runs=len(good))
            if not good:
                row["error"] = runs[-1]["error"]
                rows[label] = row
                continue
            ms = statistics.median(r["step_ms_median"] for r in good)
            row.update(
                params=good[0].get("params"),
                step_ms=round(ms, 1),
                step_ms_runs=[r["step_ms_median"] for r in good],
                tokens_per_s=round(settings.tokens_per_step(model) / (ms / 1e3), 1),
                peak_rss_mb=round(statistics.median(r["peak_rss_mb"] for r in good), 1),
                warmup_s=round(statistics.median(r["warmup_s"] for r in good), 1),
                gflop_per_step=gflop,
                mfu=(
                    round(gflop / (ms / 1e3) / ceiling_gflops, 3)
                    if gflop and ceiling_gflops
                    else None
                ),
                other_load=max((r.get("other_load") or 0.0) for r in good),
            )
            if len(good) < len(runs):
                row["failed_runs"] = len(runs) - len(good)
            rows[label] = row
        reference = rows.get("attnx", {}).get("step_ms")
        for row in rows.values():
            if reference and row.get("step_ms"):
                row["speedup_vs_peer"] = round(row["step_ms"] / reference, 2)
        out.extend(rows.values())
    return out


def markdown(summaries: list[dict]) -> str:
    """The summaries as one Markdown table."""
    head = (
        "| model | framework | step ms (median) | tokens/s | peak RSS MB | warm-up s | MFU "
        "| attnx speedup (peer ms / attnx ms) | other load |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in summaries:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['framework']} | failed: {row['error']} |||||||")
            continue
        mfu = f"{100 * row['mfu']:.0f}%" if row.get("mfu") is not None else "-"
        speedup = row.get("speedup_vs_peer")
        ratio = "-" if row["framework"] == "attnx" or speedup is None else f"{speedup:.2f}x"
        lines.append(
            f"| {row['model']} | {row['framework']} | {row['step_ms']:.0f} "
            f"| {row['tokens_per_s']:.0f} | {row['peak_rss_mb']:.0f} | {row['warmup_s']:.0f} "
            f"| {mfu} | {ratio} | {row['other_load']:.2f} |"
        )
    return head + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(settings.MODELS))
    parser.add_argument("--frameworks", nargs="+", default=list(LABELS), choices=LABELS)
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per framework")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per process")
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait up to S s for an idle machine per run"
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    parser.add_argument("--jsonl", help="also append every JSON line to this file")
    args = parser.parse_args(argv)
    models = [m for item in args.models for m in item.split(",") if m]
    unknown = sorted(set(models) - set(settings.MODELS))
    if unknown:
        parser.error(f"--models: unknown model {unknown[0]!r}; choose from {list(settings.MODELS)}")
    args.models = models
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    labels = list(args.frameworks)
    if importlib.util.find_spec("torch") is None:
        dropped = [label for label in labels if label.startswith("torch")]
        labels = [label for label in labels if not label.startswith("torch")]
        if dropped:
            print(
                "# PyTorch is not installed (pip install -e '.[bench]'): skipping "
                + ", ".join(dropped),
                file=sys.stderr,
            )

    def emit(record: dict) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    started = datetime.datetime.now(datetime.UTC)
    records, ceilings = [], []
    for model in args.models:
        runnable = [label for label in labels if command(label, model, 1, 1)]
        for round_index in range(args.rounds):
            machine.wait_for_idle(args.wait_idle)
            peak = ceiling(args.timeout)
            if peak:
                ceilings.append(peak["gflops"])
                emit(dict(peak, model=model, round=round_index + 1))
            shift = round_index % len(runnable)
            for label in runnable[shift:] + runnable[:shift]:
                waited = machine.wait_for_idle(args.wait_idle)
                print(f"# {model} round {round_index + 1}: {label}", file=sys.stderr, flush=True)
                begin = time.perf_counter()
                record, error = run_child(
                    command(label, model, args.steps, args.warmup), args.timeout
                )
                record = dict(record or {}, error=error) if error else record
                record.update(
                    model=model,
                    label=label,
                    round=round_index + 1,
                    waited_idle_s=waited,
                    process_s=round(time.perf_counter() - begin, 1),
                )
                records.append(record)
                emit(dict(record, kind="run"))
    ceiling_gflops = statistics.median(ceilings) if ceilings else None
    summaries = summarize(records, ceiling_gflops)
    for row in summaries:
        emit(row)
    print()
    print(
        f"{machine.cpu_name()}, {os.cpu_count()} cores, {platform.system()} "
        f"{platform.release()}; {started:%Y-%m-%d %H:%M} UTC; {args.rounds} rounds of "
        f"{args.steps} steps; float32 matmul ceiling {ceiling_gflops} GFLOP/s (median of "
        f"{len(ceilings)})"
    )
    print()
    print(markdown(summaries), end="")


if __name__ == "__main__":
    main()
