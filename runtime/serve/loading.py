"""What a server process loads, shared by the local server (cli.py) and each Ray replica
(ray_app.py): the Pipeline the command-line arguments name, and the API token from the environment."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from ..config import preset
from ..embedded import default_source

log = logging.getLogger("deleaker.serve")


def load_pipeline(args):
    """The backend and Pipeline the arguments name (shared by the local server and each Ray replica)."""
    from ..backends import backend_class, load_backend
    from ..backends.options import load_options
    from ..pipeline import Pipeline

    cfg = preset(args.preset) if args.preset else None
    if args.model is None and not args.artifact:  # the embedded model: its artifact, or its folder for torch
        args.backend, args.model, args.artifact = default_source(args.backend)
    backend_name = args.backend or ("onnxruntime" if args.artifact else "torch")
    options = load_options(backend_class(backend_name), args, device=args.device, progress=False)
    where = args.artifact or args.model
    if where is None:
        from ..embedded import default_model_dir

        where_said = f"{default_model_dir().name}, the embedded default,"
    else:
        where_said = Path(where).name or where
    t0 = time.perf_counter()
    log.info("loading model %s (%s backend, %s)", where_said, backend_name, args.device)
    backend = load_backend(backend_name, where, **options)
    t1 = time.perf_counter()
    log.info("model loaded in %.1fs; preparing sessions (tokenizers, scheduler, batches of up to %d images)",
             t1 - t0, args.max_batch)
    pipe = Pipeline(backend, config=cfg, max_batch=args.max_batch)
    log.info("sessions prepared in %.1fs", time.perf_counter() - t1)
    return pipe


def api_token() -> str | None:
    token = os.environ.get("DELEAKER_API_TOKEN") or None
    if token is not None and len(token) < 16:
        raise ValueError("DELEAKER_API_TOKEN is set but shorter than 16 characters; use a long random token")
    return token
