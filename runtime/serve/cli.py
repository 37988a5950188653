"""`deleaker serve`: the HTTP server (one process, dynamic batching) or, with --ray, a Ray Serve application.

    deleaker serve --model /models/FLUX.1-dev --device cuda --port 8000
    deleaker serve --artifact art/ --max-batch 8 --max-wait-ms 20
    deleaker serve --model /models/FLUX.1-dev --device cuda --ray --replicas 4

API, options and limits: docs/serving.md. Binds 127.0.0.1 unless --host says otherwise; set
DELEAKER_API_TOKEN to require `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading

from ..backends.options import add_backend_flags
from ..config import PRESETS
from ..errors import run_reporting_errors
from ..cli_help import DefaultsHelpFormatter
from .loading import load_pipeline, api_token
from .logs import LOG_FORMATS, configure
from .options import HTTP_PARSERS, RAY_HTTP_ERROR, ServeOptions

log = logging.getLogger("deleaker.serve")

_D = ServeOptions()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker serve", description=__doc__.split("\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="diffusers-format FLUX folder (torch backend); default: the embedded toy-world "
                     "model (32x32, its own words only: docs/toyworld.md), as its exported artifact on onnxruntime")
    src.add_argument("--artifact", help="folder written by `deleaker-export onnx` (onnxruntime backend)")
    p.add_argument("--backend", help="torch (default with --model; without --model or --artifact: the embedded "
                                     "model's diffusers folder), onnxruntime (default with --artifact or neither), "
                                     "openvino (a --portable artifact)")
    p.add_argument("--device", default="cpu", help="torch/onnxruntime device: cpu or cuda")
    add_backend_flags(p)  # --attention, --dtype, ...: what the backends declare (backends/options.py)
    p.add_argument("--preset", help=f"DeLeaker settings of requests that give none: {', '.join(PRESETS)} "
                                    "(default: the artifact's recorded settings, else flux-dev)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on, 1-65535")
    g = p.add_argument_group("batching and queueing")
    g.add_argument("--max-batch", type=int, default=_D.max_batch, help="images per batch")
    g.add_argument("--max-wait-ms", type=float, default=_D.max_wait_ms,
                   help="how long the oldest queued image waits for others of its size and steps")
    g.add_argument("--max-queue", type=int, default=_D.max_queue, help="queued images past which requests get 429")
    g.add_argument("--timeout-s", type=float, default=_D.timeout_s, help="per-request limit (queue + generation): 504")
    g.add_argument("--drain-timeout-s", type=float, default=_D.drain_timeout_s,
                   help="on SIGTERM/SIGINT: how long accepted work may take to finish")
    c = p.add_argument_group("connections")
    c.add_argument("--read-timeout-s", type=float, default=_D.read_timeout_s,
                   help="a request's headers, then its body, must each arrive within this (else closed / 408)")
    c.add_argument("--keep-alive-s", type=float, default=_D.keep_alive_s,
                   help="idle keep-alive connections are closed after this")
    c.add_argument("--max-connections", type=int, default=_D.max_connections,
                   help="open connections past this are closed at once")
    c.add_argument("--http", default=_D.http, choices=HTTP_PARSERS,
                   help="HTTP/1.1 parser of the local server: auto takes httptools (C) when installed, else h11 "
                        "(pure Python)")
    lim = p.add_argument_group("request limits")
    lim.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes, help="request body limit (413)")
    lim.add_argument("--max-prompt-chars", type=int, default=_D.max_prompt_chars, help="prompt length limit")
    lim.add_argument("--max-n", type=int, default=_D.max_n, help="images per request")
    lim.add_argument("--max-steps", type=int, default=_D.max_steps, help="largest step count a request may ask")
    lim.add_argument("--steps", type=int, dest="default_steps", help="steps of requests that give none "
                                                                      "(default: the preset's, capped by --max-steps)")
    lim.add_argument("--min-size", type=int, default=_D.min_size,
                     help="smallest image side (pixels) a request may ask (default: the model's own rule)")
    lim.add_argument("--max-size", type=int, default=_D.max_size,
                     help="largest image side a request may ask (default: the model's own rule and the memory free)")
    lim.add_argument("--default-size", default=_D.default_size, help="WIDTHxHEIGHT of requests that give none "
                     "(default: the model card's size, e.g. 32x32 for the embedded model; else 256x256)")
    r = p.add_argument_group("Ray Serve (scale-out)")
    r.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve application (in a clone: pip install -e '.[ray]')")
    r.add_argument("--replicas", default="1",
                   help="replicas: N, or MIN-MAX for Ray Serve autoscaling on ongoing requests")
    r.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs reserved per replica (default: 1 with --device cuda, else 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPU slots Ray reserves per replica")
    r.add_argument("--ray-address", default=None, help="connect to this Ray cluster (default: RAY_ADDRESS or local)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text: `deleaker: message` lines; json: one JSON object per line (access lines carry "
                        "method, path, status, ms, images, id as fields)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on startup errors")
    return p


def options_from(args) -> ServeOptions:
    names = {f.name for f in dataclasses.fields(ServeOptions)}
    return ServeOptions(**{k: v for k, v in vars(args).items() if k in names}).validate()


def build_local(args, options: ServeOptions):
    """Engine (with its batcher) and FastAPI app for one process; warm-up runs when the app starts."""
    from contextlib import asynccontextmanager

    from .app import create_app
    from .batcher import Batcher
    from .engine import Engine

    # the batcher's model thread loads the model and runs all of its work (batcher.py)
    runner = Batcher(lambda: load_pipeline(args), options.max_batch, options.max_wait_ms, options.max_queue)
    engine = Engine(runner.pipe, options, runner.metrics, runner)
    engine.url = f"http://{args.host}:{args.port}"  # for the "ready" line

    @asynccontextmanager
    async def lifespan(_app):
        threading.Thread(target=engine.warm_up, name="deleaker-warm-up", daemon=True).start()
        yield
        engine.close()

    return engine, create_app(engine, token=api_token(), lifespan=lifespan)


def _serve_local(args, options: ServeOptions) -> int:
    import uvicorn

    from .connections import LOOPBACK_HOSTS, bind, uvicorn_limits

    sock = bind(args.host, args.port)  # a busy port or a bad host fails here, before the model loads
    limits = uvicorn_limits(options)  # likewise a missing httptools
    engine, app = build_local(args, options)

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: refuse new work (503), finish what was accepted, then stop.
        A second one stops at once (uvicorn's own handling)."""

        def handle_exit(self, sig, frame):
            if engine.draining:
                return super().handle_exit(sig, frame)
            log.info("shutting down: finishing %d queued image(s) and the running batch; new requests get 503",
                     engine.runner.depth)
            engine.runner.begin_drain()

            def finish():
                if not engine.runner.wait_idle(options.drain_timeout_s):
                    log.warning("drain timeout (%gs) passed with work left; stopping anyway", options.drain_timeout_s)
                self.should_exit = True

            threading.Thread(target=finish, name="deleaker-drain", daemon=True).start()

    if args.host not in LOOPBACK_HOSTS and api_token() is None:
        log.warning("binding %s without DELEAKER_API_TOKEN: anyone who reaches this port can generate", args.host)
    # log_config=None: uvicorn's own lines go through this process's format (--log-format); its
    # access log is off, the guard writes one line per request itself (logs.py)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            log_config=None, timeout_graceful_shutdown=options.drain_timeout_s + 5, **limits)
    server = DrainingServer(config)
    log.info("serving %s on http://%s:%d (max batch %d, max wait %gms, queue %d, %s)", engine.model_id,
             args.host, args.port, engine.runner.max_batch, options.max_wait_ms, options.max_queue,
             limits["http"].parser)
    server.run(sockets=[sock])
    return 0


def _serve(args) -> int:
    from .connections import LOOPBACK_HOSTS, check_port

    options = options_from(args)
    check_port(args.port)
    api_token()  # a bad token fails before the model loads
    if args.ray:
        if options.http != "auto":
            raise ValueError(RAY_HTTP_ERROR)
        if args.ray_address is None and not os.environ.get("RAY_ADDRESS") and args.host in LOOPBACK_HOSTS:
            # a local Ray for a loopback server: Ray takes 127.0.0.1 as the node address only with this set
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from .ray_app import serve_ray

        return serve_ray(args, options)
    return _serve_local(args, options)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure(args.log_level, args.log_format)
    return run_reporting_errors("deleaker serve", lambda: _serve(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
