"""The same server as a Ray Serve application: replicas, @serve.batch, autoscaling.

Each replica is one process holding one Pipeline (one GPU, or one CPU slot) and the same
FastAPI app as `deleaker serve` (app.py); Ray Serve's proxy spreads requests over replicas and
@serve.batch gathers each replica's concurrent images into batches. Ray Serve bounds the queue
(max_queued_requests: past it, 503), scales replicas (autoscaling_config) and drains replicas on
shutdown (graceful_shutdown_timeout_s).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

from ray import serve

from ..pipeline import GenerateRequest
from .batcher import Draining
from .metrics import Metrics
from .options import ServeOptions

log = logging.getLogger("deleaker.serve")


@dataclass(eq=False)
class _RayJob:
    request: GenerateRequest
    future: asyncio.Future


class RayBatchRunner:
    """The Batcher's interface (submit / drop / depth / draining) over Ray Serve's @serve.batch."""

    def __init__(self, pipe, max_batch: int, max_wait_ms: float, metrics: Metrics):
        self.pipe, self.metrics = pipe, metrics
        self.max_batch = min(max_batch, pipe.max_batch)
        self._batch.set_max_batch_size(self.max_batch)
        self._batch.set_batch_wait_timeout_s(max_wait_ms / 1000)
        self._draining = False

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # set per replica in __init__
    async def _batch(self, requests: list[GenerateRequest]) -> list:
        # requests of different (size, steps) may meet here: Pipeline.generate groups them itself
        self.metrics.batch_size.observe(len(requests))
        self.metrics.running.set(len(requests))
        t0 = time.monotonic()
        try:
            return await asyncio.to_thread(self.pipe.generate, list(requests), progress=None, errors="return")
        finally:
            self.metrics.batch_seconds.observe(time.monotonic() - t0)
            self.metrics.running.set(0)

    def submit(self, requests: list[GenerateRequest]) -> list[_RayJob]:
        if self._draining:
            raise Draining()
        return [_RayJob(r, asyncio.ensure_future(self._batch(r))) for r in requests]

    def drop(self, jobs: list[_RayJob], reason: str) -> int:
        n = 0
        for j in jobs:
            if not j.future.done():
                j.future.cancel()  # Ray Serve skips cancelled requests still waiting for a batch
                n += 1
        if n:
            self.metrics.dropped.labels(reason).inc(n)
        return n

    @property
    def depth(self) -> int:
        return 0  # Ray Serve queues requests before they reach the replica; see its own metrics

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        self._draining = True


@serve.deployment
@serve.ingress()
class DeLeakerServe:
    """One replica: load the model, warm up, then serve the FastAPI app of app.py."""

    def __init__(self, args: dict, options: ServeOptions):
        from .app import create_app
        from .cli import _token, load_pipeline
        from .engine import Engine

        logging.basicConfig(level=logging.INFO, format="deleaker: %(message)s")
        pipe = load_pipeline(argparse.Namespace(**args))
        metrics = Metrics(min(options.max_batch, pipe.max_batch))
        self.engine = Engine(pipe, options, metrics)
        self.engine.runner = RayBatchRunner(pipe, options.max_batch, options.max_wait_ms, metrics)
        self.engine.warm_up()  # the replica counts as started (and gets traffic) only after this
        self._app = create_app(self.engine, token=_token())

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self):
        if not self.engine.ready:
            raise RuntimeError("not warmed up")


def _replicas(spec: str, max_batch: int) -> dict:
    """'N' -> fixed replicas; 'MIN-MAX' -> autoscaling on ongoing requests per replica."""
    try:
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-", 1))
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError
            return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                           "target_ongoing_requests": max_batch}}
        n = int(spec)
        if n < 1:
            raise ValueError
        return {"num_replicas": n}
    except ValueError:
        raise ValueError(f"--replicas must be N >= 1 or MIN-MAX, got {spec!r}") from None


def build_app(args: argparse.Namespace, options: ServeOptions):
    """The bound Ray Serve application (also usable from a Serve config file via an import path)."""
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (
        1.0 if str(args.device).startswith("cuda") else 0.0)
    actor = {"num_cpus": args.cpus_per_replica, "num_gpus": gpus}
    token = os.environ.get("DELEAKER_API_TOKEN")
    if token:
        actor["runtime_env"] = {"env_vars": {"DELEAKER_API_TOKEN": token}}
    deployment = DeLeakerServe.options(
        name="deleaker", ray_actor_options=actor,
        # a replica takes up to two batches' worth of requests: one running, one filling
        max_ongoing_requests=2 * options.max_batch, max_queued_requests=options.max_queue,
        graceful_shutdown_timeout_s=options.drain_timeout_s, health_check_period_s=10,
        **_replicas(args.replicas, options.max_batch))
    keep = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return deployment.bind(keep, options)


def serve_ray(args: argparse.Namespace, options: ServeOptions) -> int:
    import ray

    app = build_app(args, options)  # bad --replicas fails before Ray starts
    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="deleaker", route_prefix="/")
    log.info("Ray Serve application running on http://%s:%d (replicas: %s)", args.host, args.port, args.replicas)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down: Ray Serve drains the replicas (up to %gs)", options.drain_timeout_s)
    serve.shutdown()
    ray.shutdown()
    return 0
