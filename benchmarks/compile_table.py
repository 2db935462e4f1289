"""The BUILD.md table: every paper setting's training step compiled for TPU topologies.

  python benchmarks/compile_table.py [--topologies=v5e:2x2,v5e:4x4,v4:2x2x2] \
      [--jsonl=benchmarks/results/compile_table.jsonl] [EXPERIMENT ...]

Runs `python -m attnx.main --mode=compile --config.compile.steps=train` once
per (experiment, topology) on this machine (libtpu: `pip install -e '.[aot]'`;
no TPU, no data), prints each JSON line as it comes, then one Markdown table
of them. The mesh is each experiment's own (`config.mesh`, pure data
parallelism by default).

A paper setting's step takes the TPU compiler 10 to 20 minutes on two CPU
cores, so each line is appended to `--jsonl` as soon as it comes, and a
(experiment, topology) pair already there is read back instead of compiled
again: an interrupted table resumes where it stopped. Delete the file (or
the pair's line) to measure again.
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_SETTINGS = (
    "wmt14_transformer_base",
    "wmt14_transformer_big",
    "wmt14_convs2s",
    "wmt14_rnnsearch",
    "wmt14_luong",
    "coco_spatial",
)
TOPOLOGIES = "v5e:2x2,v5e:4x4,v4:2x2x2"
GIB = 1024**3


def compile_line(experiment: str, topology: str) -> dict:
    """The train step's JSON line of `--mode=compile`, with its exit status."""
    command = [
        sys.executable,
        "-m",
        "attnx.main",
        f"--config={os.path.join(ROOT, 'experiments', experiment + '.py')}",
        "--mode=compile",
        f"--config.compile.topology={topology}",
        "--config.compile.steps=train",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(
            f"{experiment} on {topology} printed no JSON line:\n{result.stderr[-2000:]}"
        )
    line = json.loads(lines[-1])
    line["experiment"], line["exit_status"] = experiment, result.returncode
    return line


def read_lines(path: str) -> dict[tuple[str, str], dict]:
    """The lines already measured, by (experiment, topology); none if the file is absent."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = [json.loads(line) for line in f if line.strip()]
    return {(line["experiment"], line["topology"]): line for line in lines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default=TOPOLOGIES)
    parser.add_argument(
        "--jsonl",
        default=os.path.join(ROOT, "benchmarks", "results", "compile_table.jsonl"),
        help="measured lines: appended to, and read back instead of compiling again",
    )
    parser.add_argument(
        "--measured-only",
        action="store_true",
        help="print the table of the lines already in --jsonl; compile nothing",
    )
    parser.add_argument("experiments", nargs="*", default=PAPER_SETTINGS)
    args = parser.parse_args()
    done = read_lines(args.jsonl)
    os.makedirs(os.path.dirname(os.path.abspath(args.jsonl)), exist_ok=True)
    rows = []
    # Topology-major: every setting on the smallest slice first.
    for topology in args.topologies.split(","):
        for experiment in args.experiments:
            line = done.get((experiment, topology))
            if line is None and args.measured_only:
                continue
            if line is None:
                line = compile_line(experiment, topology)
                with open(args.jsonl, "a", encoding="utf-8") as f:
                    f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
            rows.append(line)
    rows.sort(key=lambda r: (args.experiments.index(r["experiment"]), r["topology"]))
    print()
    print(
        "| experiment | topology | mesh (data, fsdp, tensor) | memory per chip | HBM | fits "
        "| roofline step | tokens/s bound | bound | loops |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mesh = "x".join(str(r["mesh"][axis]) for axis in ("data", "fsdp", "tensor"))
        print(
            f"| {r['experiment']} | {r['topology']} | {mesh} | {r['total_bytes'] / GIB:.2f} GiB "
            f"| {r['hbm_bytes'] / GIB:.0f} GiB | {'yes' if r['fits'] else '**no**'} "
            f"| {r['roofline_step_s'] * 1e3:.1f} ms | {r['tokens_per_s_bound']:,.0f} "
            f"| {r['bound']} | {r['while_loops']} |"
        )


if __name__ == "__main__":
    main()
