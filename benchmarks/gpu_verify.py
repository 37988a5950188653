"""GPU verification in one command: every check of the fused op and the compiled paths, in order.

    python -m deleaker.benchmarks.gpu_verify --out DIR                 # on a CUDA machine
    python -m deleaker.benchmarks.gpu_verify --out DIR --dry-run       # the same stages, CPU, tiny sizes
    python -m deleaker.benchmarks.gpu_verify --out DIR --only op_bench,anchor   # rerun chosen stages

Each stage runs in its own process (benchmarks/gpu_verify_stages.py) under its own time limit
(STAGES below: a hang costs that stage's budget, never the call), writes its raw output under
DIR/STAGE/ and its result to DIR/STAGE/result.json. A failed stage does not stop the others.
At the end the table (stage, status, seconds, budget, key numbers) is printed and written to
DIR/summary.json and DIR/summary.md; with --only, the stages not rerun keep their earlier rows.
Exit status: 0 when no stage failed (skipped stages do not fail the run), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int  # time limit on one H100 (the stage's process is killed past it)
    dry_budget_s: int  # time limit of the dry run on a 2-core CPU
    what: str


# The per-stage budget; docs/performance.md repeats this table. Total on a GPU: 470 s (< 8 min).
# GPU budgets are estimates (no v2 run on a GPU yet); dry-run limits are for a 2-core CPU.
STAGES = (
    Stage("env", 10, 30, "GPU, driver, torch, CUDA, cuDNN"),
    Stage("plugin", 80, 60, "build the fused op library (`make plugin`)"),
    Stage("pytest_gpu", 60, 150, "`pytest -m gpu` with the verdict report"),
    Stage("op_bench", 25, 30, "op vs cuDNN SDPA, E = 2 and 3, inside / outside the window"),
    Stage("anchor", 50, 60, "FLUX.1-dev-sized step at 512 and 1024, vanilla vs fused DeLeaker: eager and "
                            "CUDA-graph replay"),
    Stage("anchor_compiled", 90, 120, "the same step, torch.compile'd"),
    Stage("generate", 110, 60, "20-step 1024x1024 generations at batch 1, 2, 4 (images/s)"),
    Stage("aoti", 45, 30, "AOTInductor artifact on CUDA vs the reference"),
)
BY_NAME = {s.name: s for s in STAGES}
GPU_TOTAL_S = sum(s.budget_s for s in STAGES)
STATUSES = ("passed", "failed", "skipped")


def _stage_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or repr(text)}; "
                                         f"choose from {', '.join(BY_NAME)}")
    return [s.name for s in STAGES if s.name in names]  # always in pipeline order


def run_stage(stage: Stage, out: Path, dry_run: bool, budget_s: float) -> dict:
    """Run one stage in its own process group under `budget_s`; its stdout and stderr go to
    out/STAGE/output.log. Returns its row (the stage's result.json, or why there is none)."""
    folder = out / stage.name
    folder.mkdir(parents=True, exist_ok=True)
    result = folder / "result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "deleaker.benchmarks.gpu_verify_stages", stage.name, "--out", str(folder)]
    if dry_run:
        cmd.append("--dry-run")
    t0 = time.perf_counter()
    with open(folder / "output.log", "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started
            proc.wait()
            rc, timed_out = None, True
    seconds = time.perf_counter() - t0
    row = {"stage": stage.name, "seconds": round(seconds, 1), "budget_s": budget_s}
    if timed_out:
        return {**row, "status": "failed", "reason": f"timeout: killed after {budget_s:.0f} s", "numbers": {}}
    try:
        data = json.loads(result.read_text())
    except (OSError, ValueError):
        tail = _last_line(folder / "output.log")
        return {**row, "status": "failed", "reason": f"exit code {rc}, no result: {tail}", "numbers": {}}
    status = data.get("status")
    if status not in STATUSES:
        return {**row, "status": "failed", "reason": f"stage wrote status {status!r}", "numbers": {}}
    if status != "failed" and rc != 0:
        return {**row, "status": "failed", "reason": f"exit code {rc} after status {status}",
                "numbers": data.get("numbers", {})}
    return {**row, "status": status, "reason": data.get("reason", ""), "numbers": data.get("numbers", {})}


def _last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no output)"
    return lines[-1][:200] if lines else "(no output)"


def _fmt_numbers(numbers: dict) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    return "; ".join(f"{k} {fmt(v)}" for k, v in numbers.items())


def table_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "", "| stage | status | seconds | budget s | key numbers |", "|---|---|---|---|---|"]
    for r in rows:
        status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
        lines.append(f"| {r['stage']} | {status.replace('|', '/')} | {r['seconds']} | {r['budget_s']} | "
                     f"{_fmt_numbers(r.get('numbers', {})).replace('|', '/')} |")
    total = sum(r["seconds"] for r in rows)
    lines += ["", f"total {total:.1f} s of a {sum(r['budget_s'] for r in rows)} s budget; "
                  f"{sum(r['status'] == 'failed' for r in rows)} failed, "
                  f"{sum(r['status'] == 'skipped' for r in rows)} skipped"]
    return "\n".join(lines) + "\n"


def _merge(previous: list[dict], new: list[dict]) -> list[dict]:
    """--only: the rows rerun replace their earlier ones; pipeline order."""
    by = {r["stage"]: r for r in previous}
    by.update({r["stage"]: r for r in new})
    return [by[s.name] for s in STAGES if s.name in by]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.gpu_verify",
                                description=__doc__.split("\n")[0],
                                epilog="stages: " + "; ".join(f"{s.name} ({s.budget_s} s): {s.what}" for s in STAGES))
    p.add_argument("--out", required=True, help="folder for every stage's raw output and the summary")
    p.add_argument("--dry-run", action="store_true",
                   help="the same stages on the CPU at tiny sizes (stages that need CUDA are skipped)")
    p.add_argument("--only", type=_stage_list, help="comma-separated stages to (re)run, e.g. op_bench,anchor")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"gpu_verify: --out {out} exists and is not a folder", file=sys.stderr)
        return 2
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"gpu_verify: cannot create --out {out}: {e.strerror}", file=sys.stderr)
        return 2
    names = args.only or [s.name for s in STAGES]
    mode = "dry run (CPU, tiny sizes)" if args.dry_run else "GPU"
    print(f"gpu_verify: {mode}, stages {', '.join(names)}; raw output under {out}", flush=True)
    rows = []
    for name in names:
        stage = BY_NAME[name]
        budget = stage.dry_budget_s if args.dry_run else stage.budget_s
        print(f"gpu_verify: {name} (limit {budget} s): {stage.what}", flush=True)
        row = run_stage(stage, out, args.dry_run, budget)
        print(f"gpu_verify: {name} {row['status']}" + (f": {row['reason']}" if row["reason"] else "")
              + f" ({row['seconds']} s)", flush=True)
        rows.append(row)
    summary = out / "summary.json"
    if args.only and summary.is_file():
        try:
            previous = json.loads(summary.read_text())
            rows = _merge(previous.get("stages", []) if previous.get("dry_run") == args.dry_run else [], rows)
        except ValueError:
            pass
    summary.write_text(json.dumps({"dry_run": args.dry_run, "stages": rows}, indent=1) + "\n")
    md = table_markdown(rows, f"gpu_verify: {mode}")
    (out / "summary.md").write_text(md)
    print()
    print(md, end="")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
