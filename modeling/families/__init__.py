"""The model families DeLeaker runs on, one adapter module each, and the registry that picks one.

    family_of(transformer)           # by the transformer's class
    family_of_class(name)            # by a class name, e.g. from a folder's model_index.json
    family_of_folder(model_dir)      # from the folder alone, before any weight is loaded

An unsupported transformer is refused in one line naming the supported families.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import flux1, flux2, qwenimage, sd3
from .base import CFG_BATCHED, CFG_SEPARATE, DISTILLED, Family, OpProcessor

FAMILIES: dict[str, Family] = {f.name: f for f in (flux1.FAMILY, sd3.FAMILY, qwenimage.FAMILY, flux2.FAMILY)}
_BY_CLASS = {f.transformer_class: f for f in FAMILIES.values()}

__all__ = ["FAMILIES", "Family", "OpProcessor", "UnsupportedModel", "family_note", "family_of", "family_of_class",
           "family_of_folder", "supported", "vae_scale_factor", "vae_scale_factor_of", "DISTILLED", "CFG_BATCHED", "CFG_SEPARATE"]


class UnsupportedModel(ValueError):
    """The transformer is of no supported family; the message names the supported ones."""


def supported() -> str:
    """'flux1 (FluxTransformer2DModel), sd3 (SD3Transformer2DModel), ...'"""
    return ", ".join(f"{f.name} ({f.transformer_class})" for f in FAMILIES.values())


def family_of_class(class_name: str) -> Family:
    family = _BY_CLASS.get(class_name)
    if family is None:
        raise UnsupportedModel(f"DeLeaker does not support the transformer {class_name}; supported families: "
                               f"{supported()}")
    return family


def family_note(class_name: str | None) -> str:
    """For a folder the FLUX runtime cannot run: what DeLeaker offers for its transformer class."""
    family = _BY_CLASS.get(class_name or "")
    if family is None:
        return f"DeLeaker supports the families {supported()}"
    return (f"{family.title} runs through the diffusers drop-in (modeling/diffusers_integration.install; "
            f"`deleaker generate --model` on the torch backend), see docs/models.md")


def family_of(transformer) -> Family:
    """The family of a loaded transformer (its class or, for a subclass, the nearest base class)."""
    for cls in type(transformer).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return family_of_class(type(transformer).__name__)  # raises, naming the class


def family_of_folder(model_dir: str | Path) -> Family:
    """The family of a diffusers folder, read from transformer/config.json (or model_index.json), or
    of a transformer folder itself (its config.json)."""
    folder = Path(model_dir)
    for path, key in ((folder / "transformer" / "config.json", "_class_name"), (folder / "model_index.json", None),
                      (folder / "config.json", "_class_name")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        name = data.get("_class_name") if key else (data.get("transformer") or [None, None])[1]
        if name:
            return family_of_class(name)
    raise UnsupportedModel(f"{folder} has no transformer/config.json or model_index.json naming its transformer; "
                           f"supported families: {supported()}")


def vae_scale_factor_of(vae_config) -> int:
    """Pixels per latent of a VAE, from its config (a dict or diffusers FrozenDict), as the families'
    pipelines compute it: Qwen-Image's video VAE 2 ** its temporal downsamplings, the others
    2 ** (levels - 1)."""
    if "temperal_downsample" in vae_config:  # diffusers' spelling in AutoencoderKLQwenImage
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config.get("block_out_channels") or [0] * 4) - 1)


def vae_scale_factor(model_dir: str | Path) -> int:
    """Pixels per latent of a folder's VAE (vae_scale_factor_of its vae/config.json); 8, every
    family's real VAE, when the folder has no readable vae/config.json."""
    try:
        vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 8
    return vae_scale_factor_of(vae)
