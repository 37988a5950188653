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
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import op_schema
from .config import ConfigError, DeLeakerConfig
from .model_card import read_card
from .model_info import ModelInfo

FORMAT = "deleaker-artifact"
# A model family's step artifact (SD3/3.5, Qwen-Image, FLUX.2): runtime/family_artifact.py reads it;
# this reader refuses it in one line.
FAMILY_FORMAT = "deleaker-family-step"
# 2: op contract v2 (DeLeaker settings are per-sample inputs of the step, not node attributes).
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MODEL_NAMES = ("transformer", "text_encoder", "text_encoder_2", "vae_decoder")

log = logging.getLogger("deleaker")


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
        return inside(self.root, files[model], f"backends.{backend}.{model}")

    def tensors(self, model: str) -> dict:
        """{"inputs": {name: {"dtype", "shape"}}, "outputs": {...}} of one exported model."""
        return self.manifest["models"][model]

    def tokenizer_dir(self, which: str) -> Path:
        return inside(self.root, self.manifest["tokenizers"][which], f"tokenizers.{which}")

    @property
    def deleaker(self) -> dict:
        """{"config": the default DeLeakerConfig's fields, "op_version": op contract version}."""
        return self.manifest["deleaker"]

    def default_config(self) -> DeLeakerConfig:
        """The DeLeaker settings recorded at export, for requests that bring none."""
        return _default_config(self.root, self.manifest)

    @property
    def size_range(self) -> tuple[int, int]:
        return _size_range(self.root, self.manifest)

    def model_info(self):
        """The runtime's ModelInfo for this artifact (any batch: ONNX Runtime has no batch bound;
        profiles["batch"] is for engines built with optimisation profiles)."""
        m = _model_fields(self.root, self.manifest)
        return ModelInfo(
            name=str(self.root), **m, tokenizer_dir=str(self.tokenizer_dir("tokenizer")),
            tokenizer_2_dir=str(self.tokenizer_dir("tokenizer_2")), size_range=self.size_range,
            default_config=dataclasses.asdict(self.default_config()), card=read_card(self.root),
            **_attention_sizes(self.manifest))


def _attention_sizes(manifest: dict) -> dict:
    """Heads and head size from the recorded transformer config (for the memory estimate; optional)."""
    tcfg = manifest["model"].get("transformer_config")
    tcfg = tcfg if isinstance(tcfg, dict) else {}
    out = {}
    for key, name in (("num_attention_heads", "attention_heads"), ("attention_head_dim", "attention_head_dim")):
        v = tcfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            out[name] = v
    return out


# manifest "model" field -> its type (what ModelInfo takes); every one is required
_MODEL_FIELDS = {"in_channels": int, "latent_channels": int, "vae_scale_factor": int, "vae_scaling_factor": float,
                 "vae_shift_factor": float, "max_text_tokens": int, "clip_max_length": int, "entity_slots": int,
                 "guidance_embeds": bool, "blocks_per_step": int, "scheduler_config": dict}


def _model_fields(root: Path, manifest: dict) -> dict:
    """The manifest's model section as typed values; a missing or mistyped field is one line naming it."""
    from .scheduler import FlowMatchEuler, SchedulerError

    where = root / MANIFEST
    m = manifest["model"]
    if not isinstance(m, dict):
        raise ArtifactError(f"{where}: 'model' must be an object; {_fix(root)}")
    out = {}
    for name, kind in _MODEL_FIELDS.items():
        if name not in m:
            raise ArtifactError(f"{where}: model.{name} is missing; {_fix(root)}")
        v = m[name]
        ok = (isinstance(v, bool) if kind is bool else isinstance(v, dict) if kind is dict else
              isinstance(v, int) and not isinstance(v, bool) and v > 0 if kind is int else
              isinstance(v, (int, float)) and not isinstance(v, bool))
        if not ok:
            want = {int: "a positive integer", float: "a number", bool: "true or false", dict: "an object"}[kind]
            raise ArtifactError(f"{where}: model.{name} must be {want}, got {v!r}; {_fix(root)}")
        out[name] = float(v) if kind is float else v
    try:
        FlowMatchEuler.from_config(out["scheduler_config"])
    except (SchedulerError, TypeError) as e:
        raise ArtifactError(f"{where}: model.scheduler_config: {e}; {_fix(root)}") from None
    return out


def _size_range(root: Path, manifest: dict) -> tuple[int, int]:
    side = manifest["profiles"].get("image_side") if isinstance(manifest["profiles"], dict) else None
    if not (isinstance(side, (list, tuple)) and len(side) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in side) and side[0] <= side[1]):
        raise ArtifactError(f"{root / MANIFEST}: profiles.image_side must be [min, max] pixels with "
                            f"0 < min <= max, got {side!r}; {_fix(root)}")
    return int(side[0]), int(side[1])


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


def inside(root: Path, rel, where: str) -> Path:
    """root / rel for a path the manifest names, refused unless it is a relative path that stays
    inside the artifact folder (no "..", no absolute path, no symlink out of it)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\x00" in rel:
        raise ArtifactError(f"{root / MANIFEST}: {where} must be a relative path inside the artifact, got {rel!r}")
    path = root / rel
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise ArtifactError(f"{root / MANIFEST}: {where} {rel!r} points outside the artifact folder {root}; "
                            f"an artifact reads only its own files: {_fix(root)}")
    return path


def _manifest_paths(manifest: dict):
    """(where, relative path) of every file or folder the manifest names."""
    files = manifest.get("files")
    for rel in (files if isinstance(files, dict) else {}):
        yield f"files[{rel!r}]", rel
    backends = manifest.get("backends")
    for backend, entries in (backends.items() if isinstance(backends, dict) else ()):
        if not isinstance(entries, dict):
            raise ArtifactError(f"manifest backends.{backend} must be an object of model -> file")
        for model, rel in entries.items():
            yield f"backends.{backend}.{model}", rel
    tokenizers = manifest.get("tokenizers")
    for which, rel in (tokenizers.items() if isinstance(tokenizers, dict) else ()):
        yield f"tokenizers.{which}", rel
    models = manifest.get("models")
    for name, m in (models.items() if isinstance(models, dict) else ()):
        if isinstance(m, dict):
            for key in ("file", "external_data"):
                if m.get(key) is not None:
                    yield f"models.{name}.{key}", m[key]


def _check_files(root: Path, manifest: dict) -> None:
    """Every listed file exists with the byte size the exporter recorded (catches partial copies)."""
    for rel, size in sorted(manifest.get("files", {}).items()):
        p = inside(root, rel, f"files[{rel!r}]")
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
    if isinstance(manifest, dict) and manifest.get("format") == FAMILY_FORMAT:
        raise ArtifactError(f"{root} is a {manifest.get('family', 'model family')} step artifact "
                            f"({FAMILY_FORMAT}), not a FLUX.1 artifact: only `deleaker generate --artifact` and "
                            f"`deleaker-export verify` run it (its DeLeaker steps in ONNX Runtime inside the family's "
                            f"own pipeline)")
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
        if not isinstance(manifest[key], dict):
            raise ArtifactError(f"{mpath}: the {key!r} section must be an object, got {type(manifest[key]).__name__}; "
                                f"{_fix(root)}")
    sizes = manifest["files"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes.values()):
        raise ArtifactError(f"{mpath}: files must map each path to its byte size; {_fix(root)}")
    op_version = manifest["deleaker"].get("op_version")
    if op_version != op_schema.ONNX_OPSET_VERSION:
        raise ArtifactError(f"artifact {root} holds {op_schema.OP_NAME} op version {op_version!r}, this deleaker "
                            f"runs version {op_schema.ONNX_OPSET_VERSION}: {_fix(root)}")
    for where, rel in _manifest_paths(manifest):
        inside(root, rel, where)
    _default_config(root, manifest)  # a bad default fails at load, not at the first request
    _model_fields(root, manifest)
    _size_range(root, manifest)
    for which in ("tokenizer", "tokenizer_2"):
        if which not in manifest["tokenizers"]:
            raise ArtifactError(f"{mpath}: tokenizers.{which} is missing; {_fix(root)}")
    if check_files:
        _check_files(root, manifest)
    return Artifact(root=root.resolve(), manifest=manifest)
