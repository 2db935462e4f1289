"""Forward+backward time of each `attention` implementation, one JSON line per case.

Causal self-attention, float32, `[batch, length, heads, head_dim]` inputs. For
every (implementation, length) the script compiles `grad(sum(attention * ct))`
with respect to query, key and value (reporting the compile time), runs it
once to warm up, then reports the median and minimum of `--repeats` timed runs.

  python benchmarks/attention_speed.py
  python benchmarks/attention_speed.py --lengths 256,1024 --implementations xla,chunked

'splash' runs only on TPU (elsewhere it would run in Pallas interpret mode, which
measures the interpreter, not the kernel): off TPU it prints a line saying it was
skipped. 'cudnn' likewise needs a GPU.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from attnx.layers.attention import attention

NEEDS_BACKEND = {"splash": "tpu", "cudnn": "gpu"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024,2048,4096", help="comma-separated")
    parser.add_argument(
        "--implementations", default="reference,xla,chunked,splash", help="comma-separated"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head_dim", type=int, default=64)
    return parser.parse_args()


def time_case(implementation: str, length: int, args: argparse.Namespace) -> dict:
    """Compiles and times forward+backward of one implementation at one length."""
    shape = (args.batch, length, args.heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4)
    query, key, value, cotangent = (jax.random.normal(k, shape, jnp.float32) for k in keys)

    def loss(query, key, value):
        output = attention(query, key, value, is_causal=True, implementation=implementation)
        return jnp.sum(output * cotangent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = step.lower(query, key, value).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(query, key, value))  # warm-up

    times_ms = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(query, key, value))
        times_ms.append(1e3 * (time.perf_counter() - start))
    return dict(
        fwd_bwd_ms_median=round(statistics.median(times_ms), 3),
        fwd_bwd_ms_min=round(min(times_ms), 3),
        compile_s=round(compile_s, 3),
    )


def main() -> None:
    args = parse_args()
    backend = jax.default_backend()
    lengths = [int(length) for length in args.lengths.split(",")]
    for implementation in args.implementations.split(","):
        for length in lengths:
            record = dict(
                benchmark="attention_speed",
                implementation=implementation,
                length=length,
                batch=args.batch,
                heads=args.heads,
                head_dim=args.head_dim,
                backend=backend,
            )
            needed = NEEDS_BACKEND.get(implementation)
            if needed is not None and backend != needed:
                record["skipped"] = (
                    f"{implementation!r} runs only on {needed}; backend is {backend}"
                )
            else:
                try:
                    record.update(time_case(implementation, length, args))
                # Report a failing case (e.g. out of memory) and go on with the others.
                except Exception as error:
                    record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
