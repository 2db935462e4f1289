"""Peak memory of causal self-attention, forward+backward, one JSON line per case.

Default: 16,384 tokens, batch 1, 8 heads, head dim 64, float32. Cases:

* `baseline`: a process that imports jax, allocates the inputs and compiles and
  runs a trivial jitted function (so that the runtime and compiler are up);
* `chunked`: runs `grad(sum(attention(..., implementation='chunked') * ct))`
  for real;
* `reference` and `xla`: compile only (they would need `heads * length^2 * 4`
  bytes = 8.6 GB for one float32 score matrix at 16k, and several of them for
  the backward), to report XLA's own estimate of what they would need.

Every case runs in a fresh subprocess; its peak resident set size is read with
`os.wait4` (the kernel's `ru_maxrss` of that child alone). `peak_rss_above_baseline`
subtracts the baseline's peak. Every case also reports XLA's estimate from
`jax.jit(f).lower(...).compile().memory_analysis()`: `temp_size_in_bytes`
(scratch buffers), argument and output sizes.

  python benchmarks/attention_memory.py
  python benchmarks/attention_memory.py --length 4096 --cases baseline,chunked
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

GIB = 1024**3
LIMIT_BYTES = 2 * GIB  # the acceptance bound for 'chunked' at 16k tokens
RUN_FOR_REAL = ("baseline", "chunked")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--cases", default="baseline,chunked,reference,xla", help="comma-separated")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal
    return parser.parse_args()


def run_child(case: str, args: argparse.Namespace) -> None:
    """Runs one case in this (fresh) process and prints its JSON fields."""
    import jax
    import jax.numpy as jnp

    from attnx.layers.attention import attention

    shape = (args.batch, args.length, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    query, key, value, cotangent = (jax.random.normal(k, shape, jnp.float32) for k in keys)
    jax.block_until_ready((query, key, value, cotangent))

    if case == "baseline":
        jax.block_until_ready(jax.jit(lambda x: jnp.sum(x * 2.0))(query))
        print(json.dumps({}))
        return

    def loss(query, key, value):
        output = attention(query, key, value, is_causal=True, implementation=case)
        return jnp.sum(output * cotangent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = step.lower(query, key, value).compile()
    fields = dict(compile_s=round(time.perf_counter() - start, 3))
    stats = compiled.memory_analysis()
    for name in ("temp", "argument", "output", "alias"):
        fields[f"xla_{name}_size_in_bytes"] = int(getattr(stats, f"{name}_size_in_bytes"))
    if case in RUN_FOR_REAL:
        start = time.perf_counter()
        grads = jax.block_until_ready(compiled(query, key, value))
        fields["fwd_bwd_s"] = round(time.perf_counter() - start, 3)
        fields["grads_finite"] = bool(all(jnp.all(jnp.isfinite(g)) for g in grads))
    print(json.dumps(fields))


def measure(case: str, args: argparse.Namespace) -> dict:
    """Runs `case` in a fresh subprocess; returns its fields and its peak RSS in bytes."""
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={case}",
        f"--length={args.length}",
        f"--batch={args.batch}",
        f"--heads={args.heads}",
        f"--head_dim={args.head_dim}",
    ]
    # Output goes to files (a full pipe could block the child); wait4 reaps the child
    # and returns the resource usage of that child alone.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["no output"]
        return dict(error=f"exit code {child.returncode}: {tail[0]}")
    fields = json.loads(stdout.strip().splitlines()[-1])
    fields["peak_rss_bytes"] = usage.ru_maxrss * 1024  # Linux reports kilobytes
    return fields


def main() -> None:
    args = parse_args()
    if args.child is not None:
        run_child(args.child, args)
        return
    import jax  # only for the backend's name; the measurements run in children

    baseline_rss = None
    for case in args.cases.split(","):
        record = dict(
            benchmark="attention_memory",
            implementation=case,
            length=args.length,
            batch=args.batch,
            heads=args.heads,
            head_dim=args.head_dim,
            backend=jax.default_backend(),
            executed=case in RUN_FOR_REAL,
        )
        record.update(measure(case, args))
        rss = record.get("peak_rss_bytes")
        if case == "baseline":
            baseline_rss = rss
        elif rss is not None and baseline_rss is not None and case in RUN_FOR_REAL:
            above = rss - baseline_rss
            record["peak_rss_above_baseline_bytes"] = above
            record["peak_rss_above_baseline_gib"] = round(above / GIB, 3)
            record["under_2gib"] = above < LIMIT_BYTES
        if "xla_temp_size_in_bytes" in record:
            record["xla_temp_size_gib"] = round(record["xla_temp_size_in_bytes"] / GIB, 3)
        if rss is not None:
            record["peak_rss_gib"] = round(rss / GIB, 3)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
