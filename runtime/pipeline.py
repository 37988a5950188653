"""The denoising loop, written once over the Backend interface.

prompt -> tokens (+ entity slots) -> text embeddings -> seeded noise -> S Euler steps of the
DeLeaker transformer (history threaded step to step) -> VAE decode -> images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from . import latents as lat
from . import tokens as tok
from .backends.base import Backend
from .scheduler import FlowMatchEuler

log = logging.getLogger("deleaker")


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    entities: tuple[str, ...] = ()
    seed: int = 0
    steps: int = 20
    height: int = 256
    width: int = 256
    guidance_scale: float = 3.5
    deleaker: bool = True  # False: every entity slot inactive (plain attention), same engine


@dataclass
class GenerateResult:
    images: np.ndarray  # [B, H, W, 3] uint8
    latents: np.ndarray  # final packed latents [B, I, C] float32
    history: np.ndarray  # final DeLeaker history [B, E, I]
    seconds: float
    step_seconds: list[float] = field(default_factory=list)


class Pipeline:
    """Tokenizers + scheduler around one backend. Reusable across requests (keep it warm)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        info = backend.info
        self.clip_tok = tok.load_tokenizer(info.tokenizer_dir)
        self.t5_tok = tok.load_tokenizer(info.tokenizer_2_dir)
        self.scheduler = FlowMatchEuler.from_config(info.scheduler_config)

    def check(self, req: GenerateRequest) -> lat.LatentGeometry:
        """Validate a request before any work (clear errors, nothing half-done)."""
        info = self.backend.info
        geo = lat.geometry(req.height, req.width, info.vae_scale_factor)
        if info.size_range is not None:
            lo, hi = info.size_range
            for side, v in (("height", req.height), ("width", req.width)):
                if not lo <= v <= hi:
                    raise lat.LatentSizeError(f"{side} {v} is outside the exported range [{lo}, {hi}]; "
                                              f"re-export with a wider --min-size/--max-size")
        if req.steps < 1:
            raise ValueError(f"steps must be >= 1, got {req.steps}")
        return geo

    def generate(self, req: GenerateRequest, progress: bool = True) -> GenerateResult:
        info, be = self.backend.info, self.backend
        geo = self.check(req)
        t0 = time.perf_counter()
        T = info.max_text_tokens
        n_tokens = len(self.t5_tok.ids(req.prompt, add_special_tokens=True))
        if n_tokens > T:
            # FluxPipeline truncates silently; a runtime serving DeLeaker says so instead
            raise tok.TokenizerError(f"the prompt has {n_tokens} T5 tokens but this model keeps {T} tokens; "
                                     f"shorten the prompt (or export with a larger --max-text-tokens)")
        # locate entities even for a vanilla run, so vanilla and DeLeaker reject the same input
        entity_tokens = tok.entity_tokens(self.t5_tok, [req.prompt], list(req.entities), info.entity_slots, T)
        if not req.deleaker:
            entity_tokens[:] = 0  # every slot inactive: the same engine computes plain attention
        ents = list(req.entities) if req.deleaker else []
        clip_ids = tok.clip_input_ids(self.clip_tok, [req.prompt], info.clip_max_length)  # [1, 77]
        t5_ids = tok.t5_input_ids(self.t5_tok, [req.prompt], T)  # [1, T]
        prompt_embeds, pooled = be.encode_prompt(clip_ids, t5_ids)

        be.prepare(req.steps)
        cfg = getattr(be, "deleaker_config", None)
        if len(ents) >= 2 and cfg is not None and not cfg.intervenes_within(req.steps):
            log.warning("DeLeaker's intervention starts at block-step %d, but %d steps of %d blocks end before it: "
                        "this run edits nothing", cfg.start_intervention_from, req.steps, cfg.blocks_per_step)
        x = lat.initial_latents(geo, req.seed, batch_size=1)  # [1, I, 64]
        self.scheduler.timesteps(req.steps, geo.image_seq_len)  # kept on the scheduler for step()
        inputs = {
            "hidden_states": x,
            "encoder_hidden_states": prompt_embeds.astype(np.float32),
            "pooled_projections": pooled.astype(np.float32),
            "img_ids": lat.image_ids(geo.grid),  # [I, 3]
            "txt_ids": lat.text_ids(T),  # [T, 3]
            "entity_tokens": entity_tokens,
            "history": np.zeros((1, info.entity_slots, geo.image_seq_len), np.float32),  # [1, E, I]
            "grid": np.asarray(geo.grid, np.int64),  # [2]
        }
        if info.guidance_embeds:
            inputs["guidance"] = np.full((1,), req.guidance_scale, np.float32)
        step_times = []
        bar = tqdm(range(req.steps), desc="denoise" + (" (DeLeaker)" if ents else ""), disable=not progress,
                   unit="step", leave=False)
        for i in bar:
            ts = time.perf_counter()
            inputs["hidden_states"] = x
            inputs["timestep"] = self.scheduler.model_timestep(i, 1)
            inputs["step"] = np.asarray(i, np.int64)
            noise_pred, inputs["history"] = be.step(inputs)
            x = self.scheduler.step(noise_pred.astype(np.float32), x, i)
            step_times.append(time.perf_counter() - ts)
        vae_in = lat.to_vae_latents(x, geo, info.vae_scaling_factor, info.vae_shift_factor)
        images = be.decode(vae_in)  # [1, 3, H, W] in [-1, 1]
        seconds = time.perf_counter() - t0
        log.info("generated %dx%d in %.2fs (%d steps, %s, entities: %s)", req.width, req.height, seconds,
                 req.steps, be.name, ", ".join(ents) or "none")
        return GenerateResult(images=to_uint8(images), latents=x, history=inputs["history"], seconds=seconds,
                              step_seconds=step_times)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (diffusers' VaeImageProcessor rounding)."""
    x = np.clip(images.astype(np.float32) / 2 + 0.5, 0, 1)
    return (x.transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
