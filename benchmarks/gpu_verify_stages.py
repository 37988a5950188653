"""The stages of `python -m deleaker.benchmarks.gpu_verify`, one process each:

    python -m deleaker.benchmarks.gpu_verify_stages STAGE --out DIR/STAGE [--dry-run]

writes its raw output under DIR/STAGE and DIR/STAGE/result.json: {"status": passed | failed |
skipped, "reason", "numbers"}. A stage that needs CUDA reports "skipped: no GPU" in a dry run;
one that can run on the CPU at tiny size runs there and shows that its work happened (edit
counters, mask coverage). The anchor step and the generations are in gpu_verify_steps.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

from .gpu_verify_result import NO_GPU, Result, failed, passed, skipped

REPO = Path(__file__).resolve().parents[1]  # the source tree (an editable install maps the package here)
def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _run(cmd: list[str], log: Path, env: dict | None = None, cwd: Path = REPO) -> int:
    """Run cmd with its output appended to `log` (and echoed); returns the exit code."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})})
    return proc.returncode


def _tail(path: Path, n: int = 1) -> str:
    lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.is_file() else []
    return " / ".join(lines[-n:])[:300] if lines else "(no output)"


# ---------------------------------------------------------------------------------------------


def stage_env(out: Path, dry: bool) -> Result:
    """GPU, driver, torch, CUDA, cuDNN (and the rest of report.environment)."""
    import torch

    from .report import environment

    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    env.update(torch_cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
               cuda_available=torch.cuda.is_available())
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        env["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        env["driver"] = q.stdout.split(",")[1].strip() if q.returncode == 0 and "," in q.stdout else None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   gpu_mem_gib=round(p.total_memory / 2**30, 1))
    for tool in ("nvcc", "cmake", "ncu"):
        env[f"{tool}_path"] = shutil.which(tool)
    (out / "environment.json").write_text(json.dumps(env, indent=1) + "\n")
    print(json.dumps(env, indent=1))
    numbers = dict(gpu=env.get("gpu") or NO_GPU, driver=env.get("driver"), torch=env["torch"],
                   cuda=env["torch_cuda"], cudnn=env["cudnn"], diffusers=env.get("diffusers"))
    if not dry and not torch.cuda.is_available():
        return failed("torch sees no CUDA GPU (use --dry-run on a CPU machine)", **numbers)
    return passed(**numbers)


def stage_plugin(out: Path, dry: bool) -> Result:
    """`make plugin` (CMakeLists.txt) into build/, where modeling/cuda_op.py looks. Dry run:
    configure only, into DIR/plugin/build (proves the toolchain and the CMake file; a full CUDA
    build takes minutes on 2 cores)."""
    log = out / "build.log"
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        return skipped("no nvcc (CUDA toolkit) on this machine") if dry else failed("no nvcc on this machine")
    if dry:
        rc = _run(["cmake", "-S", str(REPO), "-B", str(out / "build")], log)
        if rc:
            return failed(f"cmake configure exit {rc}: {_tail(log)}")
        return passed(configured=True, note="dry run: configure only")
    t0 = time.perf_counter()
    rc = _run(["make", "-C", str(REPO), "plugin"], log)
    secs = round(time.perf_counter() - t0, 1)
    built = sorted(p.name for p in (REPO / "build").glob("libdeleaker_*.so"))
    if rc:
        return failed(f"make plugin exit {rc}: {_tail(log)}", seconds=secs, built=built)
    if "libdeleaker_torch.so" not in built:
        return failed("libdeleaker_torch.so not built (CMake found no CUDA build of torch; see build.log)", built=built)
    from deleaker.modeling import cuda_op

    path = cuda_op.load()
    return passed(built=built, loaded=str(path), build_s=secs)


def stage_pytest_gpu(out: Path, dry: bool) -> Result:
    """`pytest -m gpu tests` with the verdict report (tests/modeling/test_cuda_op.py writes one line per
    case to DELEAKER_VERDICT_REPORT). Dry run: collection only (how many gpu tests exist)."""
    log = out / "pytest.log"
    junit = out / "junit.xml"
    verdicts = out / "verdicts.txt"
    verdicts.unlink(missing_ok=True)
    base = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPO / "tests")]
    if dry:
        rc = _run(base + ["--collect-only"], log)
        m = re.search(r"(\d+)/\d+ tests collected", log.read_text()) or re.search(r"(\d+) tests? collected",
                                                                                   log.read_text())
        if rc not in (0, 5) or not m:
            return failed(f"collection exit {rc}: {_tail(log)}")
        return skipped(f"{NO_GPU} (collection only)", gpu_tests=int(m.group(1)))
    rc = _run(base + ["-ra", f"--junitxml={junit}"], log, env={"DELEAKER_VERDICT_REPORT": str(verdicts)})
    counts = _junit_counts(junit)
    lines = verdicts.read_text().splitlines() if verdicts.is_file() else []
    counts.update(verdicts_pass=sum(": PASS" in x for x in lines), verdicts_fail=sum(": FAIL" in x for x in lines))
    if rc != 0 or counts.get("failed") or counts.get("errors"):
        return failed(f"pytest exit {rc}: {_tail(log)}", **counts)
    if not counts.get("passed"):
        return failed("no gpu test passed (all skipped?): see pytest.log", **counts)
    return passed(**counts)


def _junit_counts(path: Path) -> dict:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return dict(passed=tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"], failed=tot["failures"],
                errors=tot["errors"], skipped=tot["skipped"])


def stage_op_bench(out: Path, dry: bool) -> Result:
    """The op alone (op_bench): T+I = 4608, E = 2 and 3, inside and after the window, vs cuDNN
    SDPA, with the op's edit counters. Dry run: the reference op on the CPU at T+I = 320 vs
    torch SDPA, with the reference's counters."""
    from . import op_bench as ob

    rows = []
    if dry:
        rows = [r for e in (2, 3) for r in _cpu_op_rows(ob, e)]
    elif not _cuda():
        return failed("torch sees no CUDA GPU")
    else:
        for e in (2, 3):
            case = ob.Case(H=24, D=128, h=64, w=64, E=e, spec=(tuple((s, s) for s in range(e)),), dtype="bf16")
            for row in ob.bench_case(case, iters=30):
                print(json.dumps(row), flush=True)
                rows.append(row)
    with open(out / "op_bench.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    errors = [r for r in rows if "error" in r and r["what"] != "sdpa flash"]
    numbers, problems = {}, []
    for r in rows:
        if not r["what"].startswith("op"):
            continue
        key = f"E{r['E']} {r['what'].split()[1]}"
        c = r["counters"][0]
        if "vs_sdpa_cudnn" in r or "vs_sdpa" in r:
            numbers[f"{key} vs sdpa"] = round(r.get("vs_sdpa_cudnn", r.get("vs_sdpa")), 3)
        numbers[f"{key} masked rows"] = c["masked_rows"]
        inside = r["what"] == "op inside"
        if inside and not (c["edited"] and c["masked_rows"] > 0):
            problems.append(f"{key}: no edit inside the window")
        if not inside and c["edited"]:
            problems.append(f"{key}: edited after the window")
    if errors:
        return failed("; ".join(f"{r['what']}: {r['error']}" for r in errors), **numbers)
    if problems:
        return failed("; ".join(problems), **numbers)
    if not any(k.endswith("masked rows") for k in numbers):
        return failed("no op row measured", **numbers)
    return passed(**numbers)


def _cpu_op_rows(ob, entities: int) -> list[dict]:
    """op_bench's rows on the CPU at tiny size: torch SDPA vs the reference op (its CPU kernel),
    timed with perf_counter (median of 5), counters from the reference run."""
    import torch
    import torch.nn.functional as F

    from deleaker.modeling import reference_op  # noqa: F401 - registers torch.ops.deleaker.attention

    case = ob.Case(H=2, D=64, T=64, h=16, w=16, E=entities, spec=(tuple((s, s) for s in range(entities)),),
                   dtype="fp32")
    q, k, v, ent, hist = ob.make_inputs(case, seed=7)
    windows, knobs, rules = ob.settings_for([{}], device="cpu")
    grid = torch.tensor([case.h, case.w])
    base = dict(N=case.N, B=1, H=case.H, D=case.D, E=entities, dtype=case.dtype, device="cpu")

    def median_ms(fn, n=5):
        fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return sorted(ts)[n // 2]

    sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    rows = [dict(base, what="sdpa", median_ms=sdpa)]
    for label, s in (("inside", 5), ("after", 20)):
        step = torch.tensor(s)
        args = (q, k, v, ent, hist, step, grid, windows, knobs, rules)
        attrs = ob.attrs_for(3)
        ms = median_ms(lambda: torch.ops.deleaker.attention(*args, attrs["block_offset"], attrs["blocks_per_step"]))
        _, _, recs = ob.reference_run(*args, attrs)
        rows.append(dict(base, what=f"op {label}", step=s, median_ms=ms, vs_sdpa=ms / sdpa,
                         counters=ob.reference_counters(ent, recs)))
    return rows


def stage_anchor(out: Path, dry: bool) -> Result:
    from .gpu_verify_steps import anchor

    return anchor(out, dry)


def stage_anchor_compiled(out: Path, dry: bool) -> Result:
    from .gpu_verify_steps import anchor_compiled

    return anchor_compiled(out, dry)


def stage_generate(out: Path, dry: bool) -> Result:
    from .gpu_verify_steps import generate

    return generate(out, dry)


def stage_aoti(out: Path, dry: bool) -> Result:
    """`deleaker-export aoti --device cuda` of the tiny head-64 model (the fused kernels' head
    size), then `deleaker-export verify --backend aoti --device cuda` against the torch model
    with the op (step and loop checks, DeLeaker on and off)."""
    if dry:
        return skipped(f"{NO_GPU} (an AOTInductor package compiles for the export machine's device)")
    if not _cuda():
        return failed("torch sees no CUDA GPU")
    from deleaker.modeling.tiny_model import build_tiny_model

    model = build_tiny_model(out / "model", preset="tiny-h64", overwrite=True)
    art = out / "artifact"
    log = out / "aoti.log"
    cli = [sys.executable, "-m", "deleaker.export.cli"]
    t0 = time.perf_counter()
    rc = _run(cli + ["aoti", "--model", str(model), "--out", str(art), "--device", "cuda", "--dtype", "bf16",
                     "--encoder-dtype", "bf16", "--height", "256", "--width", "256", "--force"], log)
    export_s = round(time.perf_counter() - t0, 1)
    if rc:
        return failed(f"aoti export exit {rc}: {_tail(log)}", export_s=export_s)
    t0 = time.perf_counter()
    rc = _run(cli + ["verify", str(art), "--model", str(model), "--backend", "aoti", "--device", "cuda"], log)
    verify_s = round(time.perf_counter() - t0, 1)
    checks = [x for x in log.read_text().splitlines() if re.match(r"\s*(step|loop|op)\b.*\b(ok|FAIL|PASS|fail)", x)]
    (out / "verify_lines.txt").write_text("\n".join(checks) + "\n")
    if rc:
        return failed(f"verify exit {rc}: {_tail(log)}", export_s=export_s, verify_s=verify_s)
    return passed(export_s=export_s, verify_s=verify_s, checks=len(checks))


STAGE_FUNCS = {"env": stage_env, "plugin": stage_plugin, "pytest_gpu": stage_pytest_gpu, "op_bench": stage_op_bench,
               "anchor": stage_anchor,
               "anchor_compiled": stage_anchor_compiled, "generate": stage_generate, "aoti": stage_aoti}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deleaker.benchmarks.gpu_verify_stages",
                                description="one stage of gpu_verify (run by it, in its own process)")
    p.add_argument("stage", choices=tuple(STAGE_FUNCS))
    p.add_argument("--out", required=True, help="this stage's folder")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the dry run means the CPU, also on a GPU machine
    try:
        res = STAGE_FUNCS[args.stage](out, args.dry_run)
    except Exception as e:  # noqa: BLE001 - the stage fails with its one-line cause; the traceback is in the log
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        res = failed(f"{type(e).__name__}: {msg}"[:300])
    (out / "result.json").write_text(json.dumps(res.__dict__, indent=1, default=str) + "\n")
    print(f"{args.stage}: {res.status}" + (f": {res.reason}" if res.reason else ""))
    return 1 if res.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
