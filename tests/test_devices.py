"""The host process's allocator set-up (lm.devices.keep_freed_memory), in fresh processes:
malloc settings are process-wide and must come before JAX."""

import ctypes
import subprocess
import sys

import pytest

FREED = """
import ctypes, sys
from lm.devices import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype, libc.malloc.restype = Info, ctypes.c_void_p
blocks = [libc.malloc(64 << 10) for _ in range(128)]  # 8 MiB in blocks under mmap's threshold
for block in blocks:
    ctypes.memset(block, 1, 64 << 10)
grown = libc.mallinfo2().arena
for block in reversed(blocks):
    libc.free(ctypes.c_void_p(block))
print(grown, libc.mallinfo2().arena)
"""


def _heap_grown_then_after_free(setting: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", FREED, setting], capture_output=True, text=True,
                         check=True).stdout
    return tuple(map(int, out.split()))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_a_freed_block_stays_in_the_heap_for_the_next_step():
    grown, after = _heap_grown_then_after_free("default")  # glibc trims the heap's free top
    assert grown >= 8 << 20 and after < 8 << 20
    grown, after = _heap_grown_then_after_free("keep")  # the heap keeps it for the next step
    assert grown >= 8 << 20 and after >= grown
