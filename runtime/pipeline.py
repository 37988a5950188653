"""The denoising loop, written once over the Backend session interface, for batches of requests.

requests -> validate each (before any work) -> group by (height, width, steps) -> per batch:
tokens + entity slots + per-sample DeLeaker settings + seeded noise + schedule -> one backend
session (all of it on the device) -> S steps -> final latents -> VAE decode -> one result per request.

A batch gives every request exactly the result it would get alone: statistics are per sample,
noise is per seed, settings are per sample. One Pipeline is safe for concurrent callers: the
scheduler keeps no state, tokenizers are read-only, and each backend runs one session at a time
under its own lock (callers queue; a server batches them instead, see runtime/serve).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np

from . import footprint
from . import latents as lat
from . import op_schema
from . import tokens as tok
from .backends.base import Backend, SessionInputs
from .config import DEFAULT_PRESET, ConfigError, DeLeakerConfig, ResolvedConfig, preset
from .request import MAX_GUIDANCE, MAX_STEPS, GenerateRequest, RequestError, _short_repr, check_request  # noqa: F401 (API)
from .scheduler import FlowMatchEuler

log = logging.getLogger("deleaker")

TOKEN_CACHE_SIZE = 1024  # prompts (with their entities) whose token arrays a Pipeline keeps

ProgressFn = Callable[[int, int], None]


@dataclass
class GenerateResult:
    request: GenerateRequest
    image: np.ndarray  # [H, W, 3] uint8
    latents: np.ndarray  # final packed latents [I, C] float32
    history: np.ndarray  # final DeLeaker history [E, I] float32
    seconds: float  # wall time of the batch this request ran in
    batch_size: int = 1
    step_seconds: list[float] = field(default_factory=list)

    @property
    def images(self) -> np.ndarray:
        """[1, H, W, 3] uint8 (the image with a batch axis)."""
        return self.image[None]

    def png_bytes(self) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(self.image).save(buf, format="PNG")
        return buf.getvalue()


@dataclass(frozen=True)
class RequestFailed:
    """A request of a batch that was rejected (generate(..., errors="return"))."""

    index: int
    request: object
    message: str


@dataclass(frozen=True)
class _Prepared:
    """A validated request: everything per sample the session needs."""

    index: int
    request: GenerateRequest
    geo: lat.LatentGeometry
    config: ResolvedConfig
    entity_tokens: np.ndarray  # [E, T] float32 (zeros for vanilla)
    clip_ids: np.ndarray  # [77] int64
    t5_ids: np.ndarray  # [T] int64

    @property
    def key(self) -> tuple[int, int, int]:
        return batch_key(self.request)


def batch_key(req: GenerateRequest) -> tuple[int, int, int]:
    """Requests that may share a batch have the same key: (height, width, steps)."""
    return req.height, req.width, req.steps


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _type_name(v) -> str:
    return type(v).__name__


_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


def check_device(device) -> str:
    """cpu, cuda or cuda:N (what every backend takes); anything else is a one-line error."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return device


def check_pipeline_options(config, max_batch) -> None:
    """The Pipeline options that need no model (checked again against the model once it loads)."""
    if config is not None:
        if not isinstance(config, DeLeakerConfig):
            raise ConfigError(f"config must be a DeLeakerConfig, got {_type_name(config)}")
        config.resolved(1)
    if max_batch is not None and (not _is_int(max_batch) or max_batch < 1):
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")


class Pipeline:
    """Tokenizers + scheduler around one backend. Reusable across requests and threads (keep it warm).

    config: the DeLeaker settings of requests that give none (default: the model's recorded
    settings or its card's preset, else the flux-dev preset). max_batch: the most requests one session holds.
    """

    def __init__(self, backend: Backend, config: DeLeakerConfig | None = None, max_batch: int | None = None):
        check_pipeline_options(config, max_batch)
        self.backend = backend
        info = backend.info
        self.clip_tok = tok.load_tokenizer(info.tokenizer_dir)
        self.t5_tok = tok.load_tokenizer(info.tokenizer_2_dir)
        self.scheduler = FlowMatchEuler.from_config(info.scheduler_config)
        if config is None:
            config = DeLeakerConfig(**info.default_config) if info.default_config else preset(DEFAULT_PRESET)
        if not isinstance(config, DeLeakerConfig):
            raise ConfigError(f"config must be a DeLeakerConfig, got {type(config).__name__}")
        config.resolved(info.blocks_per_step)  # a bad default fails now, not in the first request
        self.config = config
        # tokenizing is pure, and a server checks each request at admission and again in its batch;
        # errors are not cached (lru_cache stores only returned values)
        self._tokenized = functools.lru_cache(maxsize=TOKEN_CACHE_SIZE)(self._tokenize)
        limits = [m for m in (max_batch, info.max_batch) if m is not None]
        self.max_batch = min(limits) if limits else 8
        if not _is_int(self.max_batch) or self.max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")

    # -- validation ------------------------------------------------------------------------

    def check(self, req: GenerateRequest) -> lat.LatentGeometry:
        """Validate a request before any work (one-line errors naming the field, or a
        FootprintError when it cannot fit in memory); returns its geometry."""
        p = self._prepare(req, 0)
        self._footprint([p])
        return p.geo

    def _footprint(self, batch: list[_Prepared]) -> footprint.Footprint:
        """The batch's memory and time estimate; FootprintError when it cannot fit the device's free memory."""
        be = self.backend
        return footprint.check(be.info, batch[0].geo, len(batch), batch[0].request.steps, be.fused_attention,
                               be.device)

    def _prepare(self, req, index: int) -> _Prepared:
        info = self.backend.info
        geo = check_request(req, info)
        if req.entities is None:  # documented: None means no entities
            req = dataclasses.replace(req, entities=())
        base = req.config if req.config is not None else self.config
        if req.steps is None:  # the one place a request's step count is defaulted: the pipeline's, never its config's
            req = dataclasses.replace(req, steps=self.config.num_steps)
        cfg = base.replace(num_steps=req.steps).resolved(info.blocks_per_step)
        if info.card is not None and (err := info.card.vocabulary_error(req.prompt)):
            # before the token count: a foreign word tokenizes into letters
            raise tok.TokenizerError(err, "prompt")
        # entities are located even for a vanilla run, so vanilla and DeLeaker reject the same input
        ent, clip_ids, t5_ids = self._tokenized(req.prompt, tuple(req.entities or ()))
        if not req.deleaker:
            ent = np.zeros_like(ent)  # every slot inactive: the same engine computes plain attention
        return _Prepared(index, req, geo, cfg, ent, clip_ids, t5_ids)

    def _tokenize(self, prompt: str, entities: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entity_tokens [E, T] float32, clip_ids [77] int64, t5_ids [T] int64), read-only; raises
        a TokenizerError / EntityError for a prompt or entity the model cannot take."""
        info = self.backend.info
        T = info.max_text_tokens
        n_tokens = len(self.t5_tok.ids(prompt, add_special_tokens=True))
        if n_tokens > T:
            # FluxPipeline truncates silently; a runtime serving DeLeaker says so instead
            raise tok.TokenizerError(f"the prompt has {n_tokens} T5 tokens but this model keeps {T} tokens; "
                                     f"shorten the prompt (or export with a larger --max-text-tokens)", "prompt")
        ent = tok.entity_tokens(self.t5_tok, [prompt], list(entities), info.entity_slots, T)[0]  # [E, T]
        clip_ids = tok.clip_input_ids(self.clip_tok, [prompt], info.clip_max_length)[0]  # [77]
        t5_ids = tok.t5_input_ids(self.t5_tok, [prompt], T)[0]  # [T]
        for a in (ent, clip_ids, t5_ids):
            a.flags.writeable = False  # shared by every request with this prompt (the cache below)
        return ent, clip_ids, t5_ids

    # -- generation --------------------------------------------------------------------------

    def generate(self, requests: Union[GenerateRequest, Sequence[GenerateRequest]], progress=None,
                 errors: str = "raise"):
        """Generate one request (returns a GenerateResult) or a list (returns a list, in order).

        progress: None/False (silent), True (a tqdm bar), or progress(done_steps, total_steps).
        errors: "raise" (any invalid request raises before any work) or "return" (invalid
        requests become RequestFailed entries; the others run).
        """
        single = isinstance(requests, GenerateRequest)
        if not single and (isinstance(requests, (str, bytes, dict)) or not hasattr(requests, "__iter__")):
            raise RequestError(f"requests must be a GenerateRequest or a list of them, got {_type_name(requests)}",
                               "request")
        reqs = [requests] if single else list(requests)
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {_short_repr(errors)}")
        if not (progress is None or isinstance(progress, bool) or callable(progress)):
            raise ValueError(f"progress must be None, True/False or a callable(done, total), got {_short_repr(progress)}")
        if not reqs:
            return []
        prepared: list[_Prepared] = []
        out: list = [None] * len(reqs)
        for i, r in enumerate(reqs):
            try:
                prepared.append(self._prepare(r, i))
            except ValueError as e:
                if errors == "raise" or single:
                    raise e if single else _prefixed(e, f"request {i}: ") from None
                out[i] = RequestFailed(i, r, str(e))
        batches = self._batches(prepared)
        estimates = []
        for batch in list(batches):  # every batch is sized before the first one starts
            try:
                estimates.append(self._footprint(batch))
            except footprint.FootprintError as e:
                if errors == "raise" or single:
                    raise e if single else _prefixed(e, f"request {batch[0].index}: ") from None
                batches.remove(batch)
                for p in batch:
                    out[p.index] = RequestFailed(p.index, p.request, str(e))
        seconds = sum(f.seconds for f in estimates if f.seconds is not None)
        if seconds > footprint.LONG_RUN_SECONDS:
            log.warning("this run is estimated to take about %s (%d image(s), %s)", footprint.describe_seconds(seconds),
                        sum(len(b) for b in batches), ", ".join(f"{b[0].request.width}x{b[0].request.height} "
                                                                 f"{b[0].request.steps} steps" for b in batches))
        total = sum(len(b) * b[0].request.steps for b in batches)
        report = _progress(progress, total, any(p.request.deleaker and len(p.request.entities) >= 2
                                                 for p in prepared), batches)
        try:
            for batch in batches:
                for p, res in zip(batch, self._run(batch, report)):
                    out[p.index] = res
        finally:
            report.close()
        return out[0] if single else out

    def why_no_edit(self, result: GenerateResult) -> str:
        """Why a DeLeaker result equals its vanilla twin, in words (for the --compare log line)."""
        req = result.request
        if not req.deleaker:
            return "DeLeaker is off for this request"
        if len(req.entities or ()) < 2:
            return "it needs two or more entities"
        bps = self.backend.info.blocks_per_step
        cfg = (req.config or self.config).replace(num_steps=req.steps).resolved(bps)
        if not cfg.intervenes_within(req.steps):
            return (f"its intervention starts at block-step {cfg.start_intervention_from}, after the run's "
                    f"{req.steps * bps} block-steps end")
        if not np.any(result.history):
            return "the entity history stayed empty"
        if cfg.do_smoothing:
            return ("the entity masks were empty where it intervenes: smoothing's 3x3 opening erases masks that are "
                    "not spatially coherent (the random-weight tiny model's are not; --preset tiny turns "
                    "smoothing off)")
        return "its edits changed no pixel (the entity masks selected nothing the rules change)"

    def _batches(self, prepared: list[_Prepared]) -> list[list[_Prepared]]:
        groups: dict[tuple, list[_Prepared]] = {}
        for p in prepared:  # first-come order within each (size, steps) group
            groups.setdefault(p.key, []).append(p)
        return [g[i:i + self.max_batch] for g in groups.values() for i in range(0, len(g), self.max_batch)]

    def _session_inputs(self, batch: list[_Prepared]) -> SessionInputs:
        info = self.backend.info
        geo, steps, B = batch[0].geo, batch[0].request.steps, len(batch)
        plan = self.scheduler.schedule(steps, geo.image_seq_len)
        static = {
            "entity_tokens": np.stack([p.entity_tokens for p in batch]),  # [B, E, T]
            "grid": np.asarray(geo.grid, np.int64),  # [2]
            "img_ids": lat.image_ids(geo.grid),  # [I, 3]
            "txt_ids": lat.text_ids(info.max_text_tokens),  # [T, 3]
            **op_schema.pack_settings([p.config for p in batch]),  # windows [B, 4], knobs [B, 3], rules [B, 6]
        }
        if info.guidance_embeds:
            static["guidance"] = np.asarray([p.request.guidance_scale for p in batch], np.float32)  # [B]
        return SessionInputs(
            clip_ids=np.stack([p.clip_ids for p in batch]),  # [B, 77]
            t5_ids=np.stack([p.t5_ids for p in batch]),  # [B, T]
            static=static,
            latents=lat.initial_latents(geo, [p.request.seed for p in batch], batch_size=B),  # [B, I, 64]
            history=np.zeros((B, info.entity_slots, geo.image_seq_len), np.float32),  # [B, E, I]
            timesteps=plan.model_timesteps(),  # [S]
            sigmas=plan.sigmas,  # [S+1]
        )

    def _run(self, batch: list[_Prepared], report) -> list[GenerateResult]:
        info, be = self.backend.info, self.backend
        geo, steps = batch[0].geo, batch[0].request.steps
        for p in batch:
            if p.request.deleaker and len(p.request.entities) >= 2 and not p.config.intervenes_within(steps):
                log.warning("DeLeaker's intervention starts at block-step %d, but %d steps of %d blocks end before "
                            "it: this run edits nothing (prompt %r)", p.config.start_intervention_from, steps,
                            p.config.blocks_per_step, p.request.prompt[:60])
        t0 = time.perf_counter()
        inputs = self._session_inputs(batch)
        step_times = []
        with be.lock:  # one session at a time per backend: sessions share its buffers
            session = be.start_session(inputs)
            for i in range(steps):
                ts = time.perf_counter()
                session.step(i)
                step_times.append(time.perf_counter() - ts)
                report.update(len(batch))
                if i == 0:  # a broken model shows at once: name it and the step, not after the whole run
                    _check_finite("denoised latents", session.fetch(session.x), batch, f"after step 1 of {steps}",
                                  info.name)
                if i == 0 and steps > 1 and step_times[0] * steps > footprint.LONG_RUN_SECONDS:
                    log.info("step 1 of %d took %.1fs: about %s for this batch's steps", steps, step_times[0],
                             footprint.describe_seconds(step_times[0] * steps))
            x, history = session.result()  # [B, I, C], [B, E, I]
            _check_finite("denoised latents", x, batch)
            images = be.decode(lat.to_vae_latents(x, geo, info.vae_scaling_factor, info.vae_shift_factor))
            _check_finite("decoded image", images, batch)
        images = to_uint8(images)  # [B, H, W, 3]
        seconds = time.perf_counter() - t0
        r0 = batch[0].request
        # the text length matters: the same prompt padded to another T5 length gives another image
        log.info("generated %d image(s) %dx%d in %.2fs (%d steps, %s, %d T5 text tokens)", len(batch), r0.width,
                 r0.height, seconds, steps, be.name, info.max_text_tokens)
        return [GenerateResult(request=p.request, image=images[b], latents=x[b], history=history[b], seconds=seconds,
                               batch_size=len(batch), step_seconds=list(step_times))
                for b, p in enumerate(batch)]


def _prefixed(e: ValueError, prefix: str) -> ValueError:
    """The same error (type and blamed field) with its message prefixed, e.g. by "request 2: "."""
    out = type(e)(prefix + str(e))
    if getattr(e, "field", None) is not None:
        out.field = e.field
    return out


class NonFiniteError(ValueError):
    """A computation gave NaN or inf (an extreme setting, or a model that overflows in its dtype):
    an error rather than a black image."""


def _check_finite(what: str, x: np.ndarray, batch: list[_Prepared], when: str = "", model: str = "") -> None:
    bad = [p for b, p in enumerate(batch) if not np.isfinite(x[b]).all()]
    if bad:
        r = bad[0].request
        cause = (f"model {model} gives non-finite values at its first step: its weights are broken or its dtype "
                 "overflows (try --dtype fp32)" if model else "an extreme setting or a dtype that overflows "
                 "(try --dtype fp32)")
        raise NonFiniteError(f"request {bad[0].index}: the {what} hold NaN or inf{' ' + when if when else ''} (prompt "
                             f"{r.prompt[:40]!r}, guidance {r.guidance_scale:g}, {r.steps} steps): no image; {cause}")


class _progress:
    """Steps done over all batches: a tqdm bar, a callback, or nothing. The callback counts image
    steps (a step of a batch of 2 is 2); the bar counts the steps the sessions run, and says how
    many images each carries ("2 images x 10 steps": a 10-step pair reads 10/10, not 20/20)."""

    def __init__(self, progress, total: int, deleaker: bool, batches: list | None = None):
        self.done, self.total = 0, total
        self.fn: ProgressFn | None = progress if callable(progress) else None
        self.bar = None
        if progress is True:
            from tqdm.auto import tqdm

            batches = batches or []
            shapes = sorted({(len(b), b[0].request.steps) for b in batches})
            what = ", ".join(f"{n} image{'s' if n > 1 else ''} x {s} steps" for n, s in shapes)
            self.bar = tqdm(total=sum(b[0].request.steps for b in batches),
                            desc="denoise" + (" (DeLeaker)" if deleaker else "") + (f" {what}" if what else ""),
                            unit="step", leave=False)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(1)  # one session step, whatever its batch size
        if self.fn is not None:
            self.fn(self.done, self.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (diffusers' VaeImageProcessor rounding)."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def load_pipeline(model: str | None = None, *, artifact: str | None = None, backend: str | None = None,
                  config: DeLeakerConfig | None = None, max_batch: int | None = None, **backend_options) -> Pipeline:
    """A ready Pipeline: `model` (a diffusers-format FLUX folder) runs on the torch backend, `artifact` (a
    `deleaker-export` folder) on onnxruntime, unless `backend` names another. Neither: the embedded
    toy-world model, its exported artifact on onnxruntime (backend="torch": its diffusers folder).
    backend_options go to the backend (e.g. device="cuda", dtype="bf16", op="cuda")."""
    from .backends import load_backend
    from .embedded import default_source

    if model is not None and artifact is not None:
        raise ValueError("pass either model or artifact, not both")
    for what, v in (("model", model), ("artifact", artifact)):
        if v is not None and not isinstance(v, (str, os.PathLike)):
            raise ValueError(f"{what} must be a folder path (str or os.PathLike), got {_type_name(v)} {_short_repr(v)}")
    if model is None and artifact is None:
        backend, model, artifact = default_source(backend)
    # everything that needs no model is checked before the (slow) load
    check_pipeline_options(config, max_batch)
    if "device" in backend_options:
        check_device(backend_options["device"])
    name = backend or ("onnxruntime" if artifact is not None else "torch")
    be = load_backend(name, artifact if artifact is not None else model, **backend_options)
    return Pipeline(be, config=config, max_batch=max_batch)


def replace(req: GenerateRequest, **changes) -> GenerateRequest:
    """A copy of a request with some fields changed."""
    return dataclasses.replace(req, **changes)
