"""glibc's allocator, tuned for training loops that allocate the same large tensors every step.

By default glibc serves every allocation above 128 KiB (a threshold that adapts up to 32 MiB) with
its own ``mmap`` and gives freed memory at the top of the heap back to the system as soon as
128 KiB or more is free. A training step allocates and frees activations of several MiB to tens
of MiB each, so every step maps fresh pages and the kernel zero-fills them again: on the DIN step
of ML100K ``make bench`` printed 12,751 samples/s right before this and 13,689 right after it
(run-to-run noise here: ±5–10 %). PyTorch's
CPU tuning guide recommends an allocator that keeps memory (jemalloc, tcmalloc); this does the
same with glibc's own knobs (``mallopt``): allocations up to 32 MiB come from the heap, freed
memory stays with the process (trim threshold 2 GiB, mallopt's largest) and the heap grows in 512 MiB steps, whose
untouched pages cost no memory. Peak RSS is that of the busiest step either way.

:func:`tune_malloc` is called by the training entry points (``ctr.runs.start_run``) unless
``CTR_MALLOC_TUNING=0``; environment variables the user set (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) win. On systems without glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {  # parameter: (value, the environment variable that overrides it)
    M_MMAP_THRESHOLD: (32 * 2**20, "MALLOC_MMAP_THRESHOLD_"),
    M_TRIM_THRESHOLD: (2**31 - 1, "MALLOC_TRIM_THRESHOLD_"),
    M_TOP_PAD: (512 * 2**20, "MALLOC_TOP_PAD_"),
}
_applied: dict | None = None


def tune_malloc() -> dict:
    """Apply the settings once per process; returns what was set (empty when nothing was)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = {}
    if os.environ.get("CTR_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux":
        return _applied
    if platform.libc_ver()[0] != "glibc":
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return _applied
    for param, (value, env) in SETTINGS.items():
        if env in os.environ:  # the user's own setting stays
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:  # values fit a C int
            _applied[env.strip("_").lower()] = value
    return _applied


def applied() -> dict | None:
    """What :func:`tune_malloc` set in this process (None: it was not called)."""
    return _applied
