"""Prometheus metrics of one server process (or one Ray Serve replica), in their own registry."""

from __future__ import annotations

import gc
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# request latency from ~10 ms (tiny model) to minutes (large images on CPU)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
# garbage collection pauses: young generations take well under a millisecond, a walk of a loaded
# model's objects a good part of a second
GC_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self, max_batch: int):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("deleaker_queue_depth", "images waiting to start", registry=r)
        self.running = Gauge("deleaker_running_images", "images in the batch now running", registry=r)
        self.batch_size = Histogram("deleaker_batch_size", "images per generated batch",
                                    buckets=tuple(range(1, max_batch + 1)), registry=r)
        self.batch_seconds = Histogram("deleaker_batch_seconds", "wall time of one batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.queue_wait = Histogram("deleaker_queue_wait_seconds", "time an image waited before its batch started",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("deleaker_request_seconds", "end-to-end time of successful generation requests",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("deleaker_images", "images generated and returned", registry=r)
        self.requests = Counter("deleaker_requests", "generation requests answered, by HTTP status", ["status"],
                                registry=r)
        self.errors = Counter("deleaker_errors", "failed requests, by kind", ["kind"], registry=r)
        self.dropped = Counter("deleaker_dropped_images", "queued images dropped before they ran, by reason",
                               ["reason"], registry=r)
        self.gc_pause = Histogram("deleaker_gc_pause_seconds", "Python garbage collections, by generation (threads "
                                  "that run Python wait while one runs)", ["generation"], buckets=GC_BUCKETS, registry=r)
        self._gc_started = 0.0

    def watch_gc(self) -> None:
        """Time every garbage collection of this process into gc_pause, until unwatch_gc()."""
        if self._on_gc not in gc.callbacks:
            gc.callbacks.append(self._on_gc)

    def unwatch_gc(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        # collections never overlap: one runs at a time, holding the interpreter lock
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_pause.labels(str(info["generation"])).observe(time.perf_counter() - self._gc_started)

    def render(self) -> bytes:
        return generate_latest(self.registry)
