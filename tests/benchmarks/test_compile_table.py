"""The BUILD.md compile table is what `benchmarks/compile_table.py` prints from its committed lines."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_build_md_table_is_the_commands_table():
    # --measured-only compiles nothing: it reads benchmarks/results/compile_table.jsonl.
    printed = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "compile_table.py"), "--measured-only"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = [line for line in printed.splitlines() if line.startswith("|")]
    with open(os.path.join(ROOT, "BUILD.md"), encoding="utf-8") as f:
        build = f.read().splitlines()
    start = build.index(table[0])
    assert build[start : start + len(table)] == table
    experiments = {line.split("|")[1].strip() for line in table[2:]}
    topologies = {line.split("|")[2].strip() for line in table[2:]}
    assert len(experiments) == 6 and topologies == {"v5e:2x2", "v5e:4x4", "v4:2x2x2"}
    assert len(table) == 2 + 18, "every paper setting on every topology"
