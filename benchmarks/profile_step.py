"""Where attnx's training step spends its time: a profile by kind of work and by phase.

Runs the step of `benchmarks.train_step` (the cpu-small settings) under
`jax.profiler`, reads the trace back, and attributes the time of every XLA
operation the step executed to

  kind   matmul (dot fusions), convolution, random bits (threefry hashing for
         dropout and sampling), gather/scatter (embeddings, their gradients),
         reduction (softmax, layer norm, loss, sums), data movement (copies,
         transposes, slices, concatenations, dynamic updates), elementwise
         (every other fusion), custom-call, other;
  phase  forward (inside JAX's `jvp(...)` of the loss), backward (its
         `transpose(...)`) and optimizer (everything outside the
         differentiated loss: the optimizer's update, gradient clipping,
         the step's metric sums).

Kinds are read from the compiled HLO: a fusion is a matmul if its fused
computation holds a `dot`, and so on down the list above. Phases come from the
`op_name` XLA keeps on each operation (the HLO's stack frames name only the
caller's files, not optax's, so they cannot tell the optimizer apart). Operations that run inside a `while` loop
(the RNNs' `lax.scan`) are counted at every iteration they run; the loop
operation itself is not counted, so nothing is counted twice.

Prints JSON lines: one per (model, kind), one per (model, phase), one per
model's ten most expensive operations (`kind: top_op`), and a summary with
the wall time per step and the share of it the operations account for (the
rest is the runtime's own work between operations: dispatch, buffer
allocation, the host).

  python -m benchmarks.profile_step --models transformer --steps 5
  python -m benchmarks.profile_step --trace_dir /tmp/attnx_trace   # keep the trace for TensorBoard/Perfetto

The per-operation events come from XLA:CPU's TraceMe annotations, switched on
by `--xla_cpu_enable_xprof_traceme` (this script adds the flag to XLA_FLAGS
before JAX starts). On a GPU or TPU the same trace holds the device's kernels;
read it with TensorBoard's profile plugin or Perfetto.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

# Per-operation trace events must be switched on before the XLA backend starts.
if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    ).strip()

import jax  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from attnx import host_memory  # noqa: E402
from benchmarks import train_step  # noqa: E402
from benchmarks.peers import machine  # noqa: E402

KINDS = (
    "matmul",
    "convolution",
    "random bits",
    "gather/scatter",
    "reduction",
    "data movement",
    "elementwise",
    "custom-call",
    "other",
)
# Operations that only hold or route other operations: their time is their body's.
CONTROL_FLOW = {"while", "conditional", "call", "async-start", "async-done"}
MOVEMENT = {
    "copy",
    "transpose",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "concatenate",
    "pad",
    "reverse",
}
# Opcodes that move or name data without computing anything.
PLUMBING = MOVEMENT | {
    "bitcast",
    "reshape",
    "broadcast",
    "parameter",
    "constant",
    "tuple",
    "get-tuple-element",
    "iota",
    "convert",
}
# threefry2x32 is rounds of 32-bit adds, rotations (two shifts and an or) and xors.
RANDOM_BITS = {"shift-left", "shift-right-logical", "xor"}
REDUCTIONS = {"reduce", "reduce-window", "select-and-scatter", "sort", "all-reduce"}

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?([^}\s]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _opcode(rest: str) -> str:
    """The opcode in `TYPE opcode(operands), attributes`; TYPE may be a nested tuple."""
    end = rest.find(" ")
    if rest.startswith("("):
        depth = 0
        for position, char in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth == 0:
                end = position + 1
                break
    match = re.match(r"\s*([a-z][\w\-]*)\(", rest[end:])
    return match.group(1) if match else "?"


def parse_hlo(text: str) -> dict[str, dict]:
    """Every instruction of an HLO module's text: opcode, called computations, metadata.

    Returns {instruction name: {"opcode", "computation", "calls", "op_name",
    "target"}}, plus the key "__computations__" mapping each
    computation to the names of its instructions.
    """
    instructions: dict[str, dict] = {}
    computations: dict[str, list[str]] = collections.defaultdict(list)
    current = None
    for line in text.splitlines():
        if not line.startswith((" ", "\t")):
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else None
            continue
        match = _INSTRUCTION.match(line)
        if current is None or not match:
            continue
        name, rest = match.groups()
        called = []
        for group in _CALLED.findall(rest):
            called += [c.lstrip("%") for c in group.split(",") if c]
        op_name = _OP_NAME.search(rest)
        target = _TARGET.search(rest)
        instructions[name] = dict(
            opcode=_opcode(rest),
            computation=current,
            calls=called,
            op_name=op_name.group(1) if op_name else "",
            target=target.group(1) if target else "",
        )
        computations[current].append(name)
    instructions["__computations__"] = dict(computations)
    return instructions


def _fused_opcodes(name: str, hlo: dict, seen: set[str] | None = None) -> set[str]:
    """Opcodes of an instruction and of every computation it calls, recursively."""
    seen = set() if seen is None else seen
    info = hlo[name]
    opcodes = {info["opcode"]}
    for computation in info["calls"]:
        if computation in seen:
            continue
        seen.add(computation)
        for inner in hlo["__computations__"].get(computation, ()):
            opcodes |= _fused_opcodes(inner, hlo, seen)
    return opcodes


def kind_of(name: str, hlo: dict) -> str:
    """The kind of work of one executed instruction (see the module docstring)."""
    info = hlo[name]
    if info["opcode"] == "custom-call":
        return "custom-call"
    opcodes = _fused_opcodes(name, hlo)
    if "convolution" in opcodes:
        return "convolution"
    if "dot" in opcodes:
        return "matmul"
    if RANDOM_BITS <= opcodes or "rng-bit-generator" in opcodes:
        return "random bits"
    if opcodes & {"gather", "scatter"}:
        return "gather/scatter"
    if opcodes & REDUCTIONS:
        return "reduction"
    if opcodes <= PLUMBING | {"fusion"} and opcodes & MOVEMENT:
        return "data movement"
    if info["opcode"] == "fusion" or opcodes - PLUMBING:
        return "elementwise"
    return "other"


def phase_of(name: str, hlo: dict) -> str:
    """forward, backward or optimizer, from the instruction's `op_name`."""
    op_name = hlo[name]["op_name"]
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer"


def trace_events(trace_dir: str) -> list[dict]:
    """The complete ('X') events of the newest Perfetto trace under `trace_dir`."""
    paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    paths += glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no trace written under {trace_dir}")
    with gzip.open(max(paths, key=os.path.getmtime), "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def attribute(events: list[dict], hlo: dict, steps: int) -> dict:
    """Milliseconds per step by instruction, and from them by kind and by phase."""
    by_op: dict[str, float] = collections.defaultdict(float)
    matched = 0
    for event in events:
        name = event["name"].lstrip("%")
        if name not in hlo or name == "__computations__":
            continue
        if hlo[name]["opcode"] in CONTROL_FLOW:
            continue
        by_op[name] += event["dur"] / 1e3 / steps
        matched += 1
    # Each executed instruction is classified once, however many events it has.
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_phase: dict[str, float] = collections.defaultdict(float)
    for name, ms in by_op.items():
        by_kind[kind_of(name, hlo)] += ms
        by_phase[phase_of(name, hlo)] += ms
    return dict(by_kind=by_kind, by_phase=by_phase, by_op=by_op, matched_events=matched)


def profile_model(name: str, steps: int, trace_dir: str) -> list[dict]:
    built = train_step.build_step(name)
    step, state, batch = built["step"], built["state"], built["batch"]
    hlo = parse_hlo(step.as_text())
    for _ in range(3):  # warm up outside the trace
        state, sums = step(state, batch)
    jax.block_until_ready((state, sums))
    model_dir = os.path.join(trace_dir, name)
    with jax.profiler.trace(model_dir, create_perfetto_trace=True):
        begin = time.perf_counter()
        for _ in range(steps):
            state, sums = step(state, batch)
            jax.block_until_ready((state, sums))
        wall_ms = (time.perf_counter() - begin) * 1e3 / steps
    found = attribute(trace_events(model_dir), hlo, steps)
    if not found["matched_events"]:
        raise RuntimeError(
            f"{name}: the trace holds no event named after an HLO instruction; "
            "is --xla_cpu_enable_xprof_traceme in XLA_FLAGS?"
        )
    op_ms = sum(found["by_kind"].values())

    def share_line(kind: str, what: str, ms: float, **more) -> dict:
        return dict(
            kind=kind,
            model=name,
            what=what,
            **more,
            ms_per_step=round(ms, 2),
            share=round(ms / op_ms, 3),
        )

    lines = [
        share_line("by_kind", kind, found["by_kind"][kind])
        for kind in KINDS
        if kind in found["by_kind"]
    ]
    for phase in ("forward", "backward", "optimizer"):
        lines.append(share_line("by_phase", phase, found["by_phase"].get(phase, 0.0)))
    top = sorted(found["by_op"].items(), key=lambda item: -item[1])[:10]
    for op, ms in top:
        lines.append(
            share_line(
                "top_op",
                op,
                ms,
                op_kind=kind_of(op, hlo),
                phase=phase_of(op, hlo),
                op_name=hlo[op]["op_name"][-120:],
            )
        )
    lines.append(
        dict(
            kind="summary",
            model=name,
            steps=steps,
            wall_ms_per_step=round(wall_ms, 1),
            op_ms_per_step=round(op_ms, 1),
            op_share_of_wall=round(op_ms / wall_ms, 3),
            gflop_per_step=round(built["flops"] / 1e9, 2) if built["flops"] else None,
            trace_dir=model_dir,
        )
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(train_step.MODELS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=5, help="traced steps")
    parser.add_argument("--trace_dir", "--trace-dir", help="keep the traces here")
    parser.add_argument("--wait_idle", "--wait-idle", type=float, default=0.0)
    args = parser.parse_args()
    unknown = sorted(set(args.models.split(",")) - set(train_step.MODELS))
    if unknown:
        parser.error(
            f"--models: unknown model {unknown[0]!r}; choose from {list(train_step.MODELS)}"
        )
    host_memory.keep_freed_memory()  # the allocator `python -m attnx.main` runs with
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="attnx_profile_")
    for name in args.models.split(","):
        machine.wait_for_idle(args.wait_idle)
        for line in profile_model(name, args.steps, trace_dir):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
