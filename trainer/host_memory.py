"""Freed host tensors go back to the operating system.

glibc's malloc takes a block from mmap only above a threshold, which it raises (up to 32 MiB)
each time the process frees a large mmapped block; a block under the threshold comes from the
heap, and a freed heap block stays in the process's resident memory for later reuse. A sharded
training step allocates and frees activations, gathered FSDP units and communication buffers of
a few MiB each, so without a fixed threshold a rank's resident memory ends a step about a
gigabyte above its live tensors at the 0.7B size (docs/benchmarks.md). `run.host_mmap_threshold_kib`
fixes the threshold: every block at least that large is mmapped and unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_mmap_threshold(kib: int) -> bool:
    """Serve allocations of at least `kib` KiB from mmap (fixed; glibc's adjustment off).
    False where it cannot (0, or a C library without mallopt: musl, macOS)."""
    if kib <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))
