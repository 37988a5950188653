"""Prometheus metrics of one server process (or one Ray Serve replica), in their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# request latency from ~10 ms (tiny model) to minutes (large images on CPU)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


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

    def render(self) -> bytes:
        return generate_latest(self.registry)
