"""Cold start of `deleaker generate` on the embedded default: process start to PNG written, and peak RSS,
the lean path (the shipped artifact on onnxruntime, the default) against the torch path (`--backend
torch`: the diffusers folder on the torch backend).

    python -m deleaker.benchmarks.cold_start [--runs 5] [--out FILE.jsonl]

Each run is a fresh process of the installed `deleaker` command with the same prompt, seed and
options (no --quiet: the log names the backend that ran). The paths alternate (lean, torch, lean,
...) after one untimed warm-up run of each (page cache), so a change of load on the machine hits
both alike. Per run: `png_s`, from just before the process is started to the PNG's modification
time (written atomically, then renamed into place); `exit_s`, to the process's exit; `peak_rss_mib`,
the process's resident high-water mark from the kernel's accounting (wait4). Each run's PNG is
checked (32x32, and within 1 pixel level of the other path's image, so both did the same work), and
its log line names the backend. One more untimed run per path under `python -X importtime` records
whether torch was imported. Prints one JSON line per run, then the median, min and max per path.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a red striped circle and a blue dotted square"
ENTITIES = "red striped circle,blue dotted square"
PATHS = {"lean": [], "torch": ["--backend", "torch"]}  # extra `deleaker generate` options per path
_GENERATED = re.compile(r"generated 1 image\(s\) (\d+)x(\d+) in [\d.]+s \((\d+) steps, (\w+),")


def _deleaker() -> list[str]:
    exe = Path(sys.executable).parent / "deleaker"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deleaker.runtime.cli"]


def run_once(path: str, out: Path) -> dict:
    """One fresh `deleaker generate` process; its timings, peak RSS and what it reported."""
    if out.exists():
        out.unlink()
    args = [*_deleaker(), "generate", "--prompt", PROMPT, "--entities", ENTITIES, *PATHS[path], "--out", str(out)]
    with tempfile.TemporaryFile() as err:
        start_ns = time.time_ns()
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        exit_s = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        log = err.read().decode(errors="replace")
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{path}: exit {proc.returncode}, no PNG: {log[-800:]}")
    m = _GENERATED.search(log)
    if m is None:
        raise RuntimeError(f"{path}: no 'generated' log line: {log[-800:]}")
    return {"path": path, "png_s": round((out.stat().st_mtime_ns - start_ns) / 1e9, 3), "exit_s": round(exit_s, 3),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
            "backend": m.group(4), "size": f"{m.group(1)}x{m.group(2)}", "steps": int(m.group(3))}


def imports_torch(path: str, out: Path) -> bool:
    """Whether the path's process imports torch (one untimed run under python -X importtime)."""
    args = [sys.executable, "-X", "importtime", "-m", "deleaker.runtime.cli", "generate", "--prompt", PROMPT,
            "--entities", ENTITIES, *PATHS[path], "--out", str(out), "--quiet"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{path} under -X importtime: exit {r.returncode}: {r.stderr[-800:]}")
    return bool(re.search(r"^import time:.*\|\s+torch$", r.stderr, re.M))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.cold_start", description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="timed runs per path")
    p.add_argument("--out", type=Path, help="also write the JSON lines here")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs must be >= 1, got {args.runs}")
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pngs = {name: Path(tmp) / f"{name}.png" for name in PATHS}
        for name in PATHS:  # warm-up: page cache, compiled bytecode
            run_once(name, pngs[name])
        torch_imported = {name: imports_torch(name, pngs[name]) for name in PATHS}
        for _ in range(args.runs):
            images = {}
            for name in PATHS:
                row = run_once(name, pngs[name])
                images[name] = np.asarray(Image.open(pngs[name])).astype(np.int16)
                row["imports_torch"] = torch_imported[name]
                rows.append(row)
                print(json.dumps(row), flush=True)
            a, b = images.values()
            if a.shape != (32, 32, 3) or np.abs(a - b).max() > 1:
                raise RuntimeError(f"the paths drew different images: shape {a.shape}, max diff {np.abs(a - b).max()}")
    print(f"{'path':6} {'backend':12} {'torch':6} {'png_s median [min, max]':26} {'exit_s median':14} "
          f"{'peak_rss_mib median [min, max]':30} runs")
    for name in PATHS:
        mine = [r for r in rows if r["path"] == name]
        stat = {k: [r[k] for r in mine] for k in ("png_s", "exit_s", "peak_rss_mib")}
        print(f"{name:6} {mine[0]['backend']:12} {'yes' if mine[0]['imports_torch'] else 'no':6} "
              f"{statistics.median(stat['png_s']):6.2f} [{min(stat['png_s']):.2f}, {max(stat['png_s']):.2f}]"
              f"{'':9} {statistics.median(stat['exit_s']):6.2f}{'':8} "
              f"{statistics.median(stat['peak_rss_mib']):6.1f} [{min(stat['peak_rss_mib']):.1f}, "
              f"{max(stat['peak_rss_mib']):.1f}]{'':13} {len(mine)}")
    lean = statistics.median(r["png_s"] for r in rows if r["path"] == "lean")
    torch = statistics.median(r["png_s"] for r in rows if r["path"] == "torch")
    ratios = [t["png_s"] / l["png_s"] for l, t in zip(rows[0::2], rows[1::2])]
    print(f"torch / lean, cold start to PNG: {torch / lean:.2f}x (median of medians); per pair median "
          f"{statistics.median(ratios):.2f}x [{min(ratios):.2f}, {max(ratios):.2f}]")
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
