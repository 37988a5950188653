"""Backend lookup. Backends register under the `deleaker.backends` entry-point group
(pyproject.toml), so the runtime never imports a backend library (torch, onnxruntime, tensorrt)
until one is asked for."""

from __future__ import annotations

from importlib.metadata import entry_points

from .base import Backend, ModelInfo

__all__ = ["Backend", "ModelInfo", "available_backends", "load_backend"]

GROUP = "deleaker.backends"


class BackendError(ValueError):
    """A backend is unknown or cannot be loaded here."""


def available_backends() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=GROUP))


def backend_class(name: str):
    eps = {ep.name: ep for ep in entry_points(group=GROUP)}
    if name not in eps:
        raise BackendError(f"unknown backend {name!r}; available: {', '.join(sorted(eps)) or 'none installed'}")
    try:
        return eps[name].load()
    except ImportError as e:
        raise BackendError(f"backend {name!r} needs a library that is not installed here ({e}); "
                           f"install the matching extra, e.g. pip install 'deleaker[{name}]'") from e


def load_backend(name: str, source: str | None = None, **options) -> Backend:
    """Instantiate backend `name` on `source` (a model folder or artifact; None: its default)."""
    return backend_class(name).load(source, **options)
