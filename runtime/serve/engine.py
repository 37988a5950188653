"""Admission, warm-up and waiting: what a server does around a batch runner.

admit(): an HTTP body -> one GenerateRequest per image, checked against the server's limits and
with Pipeline.check (the runtime's one request validation, runtime/request.py: the same sizes are
accepted and refused, with the same messages, as by the CLI and the Python API), so a bad request
is answered 400 at once and never reaches a batch. Every refusal is a FieldError naming its field.
run(): queue the images on the runner and wait for them, up to the request timeout, or until
the client disconnects (its queued images are then dropped).

The runner is the Batcher (batcher.py), in the local server and in each Ray Serve replica alike:
`submit(requests) -> jobs` (each with an asyncio `future`), `drop`, `depth`, `draining`,
`begin_drain`, and `call(fn)`, which runs fn on the model thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import threading
import time
from pathlib import Path

from .. import footprint
from ..errors import FieldError
from ..gc_freeze import freeze_loaded_objects
from ..model_card import default_size
from ..pipeline import GenerateResult, Pipeline, RequestFailed
from ..request import SETTING_KINDS, GenerateRequest, check_settings, parse_size, size_multiple  # noqa: F401
from .logs import PROCESS_START
from .metrics import Metrics
from .options import ServeOptions
from .schema import AUTO_SIZE, ImageGenerationRequest, check_text

log = logging.getLogger("deleaker.serve")

MAX_SEED = 2 ** 53  # exact in every JSON client


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


class Engine:
    def __init__(self, pipe: Pipeline, options: ServeOptions, metrics: Metrics, runner):
        self.pipe = pipe
        self.options = options
        self.metrics = metrics
        self.runner = runner  # the Batcher (its model thread runs every model call)
        info = pipe.backend.info
        self.multiple = size_multiple(info)  # pixels per image-token side: every size is a multiple of it
        # the operator's limits (--min-size / --max-size) inside the model's own (an artifact's range)
        lo, hi = info.size_range or (self.multiple, None)
        lo = max(lo, options.min_size or 0)
        hi = min(hi, options.max_size) if hi is not None and options.max_size else hi or options.max_size
        self.size_range = (lo, hi)  # hi None: no limit but the model's and the memory free
        self.default_steps = options.default_steps or min(pipe.config.num_steps, options.max_steps)
        if options.default_size:
            w, h = parse_size(options.default_size)
        else:
            h, w = default_size(info.card)
        m = self.multiple
        fit = lambda v: max(-(-lo // m) * m, min(v, hi // m * m if hi else v))  # noqa: E731  (multiples in range)
        self.default_size = (fit(w), fit(h))
        self.model_id = Path(info.name).name or info.name  # what GET /v1/models lists
        self.started = int(time.time())
        self.url = ""  # where it serves, for the "ready" line (the local server sets it)
        self.in_flight = 0  # generation requests between arrival and answer (app.py)
        self._ready = threading.Event()

    # -- readiness ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def draining(self) -> bool:
        return self.runner.draining

    @property
    def busy(self) -> int:
        """Generation requests being answered plus images queued or running: 0 once a drain is done."""
        return self.in_flight + self.runner.depth + self.runner.running

    def warm_up(self) -> None:
        """One tiny generation (smallest allowed size, 1 step): loads kernels and caches before traffic."""
        side = -(-self.size_range[0] // self.multiple) * self.multiple  # the smallest size the model takes
        log.info("warm-up: one %dx%d image, 1 step", side, side)
        t0 = time.perf_counter()
        card = self.pipe.backend.info.card  # a model that knows only its own words warms up on its example
        prompt = card.example_prompt if card is not None and card.example_prompt else "warm-up"
        request = GenerateRequest(prompt=prompt, steps=1, height=side, width=side)
        # on the runner's model thread, where every batch runs (batcher.py says why)
        self.runner.call(lambda: self.pipe.generate(request, progress=None))
        # what lives as long as the server is loaded now: collections stop walking it (gc_freeze.py)
        frozen = freeze_loaded_objects()
        self.metrics.watch_gc()  # until close()
        log.info("warm-up took %.2fs; garbage collector: %s", time.perf_counter() - t0, frozen)
        self._ready.set()
        log.info("ready in %.1fs%s", time.perf_counter() - PROCESS_START, f": {self.url}/" if self.url else "")

    def close(self) -> None:
        """Stop the model thread and the garbage collection timing (warm_up started it)."""
        self.metrics.unwatch_gc()
        self.runner.stop()

    # -- admission --------------------------------------------------------------------------

    def largest_side(self) -> int | None:
        """The largest square side a request of one image may ask now: the size range's top, and what
        fits the memory free now (None: no limit known)."""
        be = self.pipe.backend
        fits = footprint.largest_fitting_side(be.info, 1, self.default_steps, be.fused_attention, be.device,
                                              self.size_range[1] or None)
        return fits

    def model_card(self) -> dict:
        """What a client needs to speak this model's language (in /health and /v1/models): its card's
        example and words (null: any prompt), the default size and the size rule, and the values of
        the DeLeaker settings requests that give none get (null: derived from the step count)."""
        card = self.pipe.backend.info.card
        cfg = self.pipe.config
        return {"about": card.about if card is not None else "",
                "example": ({"prompt": card.example_prompt, "entities": list(card.example_entities)}
                            if card is not None and card.example_prompt else None),
                "vocabulary": sorted(card.vocabulary) if card is not None and card.vocabulary else None,
                "default_size": "{}x{}".format(*self.default_size), "size_multiple": self.multiple,
                "default_steps": self.default_steps,
                "deleaker_defaults": {name: getattr(cfg, name) for name in SETTING_KINDS}}

    def admit(self, body: ImageGenerationRequest) -> list[GenerateRequest]:
        """Body -> one GenerateRequest per image; raises FieldError naming the bad field."""
        o = self.options
        check_text("prompt", body.prompt)
        for entity in body.entities:
            check_text("entities", entity)
        if len(body.prompt) > o.max_prompt_chars:
            raise FieldError(f"prompt has {len(body.prompt)} characters; this server takes at most "
                             f"{o.max_prompt_chars}", "prompt")
        if not 1 <= body.n <= o.max_n:
            raise FieldError(f"n must be in [1, {o.max_n}], got {body.n}", "n")
        width, height = parse_size(body.size) if body.size not in (None, AUTO_SIZE) else self.default_size
        lo, hi = self.size_range
        if (o.min_size or o.max_size) and not all(lo <= v <= (hi or v) for v in (width, height)):
            # only the operator's own limits are the server's to word; the model's are the runtime's
            raise FieldError(f"size {width}x{height} is outside this server's range of sides [{lo}, {hi}] "
                             f"(--min-size/--max-size)", "size")
        steps = body.steps if body.steps is not None else self.default_steps
        if not 1 <= steps <= o.max_steps:
            raise FieldError(f"steps must be in [1, {o.max_steps}], got {steps}", "steps")
        if body.seed is not None and not 0 <= body.seed <= MAX_SEED - o.max_n:
            raise FieldError(f"seed must be in [0, {MAX_SEED - o.max_n}], got {body.seed}", "seed")
        config = None
        if body.deleaker_settings:
            config = self.pipe.config.replace(**check_settings(body.deleaker_settings))
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - o.max_n)
        first = GenerateRequest(prompt=body.prompt, entities=tuple(body.entities), seed=seed, steps=steps,
                                height=height, width=width, guidance_scale=body.guidance, deleaker=body.deleaker,
                                config=config)
        self.pipe.check(first)  # the images differ only by seed: one check covers them all
        return [dataclasses.replace(first, seed=seed + i) for i in range(body.n)]

    # -- running ------------------------------------------------------------------------------

    async def run(self, requests: list[GenerateRequest], disconnected: asyncio.Future | None = None
                  ) -> list[GenerateResult]:
        """Queue the images and wait for all of them (QueueFull / Draining / RequestTimeout / ClientGone).
        Abandoned images are dropped from the queue and their futures cancelled, so a running batch
        whose images were all abandoned stops (batcher.py) and no exception is left unretrieved."""
        jobs = self.runner.submit(requests)
        futures = [j.future for j in jobs]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.timeout_s
        reason = "timeout"
        try:
            while not all(f.done() for f in futures):
                left = deadline - loop.time()
                if left <= 0:
                    break
                waiters = [f for f in futures if not f.done()] + ([disconnected] if disconnected is not None else [])
                done, _ = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if disconnected is not None and disconnected in done:
                    reason = "disconnect"
                    break
                if any(f.done() and not f.cancelled() and f.exception() is not None for f in done):
                    break  # a failed batch: no point waiting for the rest
            else:
                results = [f.result() for f in futures]
                failed = [r for r in results if isinstance(r, RequestFailed)]
                if failed:  # admission runs the same checks, so this is not expected
                    raise FieldError(failed[0].message)
                return results
            errors = [f.exception() for f in futures if f.done() and not f.cancelled()]  # all retrieved
            if any(e is not None for e in errors):
                raise next(e for e in errors if e is not None)
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            if not all(f.done() for f in futures):
                self.runner.drop(jobs, reason)
                for f in futures:
                    f.cancel()
        if reason == "disconnect":
            raise ClientGone()
        raise RequestTimeout()
