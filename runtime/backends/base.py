"""The one small interface every backend implements, so the denoising loop is written once.

Arrays cross the interface as numpy (latents and history are small: [B, I, 64] and [B, E, I]);
a backend keeps its weights and large buffers on its device and reuses them across steps.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline loop needs to know about a loaded model or artifact."""

    name: str  # model folder or artifact path, for logs
    in_channels: int  # packed latent channels (64 for FLUX)
    latent_channels: int  # VAE latent channels (16)
    vae_scale_factor: int  # pixels per latent (8)
    vae_scaling_factor: float
    vae_shift_factor: float
    max_text_tokens: int  # T5 sequence length T
    clip_max_length: int  # 77
    entity_slots: int  # E
    guidance_embeds: bool  # FLUX.1-dev: True; schnell: False
    blocks_per_step: int
    scheduler_config: dict = field(default_factory=dict)
    tokenizer_dir: str = ""  # CLIP tokenizer folder
    tokenizer_2_dir: str = ""  # T5 tokenizer folder
    size_range: tuple[int, int] | None = None  # (min, max) image side in pixels, where fixed at export
    deleaker_steps: int | None = None  # step count the op windows were fixed for (artifacts)


class Backend(abc.ABC):
    """A loaded model: text encoders, one DeLeaker transformer step, VAE decoder."""

    name: str = "?"
    info: ModelInfo

    def prepare(self, num_steps: int) -> None:
        """Called once per generation, before the loop (e.g. to fix DeLeaker windows for num_steps)."""

    @abc.abstractmethod
    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """clip_ids [B, 77], t5_ids [B, T] int64 -> (prompt_embeds [B, T, Dt], pooled [B, Dp]) float32."""

    @abc.abstractmethod
    def step(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """One transformer step. inputs: the compiled transformer's named inputs (architecture.md).
        Returns (noise_pred [B, I, C], history_out [B, E, I]) as float32."""

    @abc.abstractmethod
    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        """vae_latents [B, 16, H/8, W/8] (already scaled and shifted) -> images [B, 3, H, W] in [-1, 1]."""
