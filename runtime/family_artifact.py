"""The step artifact of a model family other than FLUX.1 (SD3/3.5, Qwen-Image, FLUX.2): reading it.

Lean (json + pathlib), like runtime/artifact.py. `deleaker-export onnx --model FAMILYDIR` writes

    ARTIFACT/
      manifest.json      format FAMILY_FORMAT: the family, its transformer class, the source
                         folder (scheduler, tokenizers and the torch transformer stay there), the
                         static shapes the step was exported at (height, width, text tokens,
                         batch, entity slots), the default DeLeaker settings, the graph's
                         inputs and outputs, files with byte sizes, producer versions
      transformer.onnx   one denoising step with every joint attention a DeLeakerAttention node
      components/        the text encoder(s) and VAE decoder, components.json naming them (absent
                         with --step-only)

The DeLeaker steps, the text encoder(s) and the VAE decoder run from it (ONNX Runtime); the
family's own diffusers pipeline, loaded from the source folder without those components, drives
them (scheduler, tokenizers) and keeps its torch transformer for the calls without DeLeaker. The FLUX.1 artifact reader (runtime/artifact.py) refuses
this format in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .artifact import FAMILY_FORMAT, MANIFEST, ArtifactError, inside

FAMILY_FORMAT_VERSION = 1
STEP_FILE = "transformer.onnx"
COMPONENTS_DIR = "components"  # the text encoder(s) and VAE decoder (export/family_components.py)
# manifest keys every reader relies on, with their types
_FIELDS = {"family": str, "transformer_class": str, "source_model": str, "height": int, "width": int,
           "text_tokens": int, "batch": int, "entity_slots": int, "blocks_per_step": int, "steps": dict,
           "deleaker": dict, "inputs": dict, "files": dict}


def read_manifest(path: str | Path) -> dict | None:
    """The folder's manifest.json as a dict, or None when there is none readable (not an artifact)."""
    try:
        data = json.loads((Path(path).expanduser() / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_family_artifact(path: str | Path) -> bool:
    return (read_manifest(path) or {}).get("format") == FAMILY_FORMAT


@dataclass(frozen=True)
class FamilyArtifact:
    root: Path
    manifest: dict

    def __getattr__(self, name):  # the manifest's top-level fields as attributes (family, height, ...)
        try:
            return self.__dict__["manifest"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def step_path(self) -> Path:
        return inside(self.root, self.manifest["steps"]["onnxruntime"], "steps.onnxruntime")

    @property
    def components(self) -> tuple[Path, list[str]] | None:
        """(folder, the components ONNX Runtime runs from it), or None for a --step-only artifact."""
        c = self.manifest.get("components")
        if not c:
            return None
        return inside(self.root, c["folder"], "components.folder"), list(c["onnxruntime"])

    @property
    def source(self) -> Path:
        return Path(self.manifest["source_model"])

    def check_source(self) -> Path:
        """The recorded source folder, refused in one line when it is gone (the pipeline loads from it)."""
        src = self.source
        if not (src / "model_index.json").is_file():
            raise ArtifactError(f"artifact {self.root} runs on its source folder {src} (text encoders, VAE, "
                                f"scheduler), which is missing or has no model_index.json; restore it there or "
                                f"re-export with `deleaker-export onnx --model FOLDER --out {self.root} --force`")
        return src

    def check_size(self, height: int, width: int) -> None:
        if (height, width) != (self.height, self.width):
            raise ArtifactError(f"artifact {self.root} was exported for {self.height}x{self.width} images (static "
                                f"shapes), not {height}x{width}; export another with --height {height} --width "
                                f"{width}")


def load_family_artifact(path: str | Path, check_files: bool = True) -> FamilyArtifact:
    root = Path(path).expanduser()
    fix = f"re-export it with `deleaker-export onnx --model FAMILYDIR --out {root} --force`"
    m = read_manifest(root)
    if m is None:
        raise ArtifactError(f"{root} is not a deleaker artifact (no readable {MANIFEST})")
    if m.get("format") != FAMILY_FORMAT:
        raise ArtifactError(f"{root} is not a model-family step artifact (format {m.get('format')!r})")
    if m.get("format_version") != FAMILY_FORMAT_VERSION:
        raise ArtifactError(f"artifact {root} has family-step format version {m.get('format_version')!r}, this "
                            f"deleaker reads {FAMILY_FORMAT_VERSION}; {fix}")
    for key, kind in _FIELDS.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise ArtifactError(f"{root / MANIFEST}: {key} is missing or not a {kind.__name__}; {fix}")
    for rel in m["files"]:
        inside(root, rel, f"files[{rel!r}]")
    art = FamilyArtifact(root=root.resolve(), manifest=m)
    step = art.step_path
    if check_files:
        for rel, size in m["files"].items():
            p = root / rel
            if not p.is_file() or p.stat().st_size != size:
                raise ArtifactError(f"artifact file {p} is missing or not the {size} bytes {MANIFEST} records "
                                    f"(a partial copy?); copy it again or {fix}")
        if not step.is_file():
            raise ArtifactError(f"artifact {root} lacks its step {step.name}; {fix}")
    return art
