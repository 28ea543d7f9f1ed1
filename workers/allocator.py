"""Keep the memory a training step frees inside the process, for the next micro-batch to reuse.

    retain_freed_memory()   # True on glibc: later frees stay in the heap; False (nothing changed) elsewhere

Each micro-batch allocates and frees the same large buffers (per-layer activations, the [K, vocab] target
logits). glibc's malloc returns blocks above its mmap threshold to the kernel and trims the heap's free
top beyond its trim threshold, so each micro-batch would page-fault that memory back in, zero-filled.
Raising both thresholds (`mallopt`) keeps freed blocks in the heap (the page faults saved:
benchmarks/README.md). Cost: resident memory stays at its high-water mark between steps; the peak, which
is what must fit, is unchanged. Process-wide, settable at any time (it governs later allocations and
frees); only glibc has these knobs, so musl and macOS are left as they are.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value (64-bit)
TRIM_THRESHOLD = 2**30  # free memory at the heap's top up to this stays mapped


def retain_freed_memory() -> bool:
    """Serve allocations up to 32 MiB from the heap and keep up to 1 GiB of freed heap mapped.

    Returns True when glibc took both settings, False where they do not exist (nothing is changed then)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 -- glibc only: musl has mallopt as a no-op stub
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.warning("mallopt refused the thresholds; freed memory goes back to the kernel as before")
    return done
