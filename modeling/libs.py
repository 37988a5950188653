"""Quieting the libraries we drive: our own logs say what is loaded and exported."""

from __future__ import annotations

import logging


def quiet_libraries() -> None:
    """onnx_ir / onnxscript log every optimisation pass at INFO; diffusers and transformers warn
    about accelerate and draw weight-loading bars (their loggers are configured on import, so
    set them through their own APIs)."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dl
        from transformers.utils import logging as tl
    except ImportError:  # missing libraries fail later with a clear message
        return
    dl.set_verbosity_error()
    dl.disable_progress_bar()  # "Loading pipeline components" of a family folder
    tl.set_verbosity_error()
    tl.disable_progress_bar()
