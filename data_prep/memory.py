"""Process memory: handing freed heap pages back to the operating system."""

from __future__ import annotations

import ctypes

try:
    _malloc_trim = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc: nothing to hand back this way
    _malloc_trim = None


def release_free_memory() -> None:
    """Return freed heap pages to the system (glibc's malloc_trim; elsewhere nothing).

    glibc keeps the pages freed between long-lived allocations, and each thread's malloc arena keeps
    its own, so a process that frees large blocks again and again grows in resident memory unless it
    hands them back.
    """
    if _malloc_trim is not None:
        _malloc_trim(0)
