"""Load generator for `deleaker serve` (`deleaker-bench --mode serve`): latency percentiles,
throughput and errors of a running server.

    # closed loop: 16 clients, each sends its next request when the previous one is answered
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200 --concurrency 16
    # open loop: requests arrive at 4/s (Poisson) whatever the server does
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 200 --rate 4

    # server vs the Pipeline in this process on the same batches (read from the server's /metrics),
    # in 8 rounds of 80 requests, each round's load followed by its in-process pass
    python -m deleaker.benchmarks.serve_load --url http://127.0.0.1:8000 --requests 80 --rounds 8 --concurrency 16 --compare

Writes one JSON line per request (--out FILE, or nothing) and prints a JSON summary line:
requests, ok, errors by status, latency p50/p95/p99 (seconds, successful requests), throughput
(images/s over the time the load ran). Each round is bounded by --requests and --max-seconds
(whichever comes first). --deleaker-settings JSON gives every request DeLeaker settings (e.g.
windows inside a short run).
--compare: after each round's load, the same number of batches of each size that the server ran
in that round (from /metrics), same requests, through Pipeline.generate here (--model, default the
embedded default model; loaded once, each batch size warmed up once before it is timed). The
summary gives per round the server's and the in-process rate and their ratio, and over all rounds
`server_vs_inprocess` (the median of the rounds' ratios), its range, and
`server_vs_inprocess_pooled` (all server images over all load time, against the same for the
in-process passes). Pairing each round with its own in-process pass keeps slow drift of the machine
out of the ratio; differences between processes need several process pairs (serve_compare.py). `inprocess_edited` counts
the in-process images whose DeLeaker history is nonzero: proof that the timed work ran the op.
Each round then times the same batches once more with every image encoded to PNG in a thread pool
while the next batch runs, as the server encodes its answers (`inprocess_png_images_per_s`,
`server_vs_inprocess_png`): both sides then encode, so what that ratio lacks of 1 is the cost of
HTTP serving alone. --device: the device of the in-process passes (the server's).
`client_cpu_s` per round: the load generator's CPU time during the load (on a machine it shares with
the server, the load generator's cost is taken from the server).
--client hey (closed loop only): the load comes from hey (Debian's load generator, written in Go) in a
child process instead of aiohttp here; it takes less CPU per request. hey sends the same body every
time (one seed per load), does not read the answers (a 200 counts n images) and leaves the requests
that got no answer out of its output (counted here as status 0); --max-seconds bounds the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import csv
import io
import json
import math
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from deleaker.runtime.serve.client import GENERATE_PATH, request_body


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLIENTS = ("aiohttp", "hey")  # the load generator: aiohttp in this process, or the hey command


@dataclass
class Sample:
    index: int
    start_s: float  # since the run began
    latency_s: float
    status: int  # HTTP status; 0: no answer (connection error / client timeout)
    images: int
    error: str | None = None
    round: int = 0


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
    client: str = "aiohttp"  # CLIENTS

    def validate(self) -> "LoadSpec":
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of --concurrency (closed loop) and --rate (open loop)")
        if self.requests < 1 or self.max_seconds <= 0:
            raise ValueError("--requests must be >= 1 and --max-seconds > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be > 0, got {self.rate}")
        if self.client not in CLIENTS:
            raise ValueError(f"--client must be one of {', '.join(CLIENTS)}, got {self.client!r}")
        if self.client == "hey":
            if self.concurrency is None:
                raise ValueError("--client hey runs a closed loop: give --concurrency, not --rate")
            if self.requests < self.concurrency:
                raise ValueError(f"--client hey sends at least one request per client: --requests {self.requests} "
                                 f"is below --concurrency {self.concurrency}")
            if shutil.which("hey") is None:
                raise ValueError("--client hey: the hey command is not installed (Debian package hey)")
        return self


def error_message(text: str) -> str:
    """The server's one-line error message (the OpenAI error body), else the answer's start."""
    try:
        return str(json.loads(text)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return text[:300]


def server_example(url: str, headers: dict) -> tuple[str, tuple[str, ...]] | None:
    """The served model's example prompt and entities (its card, from /health); None: it has none."""
    try:
        ex = httpx.get(url + "/health", headers=headers, timeout=30).json().get("example")
    except (httpx.HTTPError, ValueError) as e:
        raise ValueError(f"cannot read {url}/health for the served model's example prompt ({e}); give --prompt") \
            from None
    return (ex["prompt"], tuple(ex.get("entities", ()))) if ex else None


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s for s in ok]
    errors: dict[str, int] = {}
    for s in samples:
        if s.status != 200:
            errors[str(s.status)] = errors.get(str(s.status), 0) + 1
    first = next((s for s in samples if s.status != 200), None)
    return {"requests": len(samples), "ok": len(ok), "errors": errors,
            # the first failure's own words: "errors": {"400": 12} alone does not say what was wrong
            "first_error": None if first is None else {"status": first.status, "message": first.error},
            "server_errors": sum(1 for s in samples if s.status >= 500),
            "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95), "p99_s": percentile(lat, 99),
            "mean_s": float(np.mean(lat)) if lat else None, "wall_s": wall_s,
            "images_per_s": sum(s.images for s in ok) / wall_s if wall_s > 0 else None,
            "requests_per_s": len(ok) / wall_s if wall_s > 0 else None}


async def _one(http: aiohttp.ClientSession, spec: LoadSpec, i: int, t0: float, round_: int) -> Sample:
    body = request_body(spec.prompt, n=spec.n, size=spec.size, seed=spec.seed + i * spec.n,
                        entities=spec.entities, steps=spec.steps, deleaker_settings=spec.deleaker_settings)
    start = time.perf_counter()
    try:
        async with http.post(GENERATE_PATH, json=body) as r:
            status = r.status
            if status == 200:
                images, error = len((await r.json())["data"]), None
            else:
                images, error = 0, error_message(await r.text())
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        status, images, error = 0, 0, f"{type(e).__name__}: {e}"
    return Sample(i, start - t0, time.perf_counter() - start, status, images, error, round_)


def run_hey(spec: LoadSpec, round_: int = 0) -> tuple[list[Sample], float]:
    """The closed-loop load from the hey command; returns (samples in start order, wall seconds from
    the first request's start to the last answer). Every request is round r's first body."""
    body = request_body(spec.prompt, n=spec.n, size=spec.size, seed=spec.seed + round_ * spec.requests * spec.n,
                        entities=spec.entities, steps=spec.steps, deleaker_settings=spec.deleaker_settings)
    with tempfile.TemporaryDirectory(prefix="deleaker-hey-") as tmp:
        path = Path(tmp) / "body.json"
        path.write_text(json.dumps(body))
        cmd = ["hey", "-n", str(spec.requests), "-c", str(spec.concurrency), "-m", "POST", "-T", "application/json",
               "-D", str(path), "-t", str(math.ceil(spec.client_timeout_s)), "-o", "csv"]
        if spec.token:
            cmd += ["-H", f"Authorization: Bearer {spec.token}"]
        try:
            done = subprocess.run([*cmd, spec.url.rstrip("/") + GENERATE_PATH], capture_output=True, text=True,
                                  timeout=spec.max_seconds)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"hey did not finish within --max-seconds {spec.max_seconds:g}") from None
    if done.returncode != 0:
        raise RuntimeError(f"hey failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}")
    # columns: response-time, DNS+dialup, DNS, Request-write, Response-delay, Response-read, status-code, offset
    rows = sorted(csv.DictReader(io.StringIO(done.stdout)), key=lambda row: float(row["offset"]))
    first = round_ * spec.requests
    samples = [Sample(first + i, float(row["offset"]), float(row["response-time"]), int(row["status-code"]),
                      spec.n if row["status-code"] == "200" else 0, round=round_) for i, row in enumerate(rows)]
    wall = max((s.start_s + s.latency_s for s in samples), default=0.0)
    samples += [Sample(first + i, wall, 0.0, 0, 0, "no answer (hey lists only answered requests)", round_)
                for i in range(len(rows), spec.requests)]
    return samples, wall


async def run_load(spec: LoadSpec, on_sample=None, round_: int = 0) -> tuple[list[Sample], dict]:
    """Run the load; on_sample(sample) is called as each answer arrives (with hey: when it ends).
    Returns (samples, summary). round_: recorded in each sample; round r's request i uses seed
    spec.seed + (r * requests + i) * n (with hey every request uses request 0's seed)."""
    spec.validate()
    if spec.client == "hey":
        samples, wall = await asyncio.to_thread(run_hey, spec, round_)
        for s in samples:
            if on_sample is not None:
                on_sample(s)
        return samples, summarize(samples, wall)
    headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
    n_conn = spec.concurrency or 256
    samples: list[Sample] = []
    t0 = time.perf_counter()
    deadline = t0 + spec.max_seconds

    def record(s: Sample):
        samples.append(s)
        if on_sample is not None:
            on_sample(s)

    async with aiohttp.ClientSession(spec.url, headers=headers, connector=aiohttp.TCPConnector(limit=n_conn),
                                     timeout=aiohttp.ClientTimeout(total=spec.client_timeout_s)) as http:
        if spec.concurrency is not None:
            counter = iter(range(spec.requests))

            async def worker():
                for i in counter:  # shared iterator: each index is taken once
                    if time.perf_counter() > deadline:
                        return
                    record(await _one(http, spec, round_ * spec.requests + i, t0, round_))

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
                tasks.append(asyncio.ensure_future(_one(http, spec, round_ * spec.requests + i, t0, round_)))
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


class InProcess:
    """The Pipeline in this process, timed on the batches a server ran (same requests and settings)."""

    def __init__(self, spec: LoadSpec, model: str | None, device: str = "cpu"):
        from deleaker.runtime import load_pipeline
        from deleaker.runtime.gc_freeze import freeze_loaded_objects
        from deleaker.runtime.model_card import default_size
        from deleaker.runtime.serve.schema import parse_size

        self.spec = spec
        self.pipe = load_pipeline(model, progress=False, device=device)
        freeze_loaded_objects()  # as the server does after loading: both sides collect garbage alike
        # the server encodes answers in asyncio's default executor: a pool of the same default size
        self._encoder = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="png")
        if spec.size:
            self.width, self.height = parse_size(spec.size)
        else:  # the server's default: the model card's size, else DEFAULT_SIDE square
            self.height, self.width = default_size(self.pipe.backend.info.card)
        self.config = self.pipe.config.replace(**spec.deleaker_settings) if spec.deleaker_settings else None
        self.steps = spec.steps if spec.steps is not None else self.pipe.config.num_steps
        self._warm: set[int] = set()  # batch sizes run once untimed (the server's warm-up load did the same)
        self._seed = 0

    def _batch(self, k: int) -> list:
        from deleaker.runtime import GenerateRequest

        reqs = [GenerateRequest(self.spec.prompt, entities=self.spec.entities, seed=self._seed + j, steps=self.steps,
                                height=self.height, width=self.width, config=self.config) for j in range(k)]
        self._seed += k
        return reqs

    def run(self, counts: dict[int, int], png: bool = False) -> dict:
        """counts: batch size -> batches. Returns images, seconds (timed batches only) and edited
        (images whose final DeLeaker history is nonzero, i.e. the op aggregated attention).
        png: encode each batch's images to PNG in the pool while the next batch runs; the timed
        span of each batch size then ends when its last image is encoded (encoded: PNGs made)."""
        for k in counts:
            if k not in self._warm:
                self.pipe.generate(self._batch(k), progress=None)
                self._warm.add(k)
        images = edited = encoded = 0
        seconds = 0.0
        for k, n in counts.items():
            pending = []
            for _ in range(n):
                batch = self._batch(k)
                t0 = time.perf_counter()
                results = self.pipe.generate(batch, progress=None)
                if png:  # encoded while the next batch runs, as the server's answers are
                    pending += [self._encoder.submit(r.png_bytes) for r in results]
                seconds += time.perf_counter() - t0
                images += k
                edited += sum(1 for r in results if np.any(r.history != 0))
            t0 = time.perf_counter()
            encoded += sum(1 for f in pending if f.result()[:8] == PNG_SIGNATURE)
            seconds += time.perf_counter() - t0
        out = {"images": images, "seconds": seconds, "edited": edited}
        if png:
            out["encoded"] = encoded
        return out


def compare_summary(rounds: list[dict]) -> dict:
    """Per-round server and in-process rates -> the median ratio, its range, and the pooled ratio;
    the same against the in-process passes that encode PNG (keys with _png)."""
    out: dict = {"inprocess_edited": sum(r["inprocess_edited"] for r in rounds),
                 "inprocess_images": sum(r["inprocess_images"] for r in rounds)}
    if any("inprocess_png_images" in r for r in rounds):
        out["inprocess_png_encoded"] = sum(r.get("inprocess_png_encoded", 0) for r in rounds)
    for tag in ("", "_png"):
        ratios = [r["server_vs_inprocess" + tag] for r in rounds if r.get("server_vs_inprocess" + tag) is not None]
        if ratios:  # each ratio needs a server rate and an in-process rate: no zero times below
            server = sum(r["images"] for r in rounds) / sum(r["wall_s"] for r in rounds)
            inproc = (sum(r[f"inprocess{tag}_images"] for r in rounds)
                      / sum(r[f"inprocess{tag}_s"] for r in rounds))
            out[f"server_vs_inprocess{tag}"] = float(np.median(ratios))
            out[f"server_vs_inprocess{tag}_range"] = [min(ratios), max(ratios)]
            out[f"inprocess{tag}_images_per_s"] = inproc
            out[f"server_vs_inprocess{tag}_pooled"] = server / inproc
    return out


def _cpu_s() -> float:
    """This process's CPU time and that of its finished children (hey)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker-bench --mode serve", description=__doc__.split("\n")[0])
    d = LoadSpec()
    p.add_argument("--url", default=d.url)
    p.add_argument("--requests", type=int, default=d.requests, help="how many requests to send per round (at most)")
    p.add_argument("--rounds", type=int, default=1, help="run the load this many times (with --compare: each "
                                                         "round followed by its in-process pass)")
    loop = p.add_mutually_exclusive_group()
    loop.add_argument("--concurrency", type=int, help="closed loop: this many clients in parallel (default 8)")
    loop.add_argument("--rate", type=float, help="open loop: mean arrivals per second (Poisson)")
    p.add_argument("--max-seconds", type=float, default=d.max_seconds, help="stop sending after this long")
    p.add_argument("--prompt", help="default: the served model's example (its card, from /health), else "
                                    f"{d.prompt!r}")
    p.add_argument("--entities", help="comma-separated entity words (default: with the default prompt, its "
                                      "entities; else none)")
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the server's)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the server's)")
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deleaker-settings", type=json.loads, help="JSON object of DeLeaker settings for every request")
    p.add_argument("--token", help="bearer token (default: DELEAKER_API_TOKEN)")
    p.add_argument("--client", default="aiohttp", choices=CLIENTS,
                   help="the load generator: aiohttp in this process, or the hey command (closed loop only; "
                        "less CPU per request)")
    p.add_argument("--compare", action="store_true",
                   help="after each round, time the server's batches of that round through the Pipeline in "
                        "this process")
    p.add_argument("--model", help="with --compare: the model folder the server runs (default: the embedded "
                                   "toy-world model, which `deleaker serve` runs without --model)")
    p.add_argument("--device", default="cpu", help="with --compare: the device of the in-process pass (the "
                                                   "server's --device)")
    p.add_argument("--out", help="write one JSON line per request here")
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    from deleaker.runtime.errors import run_reporting_errors
    from deleaker.runtime.pipeline import check_device

    args = _parser().parse_args(argv)

    def go() -> int:
        token = args.token or os.environ.get("DELEAKER_API_TOKEN")
        prompt, entities = args.prompt, tuple(e.strip() for e in (args.entities or "").split(",") if e.strip())
        if prompt is None:  # the served model's own example: a model of a few words refuses any other
            example = server_example(args.url, {"Authorization": f"Bearer {token}"} if token else {})
            prompt, default_entities = example or (LoadSpec.prompt, LoadSpec.entities)
            entities = entities if args.entities is not None else default_entities
            print(f"deleaker-bench: prompt {prompt!r}, entities {list(entities)} (the server's example)"
                  if example else f"deleaker-bench: prompt {prompt!r} (the server's model has no example)",
                  file=sys.stderr)
        spec = LoadSpec(url=args.url, requests=args.requests,
                        concurrency=args.concurrency if args.rate is None else None,
                        rate=args.rate, max_seconds=args.max_seconds, prompt=prompt, entities=entities,
                        size=args.size, steps=args.steps, n=args.n, seed=args.seed, token=token,
                        deleaker_settings=args.deleaker_settings, client=args.client)
        if spec.concurrency is None and spec.rate is None:
            spec = LoadSpec(**{**asdict(spec), "concurrency": 8})
        spec.validate()
        if args.rounds < 1:
            raise ValueError(f"--rounds must be >= 1, got {args.rounds}")
        if args.model and not args.compare:
            raise ValueError("--model is the model of the in-process pass: give it with --compare")
        if args.device != "cpu" and not args.compare:
            raise ValueError("--device is the device of the in-process pass: give it with --compare")
        check_device(args.device)
        local = InProcess(spec, args.model, args.device) if args.compare else None  # before any output: a bad --model fails here
        out = open(args.out, "w") if args.out else None  # noqa: SIM115  (closed below)
        try:
            def write(s: Sample):
                if out is not None:
                    out.write(json.dumps(asdict(s)) + "\n")

            headers = {"Authorization": f"Bearer {spec.token}"} if spec.token else {}
            metrics = (lambda: httpx.get(spec.url + "/metrics", headers=headers, timeout=30).text)  # noqa: E731
            samples, rounds, wall = [], [], 0.0
            for r in range(args.rounds):
                before = metrics() if local else ""
                cpu0 = _cpu_s()
                got, part = asyncio.run(run_load(spec, write, round_=r))
                client_cpu = _cpu_s() - cpu0  # the load generator's own share of the machine
                samples += got
                wall += part["wall_s"]
                row = {"round": r, "images": sum(s.images for s in got if s.status == 200), "wall_s": part["wall_s"],
                       "images_per_s": part["images_per_s"], "client_cpu_s": client_cpu}
                if local:
                    counts = batch_counts(before, metrics())
                    row["batches"] = {str(k): v for k, v in counts.items()}
                    ran = local.run(counts)
                    row.update(inprocess_images=ran["images"], inprocess_s=ran["seconds"], inprocess_edited=ran["edited"],
                               inprocess_images_per_s=ran["images"] / ran["seconds"] if ran["seconds"] else None)
                    row["server_vs_inprocess"] = (row["images_per_s"] / row["inprocess_images_per_s"]
                                                  if row["inprocess_images_per_s"] and row["images_per_s"] else None)
                    ran = local.run(counts, png=True)
                    row.update(inprocess_png_images=ran["images"], inprocess_png_s=ran["seconds"],
                               inprocess_png_encoded=ran["encoded"],
                               inprocess_png_images_per_s=ran["images"] / ran["seconds"] if ran["seconds"] else None)
                    row["server_vs_inprocess_png"] = (row["images_per_s"] / row["inprocess_png_images_per_s"]
                                                      if row["inprocess_png_images_per_s"] and row["images_per_s"]
                                                      else None)
                rounds.append(row)
                if args.rounds > 1:
                    print("round %d/%d: %s" % (r + 1, args.rounds, json.dumps(row)), file=sys.stderr, flush=True)
            summary = summarize(samples, wall)
            if args.rounds > 1 or local:
                summary["rounds"] = rounds
            if local:
                batches: dict[str, int] = {}
                for row in rounds:
                    for k, v in row["batches"].items():
                        batches[k] = batches.get(k, 0) + v
                summary["batches"] = dict(sorted(batches.items(), key=lambda kv: int(kv[0])))
                summary.update(compare_summary(rounds))
        finally:
            if out is not None:
                out.close()
        print(json.dumps({"summary": summary}))
        if summary["first_error"] is not None:
            e = summary["first_error"]
            print(f"deleaker-bench: first error: HTTP {e['status']}: {e['message']}", file=sys.stderr)
        if args.out:
            print(f"wrote {Path(args.out)}", file=sys.stderr)
        return 0 if summary["server_errors"] == 0 and summary["ok"] > 0 else 1

    def guarded() -> int:
        try:
            return go()
        except RuntimeError as e:  # the hey command failed or ran past --max-seconds
            print(f"deleaker-bench: error: {e}", file=sys.stderr)
            return 1

    return run_reporting_errors("deleaker-bench", guarded)


if __name__ == "__main__":
    sys.exit(main())
