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
block = libc.malloc(8 << 20)
ctypes.memset(block, 1, 8 << 20)
mapped = libc.mallinfo2().hblkhd
libc.free(ctypes.c_void_p(block))
print(mapped, libc.mallinfo2().fordblks)
"""


def _mapped_then_kept(setting: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", FREED, setting], capture_output=True, text=True,
                         check=True).stdout
    return tuple(map(int, out.split()))


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
def test_a_freed_block_stays_in_the_heap_for_the_next_step():
    mapped, kept = _mapped_then_kept("default")  # glibc: a mapping of its own, unmapped on free
    assert mapped >= 8 << 20 and kept < 8 << 20
    mapped, kept = _mapped_then_kept("keep")  # from the heap, and still there after the free
    assert mapped < 8 << 20 and kept >= 8 << 20
