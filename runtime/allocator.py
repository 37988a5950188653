"""Host allocator tuning: keep the runtime's transient host buffers in glibc's heap.

A denoising step allocates and frees the same host tensors over and over. With glibc's defaults a
buffer over 128 KiB may be mmap'ed and one freed at the top of the heap is trimmed back to the
kernel, so the next step faults the same pages in again; which regime a process lands in depends
on its allocation history. Measured on the 2-core CPU with the tiny model (64x64, batches of 4,
five fresh processes each; command and raw output: docs/api.md, "Host memory"): 0.077-0.109 s
per batch and about 38,000 minor page faults per batch untuned, against 0.054-0.056 s and 25 with
the tuning below, peak RSS unchanged (0.58 GB); the embedded toy-world model was unaffected
(0.14 s either way).

tune_host_allocator() keeps buffers up to 32 MiB (glibc's largest mmap threshold on 64-bit) in the
heap and returns freed memory to the kernel only when more than 1 GiB of it sits at the heap's
top. It is a no-op where the C library is not glibc, where the user tuned malloc already
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_MAX_ or
glibc.malloc in GLIBC_TUNABLES), or with DELEAKER_MALLOC_TUNING=0.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("deleaker")

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc caps the threshold at HEAP_MAX_SIZE / 2 = 32 MiB on 64-bit
TRIM_THRESHOLD_BYTES = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_done: str | None = None  # what the first call decided: "tuned" or why not


def tune_host_allocator() -> str:
    """Apply the tuning once per process; returns "tuned" or the reason it was left alone."""
    global _done
    if _done is None:
        _done = _tune()
        log.debug("host allocator: %s", _done)
    return _done


def _tune() -> str:
    if os.environ.get("DELEAKER_MALLOC_TUNING", "1") == "0":
        return "off (DELEAKER_MALLOC_TUNING=0)"
    if any(v in os.environ for v in USER_SETTINGS) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left as the environment set it"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    return "tuned" if ok else "mallopt refused"
