"""Host allocator tuning (runtime/allocator.py) on and off, in fresh processes.

    python -m deleaker.benchmarks.allocator_check --runs 5              # the tiny model, 64x64, batches of 4
    python -m deleaker.benchmarks.allocator_check --runs 3 --model toyworld

Each run is a fresh process (DELEAKER_MALLOC_TUNING=1 and =0 in turn, so drift hits both alike)
that loads the model, runs one untimed batch, then times batches for --seconds. It prints one
JSON line per process (tuning, median batch seconds, minor page faults of the timed batches, peak
RSS) and a summary line per setting. The same batches run either way: the tuning changes where
host buffers live, never a number (the test checks the images are equal).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from .presets import EDITING_SETTINGS


def _child(model: str, seconds: float, size: int, batch: int) -> dict:
    from deleaker.runtime import GenerateRequest, load_pipeline
    from deleaker.runtime.allocator import tune_host_allocator

    if model == "toyworld":
        # the embedded model from its diffusers folder on torch: what allocator-toyworld.jsonl recorded
        pipe = load_pipeline(None, backend="torch", progress=False)
        prompt, entities, steps, cfg = ("a red striped circle and a blue dotted square",
                                        ("red striped circle", "blue dotted square"), 10, None)
    else:
        pipe = load_pipeline(model, progress=False)
        prompt, entities, steps = "a cat and a cheetah in a field", ("cat", "cheetah"), 2
        cfg = pipe.config.replace(**EDITING_SETTINGS)

    def requests(seed: int) -> list:
        return [GenerateRequest(prompt, entities=entities, seed=seed + j, steps=steps, height=size, width=size,
                                config=cfg) for j in range(batch)]

    first = pipe.generate(requests(0), progress=None)
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < seconds or len(times) < 3:
        t = time.perf_counter()
        pipe.generate(requests(0), progress=None)
        times.append(time.perf_counter() - t)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"tuning": tune_host_allocator(), "batches": len(times), "median_s": float(np.median(times)),
            "min_s": min(times), "max_s": max(times), "minor_faults": usage.ru_minflt - faults0,
            "peak_rss_mb": usage.ru_maxrss / 1024, "image_sum": int(sum(int(r.image.sum()) for r in first)),
            "edited": sum(1 for r in first if np.any(r.history != 0))}


def run(model: str, runs: int, seconds: float, size: int, batch: int, say=print) -> list[dict]:
    rows = []
    for i in range(runs):
        for tuning in ("1", "0"):
            env = {**os.environ, "DELEAKER_MALLOC_TUNING": tuning}
            cmd = [sys.executable, "-m", "deleaker.benchmarks.allocator_check", "--child", "--model", model,
                   "--seconds", str(seconds), "--size", str(size), "--batch", str(batch)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"the measuring process failed: {done.stderr.strip()[-2000:]}")
            row = {"run": i + 1, "env": f"DELEAKER_MALLOC_TUNING={tuning}",
                   **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            say(json.dumps(row))
    return rows


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for env in sorted({r["env"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["env"] == env]
        out.append({"env": env, "processes": len(mine),
                    "median_s": [min(r["median_s"] for r in mine), float(np.median([r["median_s"] for r in mine])),
                                 max(r["median_s"] for r in mine)],
                    "minor_faults_per_batch": float(np.median([r["minor_faults"] / r["batches"] for r in mine])),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine)})
    return out


def main(argv: list[str] | None = None) -> int:
    from deleaker.runtime.errors import run_reporting_errors

    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.allocator_check",
                                description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model folder, or 'toyworld' (default: the tiny offline model)")
    p.add_argument("--runs", type=int, default=5, help="process pairs (tuned, untuned)")
    p.add_argument("--seconds", type=float, default=4.0, help="timed batches per process, for about this long")
    p.add_argument("--size", type=int, default=64, help="image side (pixels; the toy world uses its own 32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    def go() -> int:
        if args.runs < 1 or args.seconds <= 0 or args.batch < 1:
            raise ValueError("--runs and --batch must be >= 1 and --seconds > 0")
        if args.model not in (None, "toyworld") and not os.path.isdir(args.model):
            raise ValueError(f"--model {args.model} is not a folder")
        if args.child:
            size = 32 if args.model == "toyworld" else args.size
            print(json.dumps(_child(args.model, args.seconds, size, args.batch)))
            return 0
        model = args.model
        if model is None:
            from deleaker.modeling.tiny_model import ensure_tiny_model
            model = str(ensure_tiny_model())
        rows = run(model, args.runs, args.seconds, args.size, args.batch)
        for s in summary(rows):
            print(json.dumps({"summary": s}))
        return 0

    return run_reporting_errors("allocator_check", go)


if __name__ == "__main__":
    sys.exit(main())
