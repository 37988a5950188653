"""Load generator for `deleaker serve` (`deleaker-bench --mode serve`): latency percentiles,
throughput and errors of a running server.

    # closed loop: 16 clients, each sends its next request when the previous one is answered
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200 --concurrency 16
    # open loop: requests arrive at 4/s (Poisson) whatever the server does
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200 --rate 4

    # server vs the Pipeline in this process on the same batches (read from the server's /metrics)
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200 --concurrency 16 --compare

Writes one JSON line per request (--out FILE, or nothing) and prints a JSON summary line:
requests, ok, errors by status, latency p50/p95/p99 (seconds, successful requests), throughput
(images/s over the whole run). Bounded by --requests and --max-seconds (whichever comes first).
--deleaker-settings JSON gives every request DeLeaker settings (e.g. windows inside a short run).
--compare adds the batch sizes the server ran (from /metrics) and `inprocess_images_per_s`: the same
number of batches of each size, same requests, through Pipeline.generate here (--model, default
the embedded default model), and `server_vs_inprocess`, the ratio of the two rates.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from deleaker.runtime.serve.client import request_body


@dataclass
class Sample:
    index: int
    start_s: float  # since the run began
    latency_s: float
    status: int  # HTTP status; 0: no answer (connection error / client timeout)
    images: int
    error: str | None = None


@dataclass(frozen=True)
class LoadSpec:
    url: str = "http://127.0.0.1:8000"
    requests: int = 100
    concurrency: int | None = 8  # closed loop (None with rate)
    rate: float | None = None  # open loop: mean requests per second (Poisson arrivals)
    max_seconds: float = 300.0
    prompt: str = "a cat and a dog in a field"
    entities: tuple[str, ...] = ("cat", "dog")
    size: str | None = None
    steps: int | None = None
    n: int = 1
    seed: int = 0  # request i uses seed + i * n
    token: str | None = None
    client_timeout_s: float = 600.0
    deleaker_settings: dict | None = None

    def validate(self) -> "LoadSpec":
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) and --rate (open loop)")
        if self.requests < 1 or self.max_seconds <= 0:
            raise ValueError("--requests must be >= 1 and --max-seconds > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be > 0, got {self.rate}")
        return self


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s for s in ok]
    errors: dict[str, int] = {}
    for s in samples:
        if s.status != 200:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    return {"requests": len(samples), "ok": len(ok), "errors": errors,
            "server_errors": sum(1 for s in samples if s.status >= 500),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
            "mean_s": float(np.mean(lat)) if lat else None, "wall_s": wall_s,
            "images_per_s": sum(s.images for s in ok) / wall_s if wall_s > 0 else None,
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None}


async def _one(http: httpx.AsyncClient, spec: LoadSpec, i: int, t0: float) -> Sample:
    body = request_body(spec.prompt, n=spec.n, size=spec.size, seed=spec.seed + i * spec.n,
                        entities=spec.entities, steps=spec.steps, deleaker_settings=spec.deleaker_settings)
    start = time.perf_counter()
    try:
        r = await http.post("/v1/images/generations", json=body)
        status, images = r.status_code, (len(r.json()["data"]) if r.status_code == 200 else 0)
        error = None if status == 200 else r.text[:300]
    except httpx.HTTPError as e:
        status, images, error = 0, 0, f"{type(e).__name__}: {e}"
    return Sample(i, start - t0, time.perf_counter() - start, status, images, error)


async def run_load(spec: LoadSpec, on_sample=None) -> tuple[list[Sample], dict]:
    """Run the load; on_sample(sample) is called as each answer arrives. Returns (samples, summary)."""
    spec.validate()
    headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
    n_conn = spec.concurrency or 256
    limits = httpx.Limits(max_connections=n_conn, max_keepalive_connections=n_conn)
    samples: list[Sample] = []
    t0 = time.perf_counter()
    deadline = t0 + spec.max_seconds

    def record(s: Sample):
        samples.append(s)
        if on_sample is not None:
            on_sample(s)

    async with httpx.AsyncClient(base_url=spec.url, headers=headers, limits=limits,
                                 timeout=spec.client_timeout_s) as http:
        if spec.concurrency is not None:
            counter = iter(range(spec.requests))

            async def worker():
                for i in counter:  # shared iterator: each index is taken once
                    if time.perf_counter() > deadline:
                        return
                    record(await _one(http, spec, i, t0))

            await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        else:
            rng = random.Random(spec.seed)
            tasks = []
            next_at = t0
            for i in range(spec.requests):
                next_at += rng.expovariate(spec.rate)
                if next_at > deadline:
                    break
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(_one(http, spec, i, t0)))
                tasks[-1].add_done_callback(lambda t: record(t.result()))
            left = max(0.0, deadline - time.perf_counter())
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=left)
                for t in pending:
                    t.cancel()
    wall = time.perf_counter() - t0
    samples.sort(key=lambda s: s.index)
    return samples, summarize(samples, wall)


def batch_counts(metrics_before: str, metrics_after: str) -> dict[int, int]:
    """Batches the server ran between two /metrics pages, by size (from deleaker_batch_size_bucket)."""
    def cumulative(text: str) -> dict[int, float]:
        out = {}
        for line in text.splitlines():
            if line.startswith("deleaker_batch_size_bucket{") and 'le="+Inf"' not in line:
                le = float(line.split('le="', 1)[1].split('"', 1)[0])
                out[int(le)] = float(line.split()[-1])
        return out

    before, after = cumulative(metrics_before), cumulative(metrics_after)
    counts, below = {}, 0.0
    for size in sorted(after):
        total = after[size] - before.get(size, 0.0)
        if total - below > 0:
            counts[size] = int(round(total - below))
        below = total
    return counts


def inprocess_rate(spec: LoadSpec, counts: dict[int, int], model: str | None) -> float:
    """Images/s of Pipeline.generate here on the same batches (sizes and counts) and the same requests."""
    from deleaker.runtime import GenerateRequest, load_pipeline
    from deleaker.runtime.model_card import default_size
    from deleaker.runtime.serve.schema import parse_size

    pipe = load_pipeline(model, progress=False)
    if spec.size:
        w, h = parse_size(spec.size)
    else:  # the server's default: the model card's size, else DEFAULT_SIDE square
        h, w = default_size(pipe.backend.info.card)
    config = pipe.config.replace(**spec.deleaker_settings) if spec.deleaker_settings else None
    steps = spec.steps if spec.steps is not None else pipe.config.num_steps

    def batch(k: int, seed: int) -> list:
        return [GenerateRequest(spec.prompt, entities=spec.entities, seed=seed + j, steps=steps, height=h, width=w,
                                config=config) for j in range(k)]

    pipe.generate(batch(max(counts), 0), progress=None)  # warm-up, as the server's
    images, t0, seed = 0, time.perf_counter(), 0
    for k, n in counts.items():
        for _ in range(n):
            pipe.generate(batch(k, seed), progress=None)
            images, seed = images + k, seed + k
    return images / (time.perf_counter() - t0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker-bench --mode serve", description=__doc__.split("\n")[0])
    d = LoadSpec()
    p.add_argument("--url", default=d.url)
    p.add_argument("--requests", type=int, default=d.requests, help="how many requests to send (at most)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, help="closed loop: this many clients in parallel (default 8)")
    loop.add_argument("--rate", type=float, help="open loop: mean arrivals per second (Poisson)")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="stop sending after this long")
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--entities", default=",".join(d.entities), help="comma-separated entity words")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the server's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the server's)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deleaker-settings", type=json.loads, help="JSON object of DeLeaker settings for every request")
    p.add_argument("--token", help="bearer token (default: DELEAKER_API_TOKEN)")
    p.add_argument("--compare", action="store_true",
                   help="also time the server's batches through the Pipeline in this process")
    p.add_argument("--model", help="with --compare: the model folder the server runs (default: the embedded "
                                   "toy-world model, which `deleaker serve` runs without --model)")
    p.add_argument("--out", help="write one JSON line per request here")
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from deleaker.runtime.errors import run_reporting_errors

    args = _parser().parse_args(argv)

    def go() -> int:
        entities = tuple(e.strip() for e in args.entities.split(",") if e.strip())
        spec = LoadSpec(url=args.url, requests=args.requests,
                        concurrency=args.concurrency if args.rate is None else None,
                        rate=args.rate, max_seconds=args.max_seconds, prompt=args.prompt, entities=entities,
                        size=args.size, steps=args.steps, n=args.n, seed=args.seed,
                        token=args.token or os.environ.get("DELEAKER_API_TOKEN"),
                        deleaker_settings=args.deleaker_settings)
        if spec.concurrency is None and spec.rate is None:
            spec = LoadSpec(**{**asdict(spec), "concurrency": 8})
        out = open(args.out, "w") if args.out else None  # noqa: SIM115  (closed below)
        try:
            def write(s: Sample):
                if out is not None:
                    out.write(json.dumps(asdict(s)) + "\n")

            headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
            metrics = (lambda: httpx.get(spec.url + "/metrics", headers=headers, timeout=30).text)  # noqa: E731
            before = metrics() if args.compare else ""
            _, summary = asyncio.run(run_load(spec, write))
            if args.compare:
                counts = batch_counts(before, metrics())
                summary["batches"] = {str(k): v for k, v in counts.items()}
                if counts:
                    rate = inprocess_rate(spec, counts, args.model)
                    summary["inprocess_images_per_s"] = rate
                    summary["server_vs_inprocess"] = summary["images_per_s"] / rate
        finally:
            if out is not None:
                out.close()
        print(json.dumps({"summary": summary}))
        if args.out:
            print(f"wrote {Path(args.out)}", file=sys.stderr)
        return 0 if summary["server_errors"] == 0 and summary["ok"] > 0 else 1

    return run_reporting_errors("deleaker-bench", go)


if __name__ == "__main__":
    sys.exit(main())
