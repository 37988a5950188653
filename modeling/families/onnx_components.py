"""ONNX Runtime stand-ins for a family pipeline's text encoder(s) and VAE decoder.

`install_components(pipe, folder)` reads folder/components.json (written by export/family_components.py)
and sets pipe.text_encoder* / pipe.vae to modules that hold no weights and run the exported
graphs in ONNX Runtime, exposing what the family's diffusers pipeline reads of them: dtype,
device, config, the output structure (`[0]`, `.hidden_states[k]` for the exported k),
`decode(...)` (`.sample` or a tuple), FLUX.2's `bn` running statistics and Qwen-Image's
`temperal_downsample`. A call the exported graph cannot serve (another text length, another
latent rank or channel count, a hidden state that was not exported, vae.encode) fails in one
line naming what was exported. The returned handle's remove() puts the torch components back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import family_of, vae_scale_factor_of

MANIFEST = "components.json"  # what export/family_components.py writes beside the ONNX files


class ComponentError(ValueError):
    """A stand-in was called in a way its ONNX file cannot serve, or the folder does not fit the pipeline."""

log = logging.getLogger("deleaker")


class HiddenStates:
    """The `hidden_states` of an encoder output, holding only the exported entries: indexing one
    of them returns it, any other index fails in one line."""

    def __init__(self, owner: str, count: int, states: dict[int, torch.Tensor]):
        self.owner, self.count, self.states = owner, count, states

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k):
        if not isinstance(k, int):
            raise ComponentError(f"{self.owner}: hidden_states[{k!r}]: only single entries were exported "
                                 f"({self._exported()})")
        i = k + self.count if k < 0 else k
        if i not in self.states:
            raise ComponentError(f"{self.owner}: hidden_states[{k}] was not exported ({self._exported()})")
        return self.states[i]

    def _exported(self) -> str:
        return f"exported: {', '.join(f'[{i}]' for i in sorted(self.states))} of {self.count}"


class _Session(nn.Module):
    """A weightless module around one ONNX Runtime session of a component (components.json entry)."""

    def __init__(self, folder: Path, entry: dict, threads: int | None, providers: list[str] | None):
        from diffusers.configuration_utils import FrozenDict

        from .onnx_step import cpu_session

        super().__init__()
        self.session = cpu_session(folder / entry["file"], threads, providers)
        self.entry = entry
        self.component = entry["name"]
        self.config = FrozenDict(entry["config"])
        self.calls = 0  # graph runs

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # every exported graph is float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # ONNX Runtime's inputs and outputs are host arrays

    def _shape_error(self, name: str, got) -> ComponentError:
        want = self.entry["inputs"][name]["shape"]
        return ComponentError(f"{self.component}: {name} of shape {list(got)} does not fit the exported "
                              f"{self.entry['file']} ({name} {want})")

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        want = self.entry["inputs"][name]["shape"]
        if tensor.dim() != len(want) or any(isinstance(w, int) and w != g for w, g in zip(want, tensor.shape)):
            raise self._shape_error(name, tensor.shape)

    def run(self, **inputs: torch.Tensor) -> list[torch.Tensor]:
        for name, tensor in inputs.items():
            self._check(name, tensor)
        feeds = {name: t.detach().cpu().numpy() for name, t in inputs.items()}
        self.calls += 1
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in self.session.run(None, feeds)]

    def extra_repr(self) -> str:
        return f"{self.entry['file']} (ONNX Runtime)"


def _no_mask(owner: str, attention_mask) -> None:
    if attention_mask is not None:
        raise ComponentError(f"{owner}: the exported encoder takes input_ids only (no attention_mask)")


class OnnxClipText(_Session):
    """CLIPTextModelWithProjection: `[0]` is text_embeds, `.hidden_states[-2]` the penultimate states."""

    def forward(self, input_ids, attention_mask=None, output_hidden_states=None, return_dict=None, **_):
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        _no_mask(self.component, attention_mask)
        embeds, penultimate = self.run(input_ids=input_ids)
        n = self.entry["extra"]["hidden_states"]
        states = HiddenStates(self.component, n, {n - 2: penultimate.to(input_ids.device)})
        out = CLIPTextModelOutput(text_embeds=embeds.to(input_ids.device), hidden_states=states)
        return out if return_dict is not False else out.to_tuple()


class OnnxT5(_Session):
    """T5EncoderModel: `[0]` is the last hidden state."""

    def forward(self, input_ids, attention_mask=None, return_dict=None, **_):
        from transformers.modeling_outputs import BaseModelOutput

        _no_mask(self.component, attention_mask)
        (states,) = self.run(input_ids=input_ids)
        out = BaseModelOutput(last_hidden_state=states.to(input_ids.device))
        return out if return_dict is not False else out.to_tuple()


class OnnxDecoderLM(_Session):
    """Qwen2.5-VL / Mistral 3 on text: `.hidden_states[k]` for the exported layers. A call shorter
    than the exported length is padded on the right with masked tokens (the model is causal: the
    real tokens' states do not see them) and its own length is returned; a longer one is refused."""

    def forward(self, input_ids=None, attention_mask=None, output_hidden_states=None, return_dict=None,
                pixel_values=None, inputs_embeds=None, **_):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        if pixel_values is not None or inputs_embeds is not None or input_ids is None:
            raise ComponentError(f"{self.component}: the exported encoder takes text input_ids only "
                                 f"(no images, no inputs_embeds)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ComponentError(f"{self.component}: attention_mask {list(attention_mask.shape)} does not match "
                                 f"input_ids {list(input_ids.shape)}")
        length = self.entry["extra"]["text_tokens"]
        if input_ids.dim() != 2 or input_ids.shape[1] > length:
            raise self._shape_error("input_ids", input_ids.shape)
        b, n = input_ids.shape
        ids = torch.zeros(b, length, dtype=torch.int64)  # [B, L] padded on the right, masked
        mask = torch.zeros(b, length, dtype=torch.int64)
        ids[:, :n] = input_ids.cpu()
        mask[:, :n] = attention_mask.cpu()
        (stacked,) = self.run(input_ids=ids, attention_mask=mask)  # [B, len(layers), L, D]
        states = {k: stacked[:, i, :n].to(input_ids.device) for i, k in enumerate(self.entry["extra"]["hidden_layers"])}
        out = BaseModelOutputWithPast(hidden_states=HiddenStates(self.component, self.entry["extra"]["hidden_states"],
                                                                 states))
        return out if return_dict is not False else out.to_tuple()


class _BatchNormStats(nn.Module):
    """FLUX.2's vae.bn as the pipeline reads it: the running statistics (no computation)."""

    def __init__(self, running_mean: list[float], running_var: list[float]):
        super().__init__()
        self.register_buffer("running_mean", torch.tensor(running_mean, dtype=torch.float32))
        self.register_buffer("running_var", torch.tensor(running_var, dtype=torch.float32))


class OnnxVaeDecoder(_Session):
    """A diffusers VAE's decode (latents as the pipeline passes them: scaled and shifted)."""

    def __init__(self, folder: Path, entry: dict, threads: int | None, providers: list[str] | None):
        super().__init__(folder, entry, threads, providers)
        extra = entry["extra"]
        if "temperal_downsample" in extra:  # Qwen-Image's pipeline reads it for its scale factor
            self.temperal_downsample = list(extra["temperal_downsample"])
        if "bn" in extra:
            self.bn = _BatchNormStats(extra["bn"]["running_mean"], extra["bn"]["running_var"])

    @property
    def scale_factor(self) -> int:
        """Pixels per latent, as the families' pipelines compute it from their VAE."""
        return vae_scale_factor_of(self.config)

    def decode(self, z, return_dict: bool = True, **_):
        from diffusers.models.autoencoders.vae import DecoderOutput

        (sample,) = self.run(latents=z.float())
        sample = sample.to(z.device)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def encode(self, *args, **kwargs):
        raise ComponentError(f"{self.component}: only the VAE decoder was exported ({self.entry['file']}); "
                             f"encoding images (reference images, image-to-image) needs the torch VAE")

    def forward(self, *args, **kwargs):
        raise ComponentError(f"{self.component}: the ONNX stand-in serves decode() only")


_STANDINS = {"clip": OnnxClipText, "t5": OnnxT5, "qwen2_5_vl": OnnxDecoderLM, "mistral3": OnnxDecoderLM,
             "vae": OnnxVaeDecoder, "vae_video": OnnxVaeDecoder}


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise ComponentError(f"{folder} has no {MANIFEST} (write one with export_components)") from None
    except ValueError as exc:
        raise ComponentError(f"{path} is not valid JSON: {exc}") from None


class InstalledComponents:
    """What install_components did: `standins` (name -> module), `kept` (name -> why it stays torch);
    remove() puts the original components back."""

    def __init__(self, pipe, standins: dict, originals: dict, kept: dict):
        self.pipe, self.standins, self.originals, self.kept = pipe, standins, originals, kept

    def remove(self) -> None:
        for name, module in self.originals.items():
            setattr(self.pipe, name, module)
        self.standins = {}


def install_components(pipe, folder: str | Path, threads: int | None = None,
                       providers: list[str] | None = None) -> InstalledComponents:
    """Replace `pipe`'s exported components (folder/components.json) by ONNX Runtime stand-ins.
    Components the manifest records as not exported stay torch (logged, listed in `kept`)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    family = family_of(pipe.transformer).name
    if manifest.get("family") != family:
        raise ComponentError(f"{folder} holds {manifest.get('family')} components; this pipeline is {family} "
                             f"({type(pipe).__name__})")
    standins, originals, kept = {}, {}, {}
    for entry in manifest["components"]:
        name = entry["name"]
        if entry.get("reason"):
            kept[name] = entry["reason"]
            log.warning("%s stays in torch (not exported: %s)", name, entry["reason"])
            continue
        cls = _STANDINS.get(entry["kind"])
        if cls is None:
            raise ComponentError(f"{folder / MANIFEST}: unknown component kind {entry['kind']!r} for {name}")
        standins[name] = cls(folder, entry, threads, providers)
    vae = standins.get("vae")
    if vae is not None and getattr(pipe, "vae_scale_factor", None) not in (None, vae.scale_factor):
        # the pipeline computes it when built (8 when built without a VAE) and sizes latents with it
        raise ComponentError(f"the pipeline was built for vae_scale_factor {pipe.vae_scale_factor} (diffusers takes 8 "
                             f"when built without a VAE), the exported VAE's is {vae.scale_factor}: build the "
                             f"pipeline with its torch VAE, then install")
    for name, module in standins.items():
        originals[name] = getattr(pipe, name, None)
        setattr(pipe, name, module)
    log.info("ONNX Runtime runs %s from %s", ", ".join(standins), folder)
    return InstalledComponents(pipe, standins, originals, kept)
