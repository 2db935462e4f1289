"""The BUILD.md table: every paper setting's training step compiled for TPU topologies.

  python benchmarks/compile_table.py [--topologies=v5e:2x2,v5e:4x4,v4:2x2x2] [EXPERIMENT ...]

Runs `python -m attnx.main --mode=compile --config.compile.steps=train` once
per (experiment, topology) on this machine (libtpu: `pip install -e '.[aot]'`;
no TPU, no data), prints each JSON line as it comes, then one Markdown table
of them. The mesh is each experiment's own (`config.mesh`, pure data
parallelism by default).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default=TOPOLOGIES)
    parser.add_argument("experiments", nargs="*", default=PAPER_SETTINGS)
    args = parser.parse_args()
    rows = []
    for experiment in args.experiments:
        for topology in args.topologies.split(","):
            line = compile_line(experiment, topology)
            print(json.dumps(line), flush=True)
            rows.append(line)
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
