"""Host memory that a training process keeps instead of handing back to the kernel every step.

On the CPU, XLA allocates each execution's temporaries as one block (776 MB
for the cpu-small Transformer step of `benchmarks/train_step.py`) and frees
it when the step ends. glibc serves a block that large with a fresh `mmap`
and returns it with `munmap`, so every step the kernel maps and zeroes it
again, one 4 KiB page fault at a time: 190,000 faults and about half a second
of kernel time per step, a quarter of the step. Its heap would do the same
when its free top exceeds the trim threshold.

`keep_freed_memory()` tells glibc's malloc to keep what it frees: one arena
(freed blocks are found again by the next step, whatever thread asks), no
`mmap` for large blocks (they come from the heap and go back to it), and a
trim threshold of 2 GiB (the heap is not shrunk between steps). Measured on
the cpu-small Transformer step (2 cores, 3 alternated fresh processes):
page faults per run 2.8 M -> 0.37 M, kernel time 8-11 s -> 2.2 s, median
step 1351 -> 1158 ms. The price is resident memory: freed blocks stay with the
process (peak RSS 1.6 GB in one run, 2.0 GB in `benchmarks.compare`'s).

It changes the process's allocator, so attnx calls it only from its own
entry points (`python -m attnx.main`, the benchmarks, the test suite), never
on import: code that imports attnx's layers keeps its own allocator. It must
run before JAX starts its thread pools (arenas are assigned per thread when a
thread first allocates). On other C libraries (macOS, musl) it does nothing.
The same settings from the environment, for any other program:
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt takes a C int: 2 GiB - 1 is the largest trim threshold it can be given.
TRIM_THRESHOLD = (1 << 31) - 1

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to keep freed memory (see the module docstring); idempotent.

    Returns:
      True if the settings are in effect, False where the C library is not
      glibc (nothing is changed there).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    # mallopt returns 1 on success, 0 on a value it refuses.
    _applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in settings)
    return _applied
