"""The artifact directory `deleaker-export` writes and the runtime loads: reading and checking it.

Lean (json + pathlib only), so every backend can use it without torch, diffusers or onnx.
The writer is export/manifest.py; both share FORMAT and FORMAT_VERSION from here.

    ARTIFACT/
      manifest.json          format, version, model config, tensors, profiles, DeLeaker settings,
                             files per backend (with byte sizes), tokenizer folders
      transformer.onnx [+ transformer.onnx.data]   the DeLeaker step (external data above 2 GB)
      text_encoder.onnx      CLIP -> pooled [B, Dp]
      text_encoder_2.onnx    T5 -> embeddings [B, T, Dt]
      vae_decoder.onnx       scaled latents -> image
      tokenizer/ tokenizer_2/
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "deleaker-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_NAMES = ("transformer", "text_encoder", "text_encoder_2", "vae_decoder")


class ArtifactError(ValueError):
    """The artifact directory is unusable; the message names the problem and the fix."""


def _fix(root: Path) -> str:
    return f"re-export it with `deleaker-export onnx --model CHECKPOINT --out {root}`"


@dataclass(frozen=True)
class Artifact:
    """A checked artifact directory and its manifest."""

    root: Path
    manifest: dict

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    def backend_files(self, backend: str) -> dict:
        files = self.manifest.get("backends", {}).get(backend)
        if not files:
            have = ", ".join(sorted(self.manifest.get("backends", {}))) or "none"
            raise ArtifactError(f"artifact {self.root} has no files for backend {backend!r} (it has: {have})")
        return files

    def path(self, backend: str, model: str) -> Path:
        files = self.backend_files(backend)
        if model not in files:
            raise ArtifactError(f"artifact {self.root} has no {model} for backend {backend!r}; {_fix(self.root)}")
        return self.root / files[model]

    def tensors(self, model: str) -> dict:
        """{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}} of one exported model."""
        return self.manifest["models"][model]

    def tokenizer_dir(self, which: str) -> Path:
        return self.root / self.manifest["tokenizers"][which]

    @property
    def deleaker(self) -> dict:
        """{"config": DeLeakerConfig fields, "num_steps": int, "attributes": resolved op attributes}."""
        return self.manifest["deleaker"]

    @property
    def size_range(self) -> tuple[int, int]:
        lo, hi = self.manifest["profiles"]["image_side"]
        return int(lo), int(hi)

    def model_info(self):
        """The runtime's ModelInfo for this artifact."""
        from .backends.base import ModelInfo

        m = self.model
        return ModelInfo(
            name=str(self.root), in_channels=int(m["in_channels"]), latent_channels=int(m["latent_channels"]),
            vae_scale_factor=int(m["vae_scale_factor"]), vae_scaling_factor=float(m["vae_scaling_factor"]),
            vae_shift_factor=float(m["vae_shift_factor"]), max_text_tokens=int(m["max_text_tokens"]),
            clip_max_length=int(m["clip_max_length"]), entity_slots=int(m["entity_slots"]),
            guidance_embeds=bool(m["guidance_embeds"]), blocks_per_step=int(m["blocks_per_step"]),
            scheduler_config=dict(m["scheduler_config"]), tokenizer_dir=str(self.tokenizer_dir("tokenizer")),
            tokenizer_2_dir=str(self.tokenizer_dir("tokenizer_2")), size_range=self.size_range,
            deleaker_steps=int(self.deleaker["num_steps"]))


def _check_files(root: Path, manifest: dict) -> None:
    """Every listed file exists with the byte size the exporter recorded (catches partial copies)."""
    for rel, size in sorted(manifest.get("files", {}).items()):
        p = root / rel
        if not p.is_file():
            raise ArtifactError(f"artifact {root} is missing {rel} (listed in {MANIFEST}): the export was "
                                f"interrupted or the folder was copied partially; copy it again or {_fix(root)}")
        actual = p.stat().st_size
        if actual != size:
            raise ArtifactError(f"artifact file {p} is {actual} bytes but {MANIFEST} says {size}: it is truncated "
                                f"or was modified; copy it again or {_fix(root)}")


def load_artifact(path: str | Path, check_files: bool = True) -> Artifact:
    """Open and check an artifact directory (manifest format and version, files and their sizes)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ArtifactError(f"artifact folder not found: {root}" if not root.exists()
                            else f"artifact path is not a folder: {root}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{root} is not a deleaker artifact (no {MANIFEST}); create one with "
                            f"`deleaker-export onnx --model CHECKPOINT --out {root}`")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {mpath}: {e}; {_fix(root)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath} is not a {FORMAT} manifest; {_fix(root)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {root} has format version {version!r}, this deleaker reads version "
                            f"{FORMAT_VERSION}: {_fix(root)} using this deleaker version (or install the "
                            f"deleaker version that wrote it)")
    for key in ("model", "models", "backends", "files", "tokenizers", "profiles", "deleaker"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks the {key!r} section; {_fix(root)}")
    if check_files:
        _check_files(root, manifest)
    return Artifact(root=root.resolve(), manifest=manifest)
