"""`deleaker-bench`: latency, throughput and memory of vanilla vs DeLeaker, per backend.

    deleaker-bench --preset tiny --out bench-out                 # CPU smoke (CI)
    deleaker-bench --preset flux-dev-anchor --out bench-gpu      # performance.md anchor (GPU)
    deleaker-bench --model /models/FLUX.1-dev --device cuda --dtype bf16 \\
        --mode step,e2e --resolution 512,1024 --batch 1,2,4 --steps 28 --out bench-dev
    deleaker-bench --artifact art/ --backend onnxruntime --preset tiny --out bench-ort

Writes OUT/results.jsonl (one record per measurement), OUT/summary.md (the table, also
printed) and OUT/plot.png. Field meanings: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from deleaker.runtime.dtypes import WEIGHT_DTYPES
from deleaker.runtime.outputs import check_output

from .presets import PRESETS, BenchSpec, get_preset

log = logging.getLogger("deleaker.bench")


def _csv(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in {s!r}")
    return items


def _ints(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _csv(s))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _resolutions(s: str) -> tuple[tuple[int, int], ...]:
    """'512,1024x768' -> ((512, 512), (1024, 768)): N is NxN, WxH is width x height."""
    out = []
    for item in _csv(s):
        try:
            w, h = (int(v) for v in item.lower().split("x")) if "x" in item.lower() else (int(item),) * 2
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad resolution {item!r}: use N or WIDTHxHEIGHT") from None
        out.append((w, h))
    return tuple(out)


def _setting(s: str) -> tuple[str, object]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"--set expects NAME=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        value = json.loads(v)
    except ValueError:
        value = v
    return k.strip(), value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker-bench", description=__doc__.split("\n")[0],
                                epilog="presets: " + "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    p.add_argument("--preset", help=f"start from a preset: {', '.join(PRESETS)}")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--model", help="diffusers folder of FLUX.1 (or random:flux-dev / random:flux-schnell), or of "
                                   "SD3/3.5, Qwen-Image, FLUX.2 (step mode; docs/models.md) (torch backend); default: "
                                   "the tiny offline model")
    p.add_argument("--artifact", help="folder written by `deleaker-export` (onnxruntime / tensorrt backends)")
    p.add_argument("--backend", type=_csv, help="comma list: torch, onnxruntime, tensorrt")
    p.add_argument("--mode", type=_csv, help="comma list: step (one transformer forward), e2e (whole generation); "
                                             "or `--mode serve --url URL ...` alone: HTTP load test of `deleaker serve` "
                                             "(see `deleaker-bench --mode serve --help`)")
    p.add_argument("--resolution", type=_resolutions, help="comma list of N or WIDTHxHEIGHT, e.g. 512,1024x768")
    p.add_argument("--batch", type=_ints, help="comma list of batch sizes")
    p.add_argument("--steps", type=_ints, help="comma list of denoising step counts S")
    p.add_argument("--entities", action="append", type=_csv,
                   help="an entity set as comma-separated words (repeat for several sets); step mode uses its count")
    p.add_argument("--prompt", help="prompt of e2e runs (must contain the entity words)")
    p.add_argument("--impl", type=_csv, help="torch attention impls: sdpa (vanilla), reference, cuda, inactive")
    p.add_argument("--text-tokens", type=int, help="text tokens T of torch step mode (FLUX: 512)")
    p.add_argument("--entity-slots", type=int, help="entity slots E of torch step mode (default 4)")
    p.add_argument("--step", type=int, help="step index of step mode (default: the busiest DeLeaker step)")
    p.add_argument("--warmup", type=int, help="untimed runs per variant before timing (>= 1; peak memory is "
                                              "measured on them)")
    p.add_argument("--runs", type=int, help="timed runs per measurement")
    p.add_argument("--device", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES))
    p.add_argument("--deleaker-preset", help="DeLeaker config preset (runtime.config; default: flux-dev, or the model "
                                             "family's, e.g. sd3.5-large)")
    p.add_argument("--set", dest="settings", action="append", type=_setting, metavar="NAME=VALUE",
                   help="override one DeLeaker setting, e.g. --set start_intervention_from=0 (repeatable)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"),
                   help="torch backend, e2e: CUDA-graph steps (auto: on for CUDA with the fused op)")
    p.add_argument("--compile", action="store_true", help="torch backend, e2e: torch.compile the DeLeaker step")
    p.add_argument("--plant-coverage", type=float, metavar="SHARE",
                   help="torch step mode: plant spatially coherent entity attention covering SHARE of the image per "
                        "entity (random weights keep masks through smoothing); the flux-dev presets use 0.14")
    p.add_argument("--no-plant", action="store_true", help="no planted entity structure (a preset's is dropped)")
    p.add_argument("--random-weights", action="store_true", help="label the results random_weights: true")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="CPU threads for torch and onnxruntime (default: theirs)")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--profile", metavar="DIR", help="write torch profiler chrome traces here (torch backend)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")
    p.add_argument("--debug", action="store_true", help="full tracebacks and per-case failure logs")
    return p


def spec_from_args(args) -> BenchSpec:
    spec = get_preset(args.preset) if args.preset else BenchSpec()
    changes = {}
    direct = {"model": "model", "artifact": "artifact", "prompt": "prompt", "text_tokens": "text_tokens",
              "entity_slots": "entity_slots", "step": "step", "warmup": "warmup", "runs": "runs", "device": "device",
              "dtype": "dtype", "deleaker_preset": "deleaker_preset", "seed": "seed", "threads": "threads",
              "resolution": "resolutions", "batch": "batch_sizes", "steps": "steps"}
    for arg, field in direct.items():
        v = getattr(args, arg)
        if v is not None:
            changes[field] = v
    for arg, field in (("backend", "backends"), ("mode", "modes"), ("impl", "impls")):
        v = getattr(args, arg)
        if v is not None:
            changes[field] = tuple(v)
    if args.entities:
        changes["entity_sets"] = tuple(tuple(e) for e in args.entities)
    if args.settings:
        changes["deleaker_overrides"] = tuple({**dict(spec.deleaker_overrides), **dict(args.settings)}.items())
    if args.artifact and args.backend is None:
        # --artifact adds onnxruntime; torch stays beside it with --model or a preset's model
        keep = spec.backends if (args.model or args.preset) else ()
        changes["backends"] = tuple(b for b in keep if b != "onnxruntime") + ("onnxruntime",)
    if args.cuda_graphs is not None:
        changes["cuda_graphs"] = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    if args.compile:
        changes["compile"] = True
    if args.plant_coverage is not None and args.no_plant:
        raise ValueError("--plant-coverage and --no-plant contradict each other")
    if args.plant_coverage is not None:
        changes["plant_coverage"] = args.plant_coverage
    if args.no_plant:
        changes["plant_coverage"] = None
    if args.random_weights:
        changes["random_weights"] = True
    elif args.model or args.artifact:
        changes["random_weights"] = None  # a preset's label is for its own model; detect for this one
    return spec.replace(**changes)


def run(args) -> int:
    from . import report
    from .runner import run_spec

    spec = spec_from_args(args)
    spec.validate()
    if spec.artifact:  # a broken artifact is bad input: fail now, in one line, not as skipped rows
        from deleaker.runtime.artifact import load_artifact

        load_artifact(spec.artifact)
    out = Path(args.out)
    check_output(out, {"--model": spec.model, "--artifact": spec.artifact}, folder=True)
    _check_writable_folder(out, "--out")
    if args.profile:
        _check_writable_folder(Path(args.profile), "--profile")
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "results.jsonl"
    jsonl.write_text("")

    def stream(rec):  # partial results survive a crash; rewritten with ratios at the end
        with jsonl.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    records = run_spec(spec, preset=args.preset, progress=not args.quiet, profile_dir=args.profile,
                       on_record=stream)
    report.write_jsonl(records, jsonl)
    title = f"deleaker-bench: {args.preset or 'custom'}"
    md = report.summary_markdown(records, title)
    (out / "summary.md").write_text(md, encoding="utf-8")
    if not args.no_plot:
        from .plot import plot_records

        plot_records(records, out / "plot.png", title)
    if not args.quiet:
        print(md)
        print(f"wrote {jsonl}, {out / 'summary.md'}" + ("" if args.no_plot else f", {out / 'plot.png'}"))
    errors = [r for r in records if r.get("status") == "error"]
    for r in errors:
        print(f"deleaker-bench: error in {r['mode']} {r['backend']} {r['label']} {r['width']}x{r['height']} "
              f"b{r['batch_size']}: {r['note']}", file=sys.stderr)
    if not any(r.get("status") == "ok" for r in records):
        print("deleaker-bench: nothing was measured (every case skipped; see the notes in summary.md)",
              file=sys.stderr)
        return 1
    return 1 if errors else 0


def _check_writable_folder(path: Path, option: str) -> None:
    """A folder the run may create or write into (checked before any output)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {existing} is not writable")


def _serve_mode(argv: list[str]) -> list[str] | None:
    """The remaining arguments when the call is `--mode serve ...` (the HTTP load generator), else None."""
    for i, a in enumerate(argv):
        if a == "--mode" and i + 1 < len(argv) and argv[i + 1] == "serve":
            return argv[:i] + argv[i + 2:]
        if a == "--mode=serve":
            return argv[:i] + argv[i + 1:]
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = _serve_mode(argv)
    if rest is not None:  # load test of a running `deleaker serve` (benchmarks/serve_load.py)
        from .serve_load import main as serve_main

        return serve_main(rest)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="deleaker-bench: %(message)s")
    if args.list_presets:
        for name, spec in PRESETS.items():
            print(f"{name}: {spec.description}")
        return 0
    from deleaker.export.cli import run_cli

    return run_cli("deleaker-bench", lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
