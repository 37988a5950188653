"""deleaker's runtime: generate with DeLeaker from Python (docs/api.md).

    from deleaker.runtime import GenerateRequest, load_pipeline
    pipe = load_pipeline()                      # the embedded model; or load_pipeline("/path/FLUX.1-dev", device="cuda")
    result = pipe.generate(GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah")))
    result.image                                # [H, W, 3] uint8

Light at import time: numpy, tokenizers and PIL only; a backend's library (torch, onnxruntime,
tensorrt) is imported when that backend is loaded.
"""

from .backends import available_backends, load_backend
from .config import ConfigError, DeLeakerConfig, PRESETS, preset
from .pipeline import (GenerateRequest, GenerateResult, Pipeline, RequestError, RequestFailed, load_pipeline)

__all__ = [
    "ConfigError", "DeLeakerConfig", "GenerateRequest", "GenerateResult", "PRESETS", "Pipeline", "RequestError",
    "RequestFailed", "available_backends", "load_backend", "load_pipeline", "preset",
]
