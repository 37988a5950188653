"""Admission, warm-up and waiting: what a server does around a batch runner.

admit(): an HTTP body -> one GenerateRequest per image, checked against the server's limits and
with Pipeline.check, so a bad request is answered 400 at once and never reaches a batch.
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

from .. import latents as lat
from .. import tokens as tok
from ..config import ConfigError, DeLeakerConfig
from ..gc_freeze import freeze_loaded_objects
from ..model_card import default_size
from ..pipeline import GenerateRequest, GenerateResult, Pipeline, RequestError, RequestFailed
from .metrics import Metrics
from .options import ServeOptions
from .schema import AUTO_SIZE, FieldError, ImageGenerationRequest, check_text, parse_size

log = logging.getLogger("deleaker.serve")

MAX_SEED = 2 ** 53  # exact in every JSON client
# Pipeline.check error types and message prefixes -> the request field they are about
_PARAM_BY_ERROR = ((tok.EntityError, "entities"), (tok.TokenizerError, "prompt"), (lat.LatentSizeError, "size"),
                   (ConfigError, "deleaker_settings"))
_PARAM_BY_PREFIX = {"prompt": "prompt", "entities": "entities", "seed": "seed", "steps": "steps",
                    "guidance_scale": "guidance", "height": "size", "width": "size", "config": "deleaker_settings"}
# settings a request may not give: the step count is the request's `steps`
_FIXED_SETTINGS = ("num_steps",)


class RequestTimeout(Exception):
    pass


class ClientGone(Exception):
    pass


def _setting_kinds() -> dict[str, type]:
    """DeLeakerConfig field -> the JSON type it takes (from its default; None defaults are ints)."""
    kinds = {}
    for f in dataclasses.fields(DeLeakerConfig):
        if f.name not in _FIXED_SETTINGS:
            kinds[f.name] = int if f.default is None else type(f.default)
    return kinds


SETTING_KINDS = _setting_kinds()


def _check_setting(name: str, value) -> None:
    kind = SETTING_KINDS.get(name)
    if kind is None:
        hint = " (use the request's `steps`)" if name in _FIXED_SETTINGS else ""
        raise FieldError("deleaker_settings", f"unknown DeLeaker setting {name!r}{hint}; known: "
                                              f"{', '.join(SETTING_KINDS)}")
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise FieldError("deleaker_settings", f"deleaker_settings.{name} must be a {kind.__name__}, got {value!r}")


class Engine:
    def __init__(self, pipe: Pipeline, options: ServeOptions, metrics: Metrics, runner):
        self.pipe = pipe
        self.options = options
        self.metrics = metrics
        self.runner = runner  # the Batcher (its model thread runs every model call)
        info = pipe.backend.info
        self.size_range = tuple(info.size_range) if info.size_range else (options.min_size, options.max_size)
        self.default_steps = options.default_steps or min(pipe.config.num_steps, options.max_steps)
        if options.default_size:
            w, h = parse_size(options.default_size)
        else:
            h, w = default_size(info.card)
        lo, hi = self.size_range
        fit = lambda v: min(max(v, -(-lo // 16) * 16), hi // 16 * 16)  # noqa: E731  (multiples of 16 in range)
        self.default_size = (fit(w), fit(h))
        self.model_id = Path(info.name).name or info.name  # what GET /v1/models lists
        self.started = int(time.time())
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
        side = max(self.size_range[0], 16)
        side = -(-side // 16) * 16  # FLUX latents need multiples of 16 pixels
        t0 = time.perf_counter()
        card = self.pipe.backend.info.card  # a model that knows only its own words warms up on its example
        prompt = card.example_prompt if card is not None and card.example_prompt else "warm-up"
        request = GenerateRequest(prompt=prompt, steps=1, height=side, width=side)
        # on the runner's model thread, where every batch runs (batcher.py says why)
        self.runner.call(lambda: self.pipe.generate(request, progress=None))
        # what lives as long as the server is loaded now: collections stop walking it (gc_freeze.py)
        frozen = freeze_loaded_objects()
        self.metrics.watch_gc()  # until close()
        log.info("warm-up generation (%dx%d, 1 step) took %.2fs; garbage collector: %s; ready", side, side,
                 time.perf_counter() - t0, frozen)
        self._ready.set()

    def close(self) -> None:
        """Stop the model thread and the garbage collection timing (warm_up started it)."""
        self.metrics.unwatch_gc()
        self.runner.stop()

    # -- admission --------------------------------------------------------------------------

    def admit(self, body: ImageGenerationRequest) -> list[GenerateRequest]:
        """Body -> one GenerateRequest per image; raises FieldError naming the bad field."""
        o, info = self.options, self.pipe.backend.info
        check_text("prompt", body.prompt)
        for entity in body.entities:
            check_text("entities", entity)
        if not body.prompt.strip():
            raise FieldError("prompt", "prompt must be a non-empty string")
        if len(body.prompt) > o.max_prompt_chars:
            raise FieldError("prompt", f"prompt has {len(body.prompt)} characters; this server takes at most "
                                       f"{o.max_prompt_chars}")
        if not 1 <= body.n <= o.max_n:
            raise FieldError("n", f"n must be in [1, {o.max_n}], got {body.n}")
        width, height = parse_size(body.size) if body.size not in (None, AUTO_SIZE) else self.default_size
        lo, hi = self.size_range
        for side, v in (("width", width), ("height", height)):
            if not lo <= v <= hi:
                raise FieldError("size", f"{side} {v} is outside this server's range [{lo}, {hi}]")
        steps = body.steps if body.steps is not None else self.default_steps
        if not 1 <= steps <= o.max_steps:
            raise FieldError("steps", f"steps must be in [1, {o.max_steps}], got {steps}")
        if len(body.entities) > info.entity_slots:
            raise FieldError("entities", f"{len(body.entities)} entities given; this model has {info.entity_slots} "
                                         f"entity slots")
        if body.seed is not None and not 0 <= body.seed <= MAX_SEED - o.max_n:
            raise FieldError("seed", f"seed must be in [0, {MAX_SEED - o.max_n}], got {body.seed}")
        config = None
        if body.deleaker_settings:
            for name, value in body.deleaker_settings.items():
                _check_setting(name, value)
            config = self.pipe.config.replace(**body.deleaker_settings)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED - o.max_n)
        first = GenerateRequest(prompt=body.prompt, entities=tuple(body.entities), seed=seed, steps=steps,
                                height=height, width=width, guidance_scale=body.guidance, deleaker=body.deleaker,
                                config=config)
        try:
            self.pipe.check(first)  # the images differ only by seed: one check covers them all
        except ValueError as e:
            raise FieldError(_param_of(e), str(e)) from None
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
                    raise FieldError(None, failed[0].message)
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


def _param_of(e: ValueError) -> str | None:
    for cls, param in _PARAM_BY_ERROR:
        if isinstance(e, cls):
            return param
    if isinstance(e, RequestError):
        head = str(e).split(" ", 1)[0]
        return _PARAM_BY_PREFIX.get(head)
    return None
