"""The same server as a Ray Serve application: replicas, autoscaling, drain on shutdown.

Each replica is one process holding one Pipeline (one GPU, or one CPU slot), the local server's
Batcher (batching, a queue bounded by --max-queue, drain) and the same FastAPI app as
`deleaker serve` (app.py); Ray Serve's proxy spreads requests over replicas and scales them
(autoscaling_config). On SIGTERM the driver drains first: a DrainBoard actor tells every replica
to refuse new work (JSON 503) and collects their load until all are idle, and only then does
serve.shutdown() stop the proxies, which would drop any request still open.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid

import ray
from ray import serve

from .batcher import Batcher
from .connections import LOOPBACK_HOSTS
from .options import ServeOptions

log = logging.getLogger("deleaker.serve")


DRAIN_BOARD = "deleaker-drain-board"  # named actor in RAY_NAMESPACE: the drain signal and each replica's load
RAY_NAMESPACE = "deleaker"
REPORT_EVERY_S = 0.2
QUIET_S = 1.0  # on shutdown: every replica idle this long (requests still in Ray's router would show)


@ray.remote(num_cpus=0)
class DrainBoard:
    """Where the driver tells every replica to drain and each replica reports its work in hand."""

    def __init__(self):
        self.draining = False
        self.busy: dict[str, int] = {}

    def drain(self) -> None:
        self.draining = True

    def report(self, replica: str, busy: int) -> bool:
        self.busy[replica] = busy
        return self.draining

    def state(self) -> tuple[bool, dict[str, int]]:
        return self.draining, dict(self.busy)


@serve.deployment
@serve.ingress()
class DeLeakerServe:
    """One replica: load the model, warm up, then serve the FastAPI app of app.py."""

    def __init__(self, args: dict, options: ServeOptions):
        from .app import create_app
        from .loading import api_token, load_pipeline
        from .engine import Engine

        logging.basicConfig(level=logging.INFO, format="deleaker: %(message)s")
        if args.get("ray_loopback"):
            _bind_replica_grpc_to_loopback()
        # the local server's batcher: same batching, queue bound (429 + Retry-After) and drain; its model
        # thread loads the model and runs all of its work (batcher.py)
        runner = Batcher(lambda: load_pipeline(argparse.Namespace(**args)), options.max_batch, options.max_wait_ms,
                         options.max_queue)
        self.engine = Engine(runner.pipe, options, runner.metrics, runner)
        self.engine.warm_up()  # the replica counts as started (and gets traffic) only after this
        self._app = create_app(self.engine, token=api_token())
        threading.Thread(target=self._report, name="deleaker-drain-watch", daemon=True).start()

    def _report(self) -> None:
        """Report this replica's work in hand to the drain board; start draining when it says so."""
        try:
            board = ray.get_actor(DRAIN_BOARD, namespace=RAY_NAMESPACE)
        except ValueError:  # deployed without `deleaker serve --ray` (e.g. a Serve config): Ray's own shutdown
            return
        me = uuid.uuid4().hex
        while True:
            try:
                draining = ray.get(board.report.remote(me, self.engine.busy), timeout=10)
            except Exception:  # the board is gone: the application is shutting down
                return
            if draining and not self.engine.draining:
                log.info("draining: finishing %d queued image(s) and the running batch", self.engine.runner.depth)
                self.engine.runner.begin_drain()
            time.sleep(REPORT_EVERY_S)

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.runner.begin_drain()
            engine.runner.wait_idle(10)
            engine.close()

    def __serve_build_asgi_app__(self):
        return self._app

    def check_health(self):
        if not self.engine.ready:
            raise RuntimeError("not warmed up")


def _bind_replica_grpc_to_loopback() -> None:
    """Ray Serve starts each replica's inter-deployment gRPC server on [::]:0 (all interfaces), with no
    option; on a loopback-only local Ray (node address 127.0.0.1) bind it to 127.0.0.1 instead.
    Runs in the replica's __init__, before Ray Serve starts that server."""
    from ray.serve._private import replica

    add = replica.add_port_to_grpc_server
    if getattr(add, "loopback", False):
        return

    def add_on_loopback(server, address: str):
        return add(server, address.replace("[::]", "127.0.0.1", 1))

    add_on_loopback.loopback = True
    replica.add_port_to_grpc_server = add_on_loopback


def _replicas(spec: str, max_batch: int) -> dict:
    """'N' -> fixed replicas; 'MIN-MAX' -> autoscaling on ongoing requests per replica."""
    try:
        if "-" in spec:
            lo, hi = (int(v) for v in spec.split("-", 1))
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError
            return {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                           "target_ongoing_requests": max_batch}}
        n = int(spec)
        if n < 1:
            raise ValueError
        return {"num_replicas": n}
    except ValueError:
        raise ValueError(f"--replicas must be N >= 1 or MIN-MAX, got {spec!r}") from None


def build_app(args: argparse.Namespace, options: ServeOptions):
    """The bound Ray Serve application (also usable from a Serve config file via an import path)."""
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (
        1.0 if str(args.device).startswith("cuda") else 0.0)
    actor = {"num_cpus": args.cpus_per_replica, "num_gpus": gpus}
    token = os.environ.get("DELEAKER_API_TOKEN")
    if token:
        actor["runtime_env"] = {"env_vars": {"DELEAKER_API_TOKEN": token}}
    deployment = DeLeakerServe.options(
        name="deleaker", ray_actor_options=actor,
        # overflow is answered by the replica's own queue (bounded by --max-queue: 429 + Retry-After in the
        # JSON error shape); Ray's router queue is left unbounded (-1) because its overflow answer is a
        # text/plain 503 that clients cannot parse; a request waits there only until a replica takes it
        max_ongoing_requests=options.max_queue + 2 * options.max_batch, max_queued_requests=-1,
        graceful_shutdown_timeout_s=options.drain_timeout_s, health_check_period_s=10,
        **_replicas(args.replicas, options.max_batch))
    keep = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    return deployment.bind(keep, options)


def _check_resources(args: argparse.Namespace) -> None:
    """Refuse in one line what Ray could never place (it would wait forever for the resources)."""
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (
        1.0 if str(args.device).startswith("cuda") else 0.0)
    have = ray.cluster_resources()
    spec = _replicas(args.replicas, 1)
    first = spec.get("num_replicas") or spec["autoscaling_config"]["initial_replicas"]
    if gpus > 0 and have.get("GPU", 0) < gpus * first:
        raise ValueError(f"{first} replica(s) of {gpus:g} GPU need {gpus * first:g} GPUs; this Ray cluster has "
                         f"{have.get('GPU', 0):g} (use --device cpu, or --gpus-per-replica, on a machine without GPUs)")
    if have.get("CPU", 0) < args.cpus_per_replica * first:
        raise ValueError(f"{first} replica(s) of {args.cpus_per_replica:g} CPU need {args.cpus_per_replica * first:g} "
                         f"CPU slots; this Ray cluster has {have.get('CPU', 0):g} (lower --cpus-per-replica)")


def _drain(board, timeout_s: float) -> None:
    """Tell every replica to drain (new requests get a JSON 503) and wait until all have been idle for
    QUIET_S, at most timeout_s; only then may Ray Serve stop the proxies (which drops open requests)."""
    ray.get(board.drain.remote())
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        time.sleep(REPORT_EVERY_S)
        _, busy = ray.get(board.state.remote())
        if any(busy.values()):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_S + REPORT_EVERY_S:
            return
    log.warning("drain timeout (%gs) passed with work left; stopping anyway", timeout_s)


def serve_ray(args: argparse.Namespace, options: ServeOptions) -> int:
    from .connections import bind

    # a local Ray for a loopback server listens on 127.0.0.1 only (the node address, the replicas' gRPC)
    args.ray_loopback = args.ray_address is None and not os.environ.get("RAY_ADDRESS") and args.host in LOOPBACK_HOSTS
    app = build_app(args, options)  # bad --replicas fails before Ray starts
    bind(args.host, args.port).close()  # a busy port fails here, in one line
    ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False,
             namespace=RAY_NAMESPACE, **({"_node_ip_address": "127.0.0.1"} if args.ray_loopback else {}))
    try:
        _check_resources(args)
    except ValueError:
        ray.shutdown()
        raise
    # ray.init installed its own SIGTERM handler (exit at once); from here on a signal starts the drain,
    # also while serve.run still waits for the last replicas (the first ones already take traffic)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    board = DrainBoard.options(name=DRAIN_BOARD, namespace=RAY_NAMESPACE, lifetime=None).remote()
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(app, name="deleaker", route_prefix="/")
    log.info("Ray Serve application running on http://%s:%d (replicas: %s)", args.host, args.port, args.replicas)
    stop.wait()
    log.info("shutting down: the replicas finish their queued and running work (up to %gs); new requests get 503",
             options.drain_timeout_s)
    _drain(board, options.drain_timeout_s)
    serve.shutdown()
    ray.shutdown()
    return 0
