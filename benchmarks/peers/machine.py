"""The machine a benchmark runs on: how busy it is, peak memory, the matmul ceiling.

Benchmarks here share two CPU cores with whatever else runs. `wait_for_idle`
waits until other processes use almost no CPU; `LoadWindow` records how many
cores other processes used while a block ran (the machine's busy time from
/proc/stat minus this process's own CPU time and its children's), so every
measurement can say whether it was taken on a quiet machine. `peak_rss_mb` is
the process's high-water resident memory. `python -m benchmarks.peers.machine`
measures the float32 matrix-product ceiling (GFLOP/s) that MFU divides by.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

_TICKS = os.sysconf("SC_CLK_TCK")


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (user, nice, system, irq, softirq)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except OSError:  # not Linux: no machine-wide figure, so "other load" reads 0
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / _TICKS


def _descendants_cpu_s(root: int) -> float:
    """CPU seconds of the live descendants of `root` (e.g. torch.compile's worker pool),
    which getrusage only counts once they are reaped."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(rest[1]), []).append((int(entry), int(rest[11]) + int(rest[12])))
    ticks, stack = 0, [root]
    while stack:
        for pid, used in children.get(stack.pop(), []):
            ticks += used
            stack.append(pid)
    return ticks / _TICKS


def _own_cpu_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (
        me.ru_utime
        + me.ru_stime
        + reaped.ru_utime
        + reaped.ru_stime
        + _descendants_cpu_s(os.getpid())
    )


class LoadWindow:
    """`with LoadWindow() as w: ...`, then `w.other_load`: cores other processes used meanwhile."""

    other_load: float = 0.0

    def __enter__(self) -> "LoadWindow":
        self._start = (time.perf_counter(), _busy_cpu_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = (time.perf_counter(), _busy_cpu_s(), _own_cpu_s())
        other = max(0.0, (busy - self._start[1]) - (own - self._start[2]))
        self.other_load = round(other / max(wall - self._start[0], 1e-9), 3)


def wait_for_idle(max_wait_s: float, *, threshold: float = 0.15, sample_s: float = 5.0) -> float:
    """Blocks until other processes use fewer than `threshold` cores over `sample_s` seconds.

    Returns the seconds waited, or -1.0 after `max_wait_s` without an idle
    sample (the caller then runs anyway; its `other_load` shows how busy it was).
    `max_wait_s <= 0` returns 0.0 at once.
    """
    if max_wait_s <= 0:
        return 0.0
    start = time.perf_counter()
    while True:
        with LoadWindow() as window:
            time.sleep(sample_s)
        waited = time.perf_counter() - start
        if window.other_load < threshold:
            return round(waited - sample_s, 1)
        if waited >= max_wait_s:
            print(
                f"# machine still busy ({window.other_load:.2f} other cores) after "
                f"{waited:.0f} s; running anyway",
                file=sys.stderr,
                flush=True,
            )
            return -1.0


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time_calls(fn, min_reps: int, min_s: float) -> list[float]:
    """Seconds of each call: at least `min_reps` calls and `min_s` seconds in all."""
    times: list[float] = []
    while len(times) < min_reps or sum(times) < min_s:
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


def matmul_gflops(framework: str, n: int = 2048, reps: int = 7) -> dict:
    """Median float32 GFLOP/s of an `n x n` matrix product (2 n^3 FLOPs) in 'jax' or 'torch'."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        # HIGHEST: a true float32 product on every backend (CPU's default already is).
        product = jax.jit(lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST))
        a, b = jax.random.normal(jax.random.key(0), (2, n, n), jnp.float32)

        def call() -> None:
            product(a, b).block_until_ready()

        version = jax.__version__
    elif framework == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        a, b = torch.randn(2, n, n).unbind(0)
        out = torch.empty(n, n)

        def call() -> None:
            torch.mm(a, b, out=out)

        version = torch.__version__
    else:
        raise ValueError(f"matmul_gflops: framework must be 'jax' or 'torch', got {framework!r}")
    call()
    call()  # compile (jax) and warm the caches and thread pool
    with LoadWindow() as window:
        times = _time_calls(call, reps, 1.0)
    return dict(
        kind="matmul_ceiling",
        framework=framework,
        version=version,
        n=n,
        gflops=round(2.0 * n**3 / statistics.median(times) / 1e9, 1),
        gflops_best=round(2.0 * n**3 / min(times) / 1e9, 1),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        other_load=window.other_load,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="float32 matmul ceiling, one JSON line")
    parser.add_argument("--framework", choices=("jax", "torch"), default="jax")
    parser.add_argument("--n", type=int, default=2048)
    args = parser.parse_args()
    print(json.dumps(matmul_gflops(args.framework, args.n)), flush=True)


if __name__ == "__main__":
    main()
