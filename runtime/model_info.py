"""What the pipeline loop needs to know about a loaded model or artifact (ModelInfo).

Below both the artifact reader (runtime/artifact.py builds one from a manifest) and the backends
(runtime/backends/ fill one from what they load), so neither imports the other for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .model_card import ModelCard


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
    max_batch: int | None = None  # largest batch one session may hold (None: any)
    default_config: dict | None = None  # DeLeakerConfig fields recorded with the model (artifacts, a card's preset)
    card: ModelCard | None = None  # what the model folder declares about its use (runtime/model_card.py)
    # sizes the memory and time estimate reads (runtime/footprint.py); None: not known, not counted
    attention_heads: int | None = None  # H of the joint attention
    attention_head_dim: int | None = None  # D
    vae_base_channels: int | None = None  # VAE decoder channels at full image resolution
