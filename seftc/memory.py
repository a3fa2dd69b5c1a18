"""Give freed memory back to the system between phases.

glibc's malloc keeps the pages of freed chunks inside its heap, so a process that frees one
decoder block's tensors before reading the next (the FSDP2 loader, each training step's
activations) keeps a resident set well above what it holds: measured ~0.75 GB of 2.4 GB on a
0.5 B model's per-rank load. `release()` asks glibc to return them (`malloc_trim`); elsewhere it
does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc.malloc_trim if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def release() -> None:
    """Return the free pages of the C heap to the system (glibc); a no-op elsewhere."""
    trim = _trim()
    if trim is not None:
        trim(0)
