"""Hand freed heap memory back to the operating system between rounds.

A site's process frees ~100 MB blocks every round (incoming weights, gradients, Adam's
moments, outgoing weights); glibc keeps much of that memory mapped for reuse, so an idle
simulated site (or the server between rounds) would still hold its training peak. Peaks
of different processes then add up. ``malloc_trim`` returns the free pages; it costs a
few milliseconds and is a no-op where glibc is absent (macOS, musl).
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


def release_freed_memory() -> bool:
    """Return free heap pages to the OS; True where that was possible."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True
