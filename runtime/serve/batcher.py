"""Dynamic batching: a bounded queue of images and one worker thread that runs Pipeline.generate.

The worker takes the oldest queued image and gathers queued images of the same (height, width,
steps) up to max_batch into one batch (each image keeps its own prompt, entities, seed and
settings). It waits for more only when more are likely: the clients just answered tend to send
their next request, so after a batch of k images with q left queued it waits for up to
min(max_batch, k + q) images, until max_wait_ms after the oldest image's arrival or, if later,
RETURN_WAIT_SHARE of the last batch's time (at least max_wait_ms) after that batch ended: the
answered clients' round trip (PNG encoding, HTTP) grows with the machine's load like the batch
time does. A lone client (batches of one) never waits; under a full queue batches start at once.
A queued image can be dropped (its client left or timed out); a running batch stops after its
current step once every image in it was abandoned.

The worker thread is the model thread: it loads the model (given a loader), runs the warm-up and
any other model call (call()) and every batch, so no other thread of a server runs model code. On
a CPU, torch's OpenMP pool belongs to the thread that runs parallel work: one model thread keeps
one pool, where a load on one thread and batches on another would keep two pools of workers on
the same cores.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..pipeline import GenerateRequest, Pipeline, batch_key
from .metrics import Metrics

log = logging.getLogger("deleaker.serve")

STOPPED = "the server stopped before this model call ran"  # call() after stop(), or queued when it came
RETURN_WAIT_SHARE = 0.25  # of the last batch's time: how long to wait for the clients just answered


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the queue is full; retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class _Abandoned(Exception):
    """Every image of the running batch was abandoned (timeout or disconnect): stop it."""


@dataclass(eq=False)
class Job:
    request: GenerateRequest
    future: asyncio.Future  # resolved on its event loop with a GenerateResult / RequestFailed / exception
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[int, int, int]:
        return batch_key(self.request)  # the engine gives every request its step count

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        def _set():
            if self.future.done():  # the client went away meanwhile
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(_set)
        except RuntimeError:  # the loop has closed (server stopped): nobody waits for this result
            pass


class Batcher:
    def __init__(self, pipe: Pipeline | Callable[[], Pipeline], max_batch: int, max_wait_ms: float, max_queue: int,
                 metrics: Metrics | None = None):
        """pipe: a loaded Pipeline, or a loader the model thread calls first (its error is raised
        here). metrics: default Metrics(self.max_batch)."""
        self.max_wait_s = max_wait_ms / 1000
        self.max_queue = max_queue
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable, threading.Event, dict]] = deque()  # call() work, before batches
        self._running = 0
        self._cond = threading.Condition()
        self._draining = False
        self._stopping = False
        self._batch_s = 1.0  # moving average of a batch's wall time, for Retry-After
        self._expect = 1  # images the next batch waits for (see the module docstring)
        self._last_end = 0.0  # monotonic time the last batch ended
        self._return_wait_s = self.max_wait_s  # after _last_end, for the clients just answered
        loaded: dict = {}
        started = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(pipe, max_batch, metrics, loaded, started),
                                        name="deleaker-model", daemon=True)
        self._thread.start()
        started.wait()
        if "error" in loaded:
            raise loaded["error"]

    def call(self, fn: Callable):
        """fn() on the model thread, between batches; returns its result or raises its error."""
        if threading.get_ident() == self._thread.ident:
            return fn()
        done, box = threading.Event(), {}
        with self._cond:
            if self._stopping:  # the model thread has ended or is ending: nobody would run fn
                raise RuntimeError(STOPPED)
            self._calls.append((fn, done, box))
            self._cond.notify_all()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["value"]

    # -- called from the event loop ---------------------------------------------------------

    def submit(self, requests: list[GenerateRequest]) -> list[Job]:
        """Queue the images of one HTTP request (all or none). Raises QueueFull or Draining."""
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._draining:
                raise Draining()
            if len(self._pending) + len(requests) > self.max_queue:
                raise QueueFull(self._retry_after())
            jobs = [Job(r, loop.create_future(), loop) for r in requests]
            self._pending.extend(jobs)
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()
        return jobs

    def drop(self, jobs: list[Job], reason: str) -> int:
        """Drop the jobs that have not started; returns how many were dropped."""
        n = 0
        with self._cond:
            for j in jobs:
                if j in self._pending:
                    self._pending.remove(j)
                    n += 1
            self.metrics.queue_depth.set(len(self._pending))
            self._cond.notify_all()
        if n:
            self.metrics.dropped.labels(reason).inc(n)
            log.info("dropped %d queued image(s): %s", n, reason)
        return n

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    @property
    def draining(self) -> bool:
        return self._draining

    def begin_drain(self) -> None:
        with self._cond:
            self._draining = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is queued or running (True) or timeout_s passes (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _retry_after(self) -> int:
        batches_ahead = math.ceil((len(self._pending) + 1) / self.max_batch) + (1 if self._running else 0)
        return max(1, math.ceil(batches_ahead * self._batch_s))

    # -- worker thread ----------------------------------------------------------------------

    def _next_batch(self) -> list[Job] | tuple | None:
        """The next batch, or a call() item (fn, done, box), or None once stopped."""
        with self._cond:
            while True:
                if self._stopping:
                    while self._calls:  # nobody will run them: their callers get an error
                        _, done, box = self._calls.popleft()
                        box["error"] = RuntimeError(STOPPED)
                        done.set()
                    return None
                if self._calls:
                    return self._calls.popleft()
                if not self._pending:
                    self._cond.wait()
                    continue
                first = self._pending[0]
                same = [j for j in self._pending if j.key == first.key][: self.max_batch]
                wait = max(first.enqueued + self.max_wait_s, self._last_end + self._return_wait_s) - time.monotonic()
                if len(same) >= self._expect or wait <= 0 or self._draining:
                    for j in same:
                        self._pending.remove(j)
                    self._running = len(same)
                    self.metrics.queue_depth.set(len(self._pending))
                    return same
                self._cond.wait(wait)

    def _work(self, pipe, max_batch: int, metrics: Metrics | None, loaded: dict, started: threading.Event) -> None:
        try:
            self.pipe = pipe if isinstance(pipe, Pipeline) else pipe()
            self.max_batch = min(max_batch, self.pipe.max_batch)
            self.metrics = metrics if metrics is not None else Metrics(self.max_batch)
        except BaseException as e:  # noqa: BLE001  (raised again in __init__, on the caller's thread)
            loaded["error"] = e
            return
        finally:
            started.set()
        while (item := self._next_batch()) is not None:
            if isinstance(item, tuple):
                fn, done, box = item
                try:
                    box["value"] = fn()
                except BaseException as e:  # noqa: BLE001  (raised again in call())
                    box["error"] = e
                done.set()
                continue
            self._run(item)

    def _run(self, batch: list[Job]) -> None:
        t0 = time.monotonic()
        for j in batch:
            self.metrics.queue_wait.observe(t0 - j.enqueued)
        self.metrics.running.set(len(batch))
        self.metrics.batch_size.observe(len(batch))

        def stop_if_abandoned(_done, _total, batch=batch):
            if all(j.future.done() for j in batch):  # each waiter gave up (futures are cancelled then)
                raise _Abandoned()

        try:
            results = self.pipe.generate([j.request for j in batch], progress=stop_if_abandoned,
                                         errors="return")
        except _Abandoned:
            log.info("stopped a batch of %d image(s): every one of them was abandoned", len(batch))
            self.metrics.dropped.labels("abandoned").inc(len(batch))
        except Exception as e:  # a bug, not a bad request (those were rejected at admission)
            log.exception("batch of %d failed", len(batch))
            for j in batch:
                j.resolve(error=e)
        else:
            for j, r in zip(batch, results):
                j.resolve(r)
        seconds = time.monotonic() - t0
        self.metrics.batch_seconds.observe(seconds)
        self._batch_s = 0.8 * self._batch_s + 0.2 * seconds
        with self._cond:
            self._running = 0
            self._last_end = time.monotonic()
            self._return_wait_s = max(self.max_wait_s, RETURN_WAIT_SHARE * seconds)
            queued = sum(1 for j in self._pending if j.key == batch[0].key)
            self._expect = max(1, min(self.max_batch, len(batch) + queued))
            self._cond.notify_all()
        self.metrics.running.set(0)
