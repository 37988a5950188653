"""Clocks, statistics and peak memory: the measuring instruments of the harness.

GPU work is timed with CUDA events around each run (the GPU's own clock, no host sync between
runs); CPU work and backends that return host arrays (implicitly synchronous) with
time.perf_counter. Peak host memory is the process's resident high-water mark (VmHWM), reset
per measurement through /proc/self/clear_refs where Linux allows it; peak device memory is
torch's caching allocator high-water mark (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import re
import resource
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Clocks


def _torch_cuda(device) -> bool:
    """True when `device` is a torch CUDA device (torch imported only if already loaded)."""
    if device is None or "torch" not in sys.modules:
        return False
    import torch

    return isinstance(device, torch.device) and device.type == "cuda"


def time_runs(fn: Callable[[], object], warmup: int, runs: int, device=None) -> tuple[list[float], str]:
    """Call `fn` warmup times, then `runs` timed times. Returns (seconds per run, timer name).

    device: a torch CUDA device -> CUDA events; anything else -> perf_counter around each call
    (fn must then return only when its work is done, as numpy-returning backends do)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    if _torch_cuda(device):
        import torch

        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events], "cuda_event"
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out, "perf_counter"


# ---------------------------------------------------------------------------------------------
# Statistics


def summarize(samples: list[float]) -> dict:
    """median, p10, p90, mean, min, max (seconds) of a list of per-run times."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no samples to summarize")
    return {
        "median_s": float(np.median(a)),
        "p10_s": float(np.percentile(a, 10)),
        "p90_s": float(np.percentile(a, 90)),
        "mean_s": float(a.mean()),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
    }


# ---------------------------------------------------------------------------------------------
# Memory


def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # macOS reports bytes, Linux KiB


@dataclass
class PeakMemory:
    """Context manager: peak host (and torch device) memory of the code inside.

    host_scope is "measurement" when the high-water mark could be reset at the start, else
    "process" (the process's lifetime peak, an upper bound)."""

    device: object = None  # torch.device or None
    peak_host_mib: float | None = None
    host_scope: str = "process"
    peak_device_mib: float | None = None
    device_resident_mib: float | None = None  # allocated at entry (weights, cached inputs)

    def __enter__(self):
        self.host_scope = "measurement" if _reset_hwm() and _read_hwm_kib() is not None else "process"
        if _torch_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.device_resident_mib = torch.cuda.memory_allocated(self.device) / MIB
        return self

    def __exit__(self, *exc):
        kib = _read_hwm_kib() if self.host_scope == "measurement" else None
        self.peak_host_mib = (kib if kib is not None else _maxrss_kib()) / 1024
        if _torch_cuda(self.device):
            import torch

            torch.cuda.synchronize(self.device)
            self.peak_device_mib = torch.cuda.max_memory_allocated(self.device) / MIB
        return False

    def fields(self) -> dict:
        return {"peak_host_mib": _round(self.peak_host_mib), "host_peak_scope": self.host_scope,
                "peak_device_mib": _round(self.peak_device_mib),
                "device_resident_mib": _round(self.device_resident_mib)}


def _round(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)
