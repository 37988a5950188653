"""Backend lookup. Backends register under the `deleaker.backends` entry-point group
(pyproject.toml), so the runtime never imports a backend library (torch, onnxruntime, tensorrt)
or the torch side (modeling/) until one is asked for, and names no module outside
itself: the torch and aoti backends live in modeling/ and arrive through their entry
points like any third-party backend."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from ..allocator import tune_host_allocator
from .base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo", "available_backends", "backend_class", "load_backend"]

GROUP = "deleaker.backends"


class BackendError(ValueError):
    """A backend is unknown or cannot be loaded here."""


def _registered() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


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
    cls = backend_class(name)
    tune_host_allocator()  # before the model's buffers exist (allocator.py says why)
    return cls.load(source, **options)
