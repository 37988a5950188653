"""The artifact directory `deleaker-export` writes and the runtime loads: reading and checking it.

Lean (json + pathlib + the runtime's config and op schema), so every backend can use it without
torch, diffusers or onnx.
The writer is export/manifest.py; both share FORMAT and FORMAT_VERSION from here.

    ARTIFACT/
      manifest.json          format, version, model config, tensors, profiles, default DeLeaker
                             settings and op contract version, files per backend (with byte
                             sizes), tokenizer folders
      transformer.onnx [+ transformer.onnx.data]   the DeLeaker step (external data above 2 GB)
      text_encoder.onnx      CLIP -> pooled [B, Dp]
      text_encoder_2.onnx    T5 -> embeddings [B, T, Dt]
      vae_decoder.onnx       scaled latents -> image
      tokenizer/ tokenizer_2/
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from . import op_schema
from .config import ConfigError, DeLeakerConfig

FORMAT = "deleaker-artifact"
# 2: op contract v2 (DeLeaker settings are per-sample inputs of the step, not node attributes).
FORMAT_VERSION = 2
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
        """{"config": the default DeLeakerConfig's fields, "op_version": op contract version}."""
        return self.manifest["deleaker"]

    def default_config(self) -> DeLeakerConfig:
        """The DeLeaker settings recorded at export, for requests that bring none."""
        return _default_config(self.root, self.manifest)

    @property
    def size_range(self) -> tuple[int, int]:
        lo, hi = self.manifest["profiles"]["image_side"]
        return int(lo), int(hi)

    def model_info(self):
        """The runtime's ModelInfo for this artifact (any batch: ONNX Runtime has no batch bound;
        profiles["batch"] is for engines built with optimisation profiles)."""
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
            default_config=dataclasses.asdict(self.default_config()))


def _default_config(root: Path, manifest: dict) -> DeLeakerConfig:
    fields = manifest["deleaker"].get("config")
    known = {f.name for f in dataclasses.fields(DeLeakerConfig)}
    if not isinstance(fields, dict) or set(fields) - known:
        extra = sorted(set(fields) - known) if isinstance(fields, dict) else []
        raise ArtifactError(f"{root / MANIFEST}: the deleaker config is not one this deleaker knows"
                            + (f" (unknown fields {extra})" if extra else "") + f"; {_fix(root)}")
    try:
        return DeLeakerConfig(**fields)
    except (TypeError, ConfigError) as e:
        raise ArtifactError(f"{root / MANIFEST}: bad default deleaker config ({e}); {_fix(root)}") from None


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
    if version == 1:
        # v1 baked the DeLeaker windows and settings into the graph (op contract v1)
        raise ArtifactError(f"artifact {root} has format version 1 (DeLeaker settings baked into the graph, "
                            f"op contract v1); this deleaker reads version {FORMAT_VERSION} (settings are "
                            f"per-request inputs): {_fix(root)}")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact {root} has format version {version!r}, this deleaker reads version "
                            f"{FORMAT_VERSION}: {_fix(root)} using this deleaker version (or install the "
                            f"deleaker version that wrote it)")
    for key in ("model", "models", "backends", "files", "tokenizers", "profiles", "deleaker"):
        if key not in manifest:
            raise ArtifactError(f"{mpath} lacks the {key!r} section; {_fix(root)}")
    op_version = manifest["deleaker"].get("op_version")
    if op_version != op_schema.ONNX_OPSET_VERSION:
        raise ArtifactError(f"artifact {root} holds {op_schema.OP_NAME} op version {op_version!r}, this deleaker "
                            f"runs version {op_schema.ONNX_OPSET_VERSION}: {_fix(root)}")
    _default_config(root, manifest)  # a bad default fails at load, not at the first request
    if check_files:
        _check_files(root, manifest)
    return Artifact(root=root.resolve(), manifest=manifest)
