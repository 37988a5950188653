"""ONNX export of a model family's text encoder(s) and VAE decoder (float32), for the ONNX Runtime
stand-ins (modeling/families/onnx_components.py) its own diffusers pipeline holds in their place.

What is exported, per family (the pipeline attribute, the graph, its fixed sizes):

- sd3 (StableDiffusion3Pipeline): text_encoder and text_encoder_2 (CLIP with projection):
  input_ids [B, 77] -> text_embeds [B, P] (the pipeline's `[0]`) and penultimate [B, 77, D]
  (its `hidden_states[-2]`, no clip_skip); text_encoder_3 (T5): input_ids [B, T] ->
  last_hidden_state [B, T, D], T the pipeline's max_sequence_length (256 unless given);
  vae: AutoencoderKL decoder, scaled/shifted latents [B, C, h, w] -> sample [B, 3, H, W].
- qwenimage (QwenImagePipeline): text_encoder (Qwen2.5-VL, text only): input_ids and
  attention_mask [B, L] -> its last hidden state [B, L, D] (`hidden_states[-1]`); L is a maximum:
  the stand-in pads a shorter call on the right (the model is causal, so the real tokens'
  states do not see the padding) and returns the call's own length. vae: the
  AutoencoderKLQwenImage decoder on 5-D latents [B, z, 1, h, w].
- flux2 (Flux2Pipeline): text_encoder (Mistral 3, text only): input_ids and attention_mask
  [B, L] -> the hidden states of layers 10, 20, 30 stacked [B, 3, L, D] (what the pipeline reads),
  L a maximum as for Qwen-Image (the pipeline pads to max_sequence_length, 512 unless given, on
  the left). vae: the AutoencoderKLFlux2 decoder; its batch-norm running statistics (which the pipeline
  reads to un-normalise latents) travel in the manifest.

Batch and the latent height/width are dynamic. A left-padded token's attention row has every key
masked: torch's SDPA gives it a zero output and the pipeline keeps that token's states, so the
decoder LMs are traced with that zeroing written out (the exporter's own translation differs).
Not exported: any VAE encoder (FLUX.2's
reference images and image-to-image need vae.encode, which the stand-in refuses in one line),
the vision towers of Qwen2.5-VL and Mistral 3 (text-only prompts), CLIP hidden states other than
the penultimate (SD3's clip_skip), text generation (FLUX.2's prompt upsampling).

`export_components(pipe, out_dir)` writes one .onnx per component and `components.json`
(MANIFEST): per component its file, input/output names and shapes, and the configuration the
stand-ins expose (FLUX.2's bn statistics included). `install_components(pipe, out_dir)`
(modeling/families/onnx_components.py) swaps the pipeline's torch components for the stand-ins. Every
component needs only its own module; the transformer is export/family_onnx.py's.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from deleaker.modeling.families import family_of, vae_scale_factor_of
from deleaker.modeling.families.onnx_components import MANIFEST, ComponentError

from . import onnx_export

log = logging.getLogger("deleaker")

FORMAT = 1
# the hidden states of its Mistral 3 text encoder that Flux2Pipeline stacks (text_encoder_out_layers)
FLUX2_LAYERS = (10, 20, 30)
# Qwen-Image's pipeline truncates at tokenizer_max_length (1024) + its 34 dropped template tokens
QWEN_MAX_TOKENS = 1024 + 34
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length
FLUX2_TOKENS = 512  # Flux2Pipeline's default max_sequence_length


@dataclass
class Component:
    """One pipeline component: exported (file set) or left in torch (reason set)."""

    name: str  # the pipeline attribute: text_encoder, text_encoder_2, text_encoder_3, vae
    kind: str  # clip, t5, qwen2_5_vl, mistral3, vae (4-D latents), vae_video (5-D latents)
    file: str | None = None
    inputs: dict = field(default_factory=dict)  # name -> {"dtype", "shape"}
    outputs: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # what the stand-in exposes as .config
    extra: dict = field(default_factory=dict)  # text_tokens, hidden_layers, bn statistics, ...
    external_data: str | None = None  # weights file beside `file` (components above ~2 GB)
    reason: str | None = None  # why it stayed in torch


# --------------------------------------------------------------------------------------------
# Wrappers: one pure tensor function per component, float32 out
# --------------------------------------------------------------------------------------------

class ClipWithPenultimate(nn.Module):
    """CLIPTextModelWithProjection -> (text_embeds [B, P], hidden_states[-2] [B, T, D])."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.enc = text_encoder

    def forward(self, input_ids):
        out = self.enc(input_ids, output_hidden_states=True)
        return out[0].float(), out.hidden_states[-2].float()


class DecoderHiddenStates(nn.Module):
    """A decoder-only LM on text: (input_ids, attention_mask) [B, L] -> hidden_states[k] for k in
    `layers`, stacked [B, len(layers), L, D]."""

    def __init__(self, text_encoder: nn.Module, layers: tuple[int, ...]):
        super().__init__()
        self.enc = text_encoder
        self.layers = tuple(layers)

    def forward(self, input_ids, attention_mask):
        out = self.enc(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                       use_cache=False)
        return torch.stack([out.hidden_states[k] for k in self.layers], dim=1).float()


@contextlib.contextmanager
def _sdpa_zero_masked_rows():
    """While exporting a decoder LM: transformers' "sdpa" attention with the output of a query row
    whose keys are all masked set to zero. That is what torch's scaled_dot_product_attention
    computes for such a row (FLUX.2's left padding makes them, and the pipeline keeps those
    states), while the exporter's translation softmaxes the row uniformly instead."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa_zero_masked(module, query, key, value, attention_mask, *args, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            keep = attention_mask.any(dim=-1).transpose(1, 2).unsqueeze(-1)  # [B, 1, q, kv] -> [B, q, 1, 1]
            out = out * keep.to(out.dtype)  # out: [B, q, H, D]
        return out, weights

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    before = local.get("sdpa")
    local["sdpa"] = sdpa_zero_masked
    try:
        yield
    finally:
        if before is None:
            local.pop("sdpa", None)
        else:
            local["sdpa"] = before


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------

def _config_dict(module) -> dict:
    """A component's configuration as plain JSON (diffusers FrozenDict or transformers config)."""
    cfg = module.config
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return json.loads(json.dumps(data, default=str))


def _dim(name: str, lo: int = 1, hi: int = 1024):
    return torch.export.Dim(name, min=lo, max=hi)


def _num_hidden_states(text_encoder) -> int:
    """Entries of the encoder's hidden_states tuple: the embeddings plus one per layer."""
    cfg = text_encoder.config
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(cfg.num_hidden_layers) + 1


def _component(ex: onnx_export.Exported, kind: str, extra: dict) -> Component:
    return Component(name="", kind=kind, file=ex.file, inputs=ex.inputs, outputs=ex.outputs, extra=extra,
                     external_data=ex.external_data)


def _export_clip(enc, path: Path, tokens: int) -> Component:
    ids = torch.zeros(2, tokens, dtype=torch.int64)  # [B, 77]
    ids[:, -1] = enc.config.eos_token_id
    ex = onnx_export._export(ClipWithPenultimate(enc).eval(), {"input_ids": ids}, {"input_ids": {0: _dim("batch")}},
                             ["text_embeds", "penultimate"], path, None)
    return _component(ex, "clip", {"text_tokens": tokens, "hidden_states": _num_hidden_states(enc)})


def _export_t5(enc, path: Path, tokens: int) -> Component:
    ids = torch.ones(2, tokens, dtype=torch.int64)  # [B, T]
    ex = onnx_export._export(onnx_export.T5Embeds(enc).eval(), {"input_ids": ids}, {"input_ids": {0: _dim("batch")}},
                             ["last_hidden_state"], path, None)
    return _component(ex, "t5", {"text_tokens": tokens})


def _export_decoder_lm(enc, path: Path, tokens: int, layers: tuple[int, ...], kind: str) -> Component:
    n = _num_hidden_states(enc)
    absolute = tuple(k % n for k in layers)
    ids = torch.randint(3, 100, (2, tokens), dtype=torch.int64)  # [B, L]
    mask = torch.ones(2, tokens, dtype=torch.int64)
    mask[1, :3] = 0  # a left-padded row (fully masked query rows), so the trace takes the masked path
    dyn = {"input_ids": {0: _dim("batch")}, "attention_mask": {0: _dim("batch")}}
    with _sdpa_zero_masked_rows():
        ex = onnx_export._export(DecoderHiddenStates(enc, absolute).eval(),
                                 {"input_ids": ids, "attention_mask": mask}, dyn, ["hidden_states"], path, None)
    return _component(ex, kind, {"text_tokens": tokens, "hidden_layers": list(absolute), "hidden_states": n})


def _export_vae(vae, path: Path, height: int, width: int, video: bool) -> Component:
    cfg = vae.config
    f = vae_scale_factor_of(cfg)
    if video:  # AutoencoderKLQwenImage: [B, z, frames=1, h, w]
        z = torch.randn(2, cfg.z_dim, 1, height // f, width // f)
        axes = {0: _dim("batch"), 3: _dim("latent_height", 2, 4096), 4: _dim("latent_width", 2, 4096)}
    else:  # [B, C, h, w]
        z = torch.randn(2, cfg.latent_channels, height // f, width // f)
        axes = {0: _dim("batch"), 2: _dim("latent_height", 2, 4096), 3: _dim("latent_width", 2, 4096)}
    ex = onnx_export._export(onnx_export.VaeDecode(vae).eval(), {"latents": z}, {"latents": axes}, ["sample"],
                             path, None)
    extra = {}
    if hasattr(vae, "temperal_downsample"):
        extra["temperal_downsample"] = [bool(x) for x in vae.temperal_downsample]
    bn = getattr(vae, "bn", None)
    if bn is not None:  # FLUX.2: the pipeline un-normalises latents with these (float32 is exact in JSON)
        extra["bn"] = {"running_mean": bn.running_mean.float().tolist(), "running_var": bn.running_var.float().tolist()}
    return _component(ex, "vae_video" if video else "vae", extra)


def _plan(pipe, family: str, text_tokens: int | None, height: int, width: int) -> dict:
    """{pipeline attribute: export function(path) -> Component} for the family."""
    if family == "sd3":
        clip_tokens = int(pipe.tokenizer_max_length)
        plan = {
            "text_encoder": lambda p, m=pipe.text_encoder: _export_clip(m, p, clip_tokens),
            "text_encoder_2": lambda p, m=pipe.text_encoder_2: _export_clip(m, p, clip_tokens),
        }
        if getattr(pipe, "text_encoder_3", None) is not None:
            plan["text_encoder_3"] = lambda p, m=pipe.text_encoder_3: _export_t5(m, p, text_tokens or SD3_T5_TOKENS)
        plan["vae"] = lambda p, m=pipe.vae: _export_vae(m, p, height, width, video=False)
    elif family == "qwenimage":
        plan = {
            "text_encoder": lambda p, m=pipe.text_encoder: _export_decoder_lm(m, p, text_tokens or QWEN_MAX_TOKENS,
                                                                             (-1,), "qwen2_5_vl"),
            "vae": lambda p, m=pipe.vae: _export_vae(m, p, height, width, video=True),
        }
    elif family == "flux2":
        plan = {
            "text_encoder": lambda p, m=pipe.text_encoder: _export_decoder_lm(m, p, text_tokens or FLUX2_TOKENS,
                                                                             FLUX2_LAYERS, "mistral3"),
            "vae": lambda p, m=pipe.vae: _export_vae(m, p, height, width, video=False),
        }
    else:
        raise ComponentError(f"export_components: the {family} family has no component export here "
                             f"(families: sd3, qwenimage, flux2; FLUX.1's is export/onnx_export.py)")
    return plan


def export_components(pipe, out_dir: str | Path, text_tokens: int | None = None, height: int = 64,
                      width: int = 64, names: tuple[str, ...] | None = None) -> list[Component]:
    """Export `pipe`'s text encoder(s) and VAE decoder (float32) into out_dir, one .onnx each, and
    write out_dir/components.json. text_tokens: the T5 length (sd3) or the maximum prompt length
    (qwenimage, flux2); default the pipeline's own. height/width: the example image (pixels);
    the exported VAE takes any size. names: a subset of the family's components.
    A component the exporter refuses stays in torch: its entry carries the one-line reason."""
    family = family_of(pipe.transformer).name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(pipe, family, text_tokens, height, width)
    unknown = set(names or ()) - set(plan)
    if unknown:
        raise ComponentError(f"export_components: {family} has no component {sorted(unknown)}; it has {list(plan)}")
    done = []
    for name, run in plan.items():
        if names and name not in names:
            continue
        module = getattr(pipe, name)
        dtype = next(module.parameters()).dtype
        if dtype != torch.float32:
            raise ComponentError(f"export_components: {name} is {dtype}; load the pipeline in float32 "
                                 f"(the exported graphs are float32)")
        try:
            comp = run(out / f"{name}.onnx")
        except Exception as exc:  # the exporter's refusal: recorded, the component stays in torch
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log.warning("%s not exported, stays in torch: %s", name, reason)
            comp = Component(name=name, kind="", reason=reason)
        comp.name = name
        comp.config = _config_dict(module)
        done.append(comp)
    manifest = {"format": FORMAT, "family": family, "pipeline": type(pipe).__name__,
                "components": [asdict(c) for c in done]}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return done
