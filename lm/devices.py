"""The host process's set-up: simulated CPU devices and the allocator. Everything here must run
before JAX starts its backend, so this module imports nothing of JAX."""

import ctypes
import os

# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD = -1, -2


def simulate_cpu_devices(n: int) -> None:
    """Make JAX see `n` CPU devices (a mesh on a laptop or CI box).

    XLA's CPU client runs every device's program, and each collective in it, on thread pools
    sized by NPROC (default: the number of cores). A collective blocks its thread until all `n`
    devices arrive, and a device program can have several in flight, so on a 2-core machine 8
    devices deadlock within minutes ("Expected 8 threads to join the rendezvous"). Pools of 4n
    threads never did in our runs; idle threads cost nothing."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    if n > 1:
        os.environ["NPROC"] = str(max(4 * n, int(os.environ.get("NPROC", 0))))


def host_memory_bytes() -> int:
    """This host's physical memory, which its simulated CPU devices share."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def keep_freed_memory() -> None:
    """Make glibc's malloc keep the memory a step frees for the next step.

    XLA's CPU runtime allocates each step's buffers afresh, and by default glibc returns the
    freed top of its heap to the kernel, so the next step faults the pages in again: the main
    job's d64 step took 9,500 minor page faults. A heap that grows 64 MiB at a time and is not
    trimmed below 1 GiB of free memory: a few hundred to a few thousand faults, steps 1.2-1.6x
    faster at the two largest sizes, 1.0-1.07x at the small ones (tools/malloc_bench.py). The process
    keeps its peak heap, which a training process reaches every step anyway. Nothing happens
    where malloc is not glibc's."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return
    mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    mallopt(_M_TOP_PAD, 64 << 20)
