"""Simulated CPU devices. Everything here must run before JAX starts its backend, so this
module imports nothing of JAX."""

import os


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
