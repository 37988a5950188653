"""Backend lookup. Backends register under the `deleaker.backends` entry-point group
(pyproject.toml), so the runtime never imports a backend library (torch, onnxruntime, tensorrt)
until one is asked for. The built-in ones are also listed here by module path, so a source
checkout on PYTHONPATH (no pip install, no entry points) finds them too."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from .base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo", "available_backends", "load_backend"]

GROUP = "deleaker.backends"
# name -> "module:attribute", imported only when that backend is asked for
BUILTIN = {
    "aoti": "deleaker.runtime.backends.aoti_backend:AotiBackend",
    "torch": "deleaker.export.torch_backend:TorchBackend",
    "onnxruntime": "deleaker.runtime.backends.onnxruntime_backend:OnnxRuntimeBackend",
    "tensorrt": "deleaker.runtime.backends.tensorrt_backend:TensorRTBackend",
}


class BackendError(ValueError):
    """A backend is unknown or cannot be loaded here."""


def _registered() -> dict[str, str]:
    found = dict(BUILTIN)
    found.update({ep.name: ep.value for ep in entry_points(group=GROUP)})
    return found


def available_backends() -> list[str]:
    return sorted(_registered())


def backend_class(name: str):
    registered = _registered()
    if name not in registered:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(sorted(registered))}")
    module, _, attr = registered[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise BackendError(f"backend {name!r} needs a library that is not installed here ({e}); "
                           f"install the matching extra, e.g. pip install 'deleaker[{name}]'") from e


def load_backend(name: str, source: str | None = None, **options) -> Backend:
    """Instantiate backend `name` on `source` (a model folder or artifact; None: its default)."""
    return backend_class(name).load(source, **options)
