"""Records out: JSON lines, a markdown summary table, and the machine they came from."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
from importlib import metadata
from pathlib import Path
from typing import Iterable


# ---------------------------------------------------------------------------------------------
# Machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: str = "cpu") -> dict:
    """Where and with what a run happens (every record carries these as env_*)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    gpu = None
    if device.startswith("cuda"):
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(torch.device(device))
    ort = _version("onnxruntime") or _version("onnxruntime-gpu")
    try:
        load = round(os.getloadavg()[0], 2)  # CPU timings on a busy machine are noisy; say how busy
    except OSError:
        load = None
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": socket.gethostname(), "cpu": _cpu_model(), "cpu_cores": cores, "mem_gib": _mem_total_gib(),
        "loadavg_1m": load, "gpu": gpu, "python": platform.python_version(), "torch": _version("torch"),
        "diffusers": _version("diffusers"), "onnxruntime": ort,
    }


def machine_line(rec: dict) -> str:
    """'2-core CPU (Intel ...), 23.4 GiB, no GPU; torch 2.13.0, diffusers 0.42.1' from a record."""
    gpu = rec.get("env_gpu") or "no GPU"
    libs = ", ".join(f"{k} {rec[f'env_{k}']}" for k in ("torch", "diffusers", "onnxruntime") if rec.get(f"env_{k}"))
    mem = f", {rec['env_mem_gib']} GiB RAM" if rec.get("env_mem_gib") else ""
    load = f", load average {rec['env_loadavg_1m']} at start" if rec.get("env_loadavg_1m") is not None else ""
    return f"{rec.get('env_cpu_cores')}-core CPU ({rec.get('env_cpu')}){mem}{load}, {gpu}; {libs}"


# ---------------------------------------------------------------------------------------------
# JSON lines

# Fields of every record (docs/benchmarks.md explains each); status "ok" records have OK_FIELDS too.
COMMON_FIELDS = ("schema", "run_id", "preset", "status", "note", "mode", "backend", "model", "artifact",
                 "random_weights", "impl", "variant", "label", "width", "height", "batch_size", "steps", "entities",
                 "baseline", "ratio_vs_vanilla", "extra_device_mib_vs_vanilla", "env_timestamp", "env_host", "env_cpu",
                 "env_cpu_cores", "env_mem_gib", "env_loadavg_1m", "env_gpu", "env_python", "env_torch",
                 "env_diffusers", "env_onnxruntime")
OK_FIELDS = ("device", "dtype", "image_tokens", "text_tokens", "entity_slots", "step", "warmup", "runs", "timer",
             "step_median_s", "step_p10_s", "step_p90_s", "step_mean_s", "step_min_s", "step_max_s", "step_samples_s",
             "images_per_s", "peak_host_mib", "host_peak_scope", "peak_device_mib", "device_resident_mib",
             "mask_coverage")
E2E_FIELDS = ("seconds_per_image", "seconds_per_image_p10", "seconds_per_image_p90", "prompt", "entity_words")


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Markdown


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s * 1e3 >= 10 else f"{s * 1e3:.2f} ms"
    return f"{s:.3g} s"


def _fmt(x, spec: str = ".3g", none: str = "-") -> str:
    return none if x is None else format(x, spec)


TABLE_HEADER = ("| mode | backend | size | T | B | E | S | variant | per step: median (p10-p90) | s / image | images/s "
                "| vs vanilla | peak host MiB | peak device MiB | mask coverage |")


def table_row(r: dict, notes: dict[str, int] | None = None) -> str:
    """One table line; with `notes` (note -> number) a skipped/failed row cites [n] instead of
    spelling its note out."""
    size = f"{r.get('width')}x{r.get('height')}"
    if r.get("status") != "ok":
        n = r.get("note", "")
        note = f"{r.get('status')} [{notes[n]}]" if notes and n in notes else f"{r.get('status')}: {n}"
        note = note.replace("|", "/")
        return (f"| {r['mode']} | {r['backend']} | {size} | {_fmt(r.get('text_tokens'), 'd')} | {r.get('batch_size')} | "
                f"{r.get('entities')} | {r.get('steps')} | {r['label']} | {note} | | | | | | |")
    per_step = f"{fmt_time(r['step_median_s'])} ({fmt_time(r['step_p10_s'])}-{fmt_time(r['step_p90_s'])})"
    ratio = "1 (baseline)" if r.get("baseline") == r["label"] else (
        f"{r['ratio_vs_vanilla']:.2f}x" if r.get("ratio_vs_vanilla") is not None else "-")
    dev = _fmt(r.get("peak_device_mib"), ".0f")
    if r.get("extra_device_mib_vs_vanilla") is not None and r.get("baseline") != r["label"]:
        dev += f" ({r['extra_device_mib_vs_vanilla']:+.0f})"
    cov = r.get("mask_coverage")
    cov = "-" if not cov else " / ".join(f"{c:.0%}" for c in cov)
    spi = fmt_time(r.get("seconds_per_image")) if r["mode"] == "e2e" else "-"
    return (f"| {r['mode']} | {r['backend']} | {size} | {_fmt(r.get('text_tokens'), 'd')} | {r['batch_size']} | "
            f"{r['entities']} | {r['steps']} | "
            f"{r['label']} | {per_step} | {spi} | {_fmt(r.get('images_per_s'))} | {ratio} | "
            f"{_fmt(r.get('peak_host_mib'), '.0f')} | {dev} | {cov} |")


def markdown_table(records: list[dict], notes: dict[str, int] | None = None) -> str:
    sep = "|" + "---|" * (TABLE_HEADER.count("|") - 1)
    return "\n".join([TABLE_HEADER, sep] + [table_row(r, notes) for r in records])


def summary_markdown(records: list[dict], title: str = "deleaker-bench") -> str:
    """Header (machine, weights, what the columns mean), the table, and notes."""
    if not records:
        return f"# {title}\n\nno measurements\n"
    r0 = records[0]
    rw = r0.get("random_weights")
    weights = ("**random_weights: true** (timing only; images and masks are not meaningful)" if rw else
               "random_weights: false" if rw is False else "random_weights: unknown")
    lines = [f"# {title}", "",
             f"- machine: {machine_line(r0)}",
             f"- run: {r0.get('run_id')}" + (f", preset `{r0['preset']}`" if r0.get("preset") else ""),
             f"- model: {r0.get('model') or '-'}" + (f"; artifact: {r0['artifact']}" if r0.get("artifact") else ""),
             f"- {weights}",
             "- per step: one transformer forward for the whole batch (step mode: synthetic inputs; "
             "e2e: the denoising steps of whole generations); images/s in step mode = B / (S x median step), "
             "the transformer-only rate of an S-step generation",
             "- vs vanilla: time over the same case's vanilla time; peak device MiB in brackets: extra over vanilla",
             ]
    notes = {n: i + 1 for i, n in enumerate(dict.fromkeys(r["note"] for r in records if r.get("note")))}
    lines += ["", markdown_table(records, notes), ""]
    if notes:
        lines += ["Notes:", ""] + [f"{i}. {n}" for n, i in notes.items()] + [""]
    return "\n".join(lines)
