"""The `torch` backend: a diffusers-format FLUX folder run eagerly with DeLeaker processors.

The development and comparison backend: the reference op (or the fused CUDA op when built)
inside diffusers' own FluxTransformer2DModel, transformers' CLIP/T5 encoders and diffusers'
AutoencoderKL. Weights load from disk only.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from deleaker.runtime import op_schema
from deleaker.runtime.backends.base import Backend, ModelInfo, Session, SessionInputs
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from .checkpoint import load_checkpoint
from .flux import DeLeakerFlux, blocks_per_step
from .libs import quiet_libraries

log = logging.getLogger("deleaker")

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


class TorchSession(Session):
    """One batch on the torch device: every input, the schedule and the state stay there."""

    def __init__(self, backend: "TorchBackend", inputs: SessionInputs):
        be, dev, dt = backend, backend.device, backend.dtype
        self.model = be.model
        put = lambda x, dtype=dt: torch.from_numpy(np.ascontiguousarray(x)).to(dev, dtype)  # noqa: E731
        with torch.no_grad():
            self.embeds, self.pooled = be.encode_on_device(put(inputs.clip_ids, torch.long),
                                                           put(inputs.t5_ids, torch.long))  # [B, T, Dt], [B, Dp]
        st = inputs.static
        B = inputs.batch_size
        self.img_ids, self.txt_ids = put(st["img_ids"]), put(st["txt_ids"])
        self.guidance = put(st["guidance"]) if "guidance" in st else None  # [B]
        self.entity_tokens = put(st["entity_tokens"], torch.float32)  # [B, E, T]
        self.grid = put(st["grid"], torch.long)  # [2]
        self.windows, self.knobs, self.rules = (put(st[n], torch.long if n != "knobs" else torch.float32)
                                                for n in op_schema.SETTINGS_TENSORS)  # [B, 4], [B, 3], [B, 6]
        self.x = put(inputs.latents, torch.float32)  # [B, I, C]: the Euler state stays in float32
        self.history = put(inputs.history, torch.float32)  # [B, E, I]
        # the whole schedule up front, so a step reads it on the device (no host -> device copy)
        self.timesteps = put(np.repeat(inputs.timesteps[:, None], B, axis=1))  # [S, B]
        sig = inputs.sigmas.astype(np.float32)
        self.dts = put(sig[1:] - sig[:-1], torch.float32)  # [S] sigma_{i+1} - sigma_i
        self.steps = torch.arange(inputs.num_steps, dtype=torch.long, device=dev)  # [S]: step i as a 0-d view

    @torch.no_grad()
    def step(self, i: int) -> None:
        noise, self.history = self.model(
            self.x.to(self.embeds.dtype), self.embeds, self.pooled, self.timesteps[i], self.img_ids, self.txt_ids,
            self.guidance, self.entity_tokens, self.history, self.steps[i], self.grid, self.windows, self.knobs,
            self.rules)
        self.x = self.x + self.dts[i] * noise.float()  # FlowMatchEuler in float32 (runtime/scheduler.py)

    def result(self):
        return self.x.cpu().numpy(), self.history.float().cpu().numpy()


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, ckpt, device: str = "cpu", op: str = "reference", entity_slots: int = DEFAULT_ENTITY_SLOTS,
                 max_text_tokens: int | None = None):
        self.device = torch.device(device)
        self.ckpt = ckpt
        self.dtype = ckpt.dtype
        self.text_encoder = ckpt.text_encoder.to(self.device).eval()
        self.text_encoder_2 = ckpt.text_encoder_2.to(self.device).eval()
        self.vae = ckpt.vae.to(self.device).eval()
        self.model = DeLeakerFlux(ckpt.transformer.to(self.device).eval(), op_name=op)
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
             progress: bool = True, **kw) -> "TorchBackend":
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
        return cls(ckpt, device=device, op=op, **kw)

    def _t(self, x: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x)).to(self.device, dtype or self.dtype)

    def encode_on_device(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
        """Token ids on the device -> (prompt_embeds [B, T, Dt], pooled [B, Dp]) on the device, model dtype."""
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        embeds = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        return embeds.to(self.dtype), pooled.to(self.dtype)

    @torch.no_grad()
    def encode_prompt(self, clip_ids, t5_ids):
        embeds, pooled = self.encode_on_device(self._t(clip_ids, torch.long), self._t(t5_ids, torch.long))
        return embeds.float().cpu().numpy(), pooled.float().cpu().numpy()

    def start_session(self, inputs: SessionInputs) -> TorchSession:
        return TorchSession(self, inputs)

    @torch.no_grad()
    def decode(self, vae_latents):
        return self.vae.decode(self._t(vae_latents), return_dict=False)[0].float().cpu().numpy()
