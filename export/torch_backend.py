"""The `torch` backend: a diffusers-format FLUX folder run eagerly with DeLeaker processors.

The development and comparison backend: the reference op (or the fused CUDA op when built)
inside diffusers' own FluxTransformer2DModel, transformers' CLIP/T5 encoders and diffusers'
AutoencoderKL. Weights load from disk only.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from deleaker.runtime.backends.base import Backend, ModelInfo
from deleaker.runtime.config import DeLeakerConfig

from .checkpoint import load_checkpoint
from .flux import DeLeakerFlux, blocks_per_step
from .libs import quiet_libraries

log = logging.getLogger("deleaker")

DEFAULT_ENTITY_SLOTS = 4
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# What the fused kernels support (plugins/deleaker_attention/include/deleaker_attention.h).
FUSED_HEAD_DIMS = (64, 128)
FUSED_DTYPES = ("fp16", "bf16")


def _check_fused_op_fits(tcfg, device: str, dtype: str) -> None:
    """Fail at load, in one line, rather than inside the first attention block."""
    if not device.startswith("cuda"):
        raise ValueError("--attention cuda runs on a GPU: add --device cuda")
    if dtype not in FUSED_DTYPES:
        raise ValueError(f"the fused op takes fp16 or bf16 activations; got dtype {dtype} (use --dtype bf16)")
    if tcfg.attention_head_dim not in FUSED_HEAD_DIMS:
        raise ValueError(f"the fused op supports head sizes {FUSED_HEAD_DIMS}; this model's is "
                         f"{tcfg.attention_head_dim} (use --attention reference)")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ckpt, device: str = "cpu", op: str = "reference",
                 deleaker_config: DeLeakerConfig | None = None, entity_slots: int = DEFAULT_ENTITY_SLOTS,
                 max_text_tokens: int | None = None):
        self.device = torch.device(device)
        self.ckpt = ckpt
        self.dtype = ckpt.dtype
        self.text_encoder = ckpt.text_encoder.to(self.device).eval()
        self.text_encoder_2 = ckpt.text_encoder_2.to(self.device).eval()
        self.vae = ckpt.vae.to(self.device).eval()
        self.base_config = deleaker_config or DeLeakerConfig()
        self.model = DeLeakerFlux(ckpt.transformer.to(self.device).eval(), self.base_config, op_name=op)
        tcfg = ckpt.transformer.config
        self.info = ModelInfo(
            name=str(ckpt.path), in_channels=tcfg.in_channels, latent_channels=ckpt.vae.config.latent_channels,
            vae_scale_factor=2 ** (len(ckpt.vae.config.block_out_channels) - 1),
            vae_scaling_factor=float(ckpt.vae.config.scaling_factor),
            vae_shift_factor=float(ckpt.vae.config.shift_factor or 0.0),
            max_text_tokens=max_text_tokens or ckpt.max_sequence_length, clip_max_length=ckpt.clip_max_length,
            entity_slots=entity_slots, guidance_embeds=bool(tcfg.guidance_embeds),
            blocks_per_step=blocks_per_step(ckpt.transformer), scheduler_config=dict(ckpt.scheduler_config),
            tokenizer_dir=str(ckpt.tokenizer_dir), tokenizer_2_dir=str(ckpt.tokenizer_2_dir))

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", dtype: str = "fp32", op: str = "reference",
             deleaker_config: DeLeakerConfig | None = None, progress: bool = True, **kw) -> "TorchBackend":
        if source is None:
            from .tiny_model import ensure_tiny_model

            source = ensure_tiny_model()
            log.info("using the embedded tiny offline model at %s (random weights: images are noise-like)", source)
        quiet_libraries()
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU")
        ckpt = load_checkpoint(source, dtype=_DTYPES[dtype])
        if op == "cuda":
            _check_fused_op_fits(ckpt.transformer.config, device, dtype)
        return cls(ckpt, device=device, op=op, deleaker_config=deleaker_config, **kw)

    def prepare(self, num_steps: int) -> None:
        # windows derive from the step count (unless the config gives them explicitly)
        if self.model.config.num_steps != num_steps:
            self.model = DeLeakerFlux(self.model.transformer, self.base_config.replace(num_steps=num_steps),
                                      op_name=self.model.op_name)

    @property
    def deleaker_config(self):
        return self.model.config

    def _t(self, x: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype or self.dtype)

    @torch.no_grad()
    def encode_prompt(self, clip_ids, t5_ids):
        pooled = self.text_encoder(self._t(clip_ids, torch.long), output_hidden_states=False).pooler_output
        embeds = self.text_encoder_2(self._t(t5_ids, torch.long), output_hidden_states=False)[0]
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    @torch.no_grad()
    def step(self, inputs):
        x = {k: self._t(v) for k, v in inputs.items()
             if k not in ("entity_tokens", "history", "step", "grid")}
        noise, hist = self.model(
            x["hidden_states"], x["encoder_hidden_states"], x["pooled_projections"], x["timestep"], x["img_ids"],
            x["txt_ids"], x.get("guidance"), self._t(inputs["entity_tokens"], torch.float32),
            self._t(inputs["history"], torch.float32), self._t(inputs["step"], torch.long),
            self._t(inputs["grid"], torch.long))
        return noise.float().cpu().numpy(), hist.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, vae_latents):
        return self.vae.decode(self._t(vae_latents), return_dict=False)[0].float().cpu().numpy()
