"""The C heap, set for a process whose requests build and drop arrays of tens of megabytes.

The largest requests work on arrays of millions of entries (a pipeline schedule's every action:
its code, cost, the action it waits for, its times; a long rank's tape), each a few to tens of
megabytes, made and dropped several times per request. glibc's allocator serves a block past
its mmap threshold (128 KiB at first, raised as such blocks are freed, up to 32 MiB) with fresh
pages from the kernel and hands them back when it is freed, so every such array pays a page
fault per 4 KiB page when first written: on this project's 2-core machine a cumulative sum over
3 million integers took 30-57 ms into a fresh array and 6 ms into a reused one.

``tune()`` (called with ``collector.tune()``, once per serving process) serves blocks up to
``MMAP_THRESHOLD`` from the heap and keeps up to ``TRIM_THRESHOLD`` of freed heap for reuse
instead of trimming it: the pages of one request's arrays are the next one's. The process's
peak resident memory is unchanged (the same arrays are live at once); what it keeps after a
large request is at most ``TRIM_THRESHOLD`` more. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune"]

MMAP_THRESHOLD = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # (malloc.h)
_TUNED: list[bool | None] = [None]


def tune() -> bool:
    """Once per process; whether the heap was set (glibc) or left as it is."""
    if _TUNED[0] is not None:
        return _TUNED[0]
    _TUNED[0] = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # (musl and others have no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _TUNED[0] = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) \
        and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _TUNED[0]
