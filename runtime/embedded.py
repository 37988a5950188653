"""The model that ships inside the package and runs when no --model or --artifact is given: the toy-world model.

It was trained on CPU in 35 minutes (toyworld/train.py) to draw a world of coloured,
textured shapes from captions such as "a red striped circle and a blue dotted square"; its
vanilla images copy attributes from the other named object, and DeLeaker removes part of that
(docs/toyworld.md). Its card (deleaker.json) gives the preset, the 32x32 size and its words.

It ships twice: as its diffusers folder (`models/toyworld`, what the torch backend and the
exporter read) and as the `deleaker-export onnx --portable` artifact of that folder
(`models/toyworld-onnx`, with the same card), which is what runs by default: ONNX Runtime and
numpy only, no torch, no diffusers. `make toyworld-artifact` rebuilds the artifact from the folder.
The random-weight tiny model (built by the torch side, for tests) is not here.
"""

from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = "toyworld"
DEFAULT_ARTIFACT = "toyworld-onnx"
DEFAULT_BACKEND = "onnxruntime"  # what runs the default when no backend is named
# backends that run a diffusers folder rather than an artifact: given one of these and no source,
# the default is the diffusers folder (`--backend torch` is the torch path of the same model)
FOLDER_BACKENDS = ("torch",)


def default_model_dir() -> Path:
    """The folder of the embedded default model (diffusers layout, with its card)."""
    return MODELS_DIR / DEFAULT_MODEL


def default_artifact_dir() -> Path:
    """The embedded default model exported by `deleaker-export onnx --portable` (manifest, ONNX files, card)."""
    return MODELS_DIR / DEFAULT_ARTIFACT


def default_source(backend: str | None = None) -> tuple[str, str | None, str | None]:
    """(backend, model, artifact) to load when neither a model nor an artifact was given: the shipped
    artifact on `backend` (default onnxruntime), or the diffusers folder for a backend that runs one."""
    backend = backend or DEFAULT_BACKEND
    if backend in FOLDER_BACKENDS:
        return backend, str(default_model_dir()), None
    return backend, None, str(default_artifact_dir())
