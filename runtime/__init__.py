"""deleaker's runtime: generate with DeLeaker from Python (docs/api.md).

    from deleaker.runtime import GenerateRequest, load_pipeline
    pipe = load_pipeline()                      # the embedded model; or load_pipeline("/path/FLUX.1-dev", device="cuda")
    result = pipe.generate(GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah")))
    result.image                                # [H, W, 3] uint8

The names below are imported on first use, so `import deleaker.runtime` stays light; a backend's
library (torch, onnxruntime, tensorrt) is imported only when that backend is loaded.
"""

import importlib

_EXPORTS = {
    "available_backends": "backends", "load_backend": "backends",
    "ConfigError": "config", "DeLeakerConfig": "config", "PRESETS": "config", "preset": "config",
    "GenerateRequest": "pipeline", "GenerateResult": "pipeline", "Pipeline": "pipeline", "RequestError": "pipeline",
    "RequestFailed": "pipeline", "load_pipeline": "pipeline",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deleaker.runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
