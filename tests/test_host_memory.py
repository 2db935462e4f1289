"""keep_freed_memory: a large block freed and allocated again is not page-faulted again."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)

# mallocs and fills 256 MB, frees it, mallocs and fills it again, and prints the minor page faults
# of the second fill (what every training step pays for its temporaries).
PROGRAM = """
import ctypes, resource, sys
from attnx import host_memory
if sys.argv[1] == "keep":
    assert host_memory.keep_freed_memory()
    assert host_memory.keep_freed_memory()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 256 << 20
block = libc.malloc(size); ctypes.memset(block, 1, size); libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = libc.malloc(size); ctypes.memset(block, 1, size)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_fill_faults(mode: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True
    )
    return int(result.stdout.split()[-1])


def test_freed_blocks_are_reused_instead_of_mapped_again():
    # 256 MB in 4 KiB pages is 65,536 faults when the block is mapped afresh.
    assert second_fill_faults("default") > 30_000
    assert second_fill_faults("keep") < 1_000
