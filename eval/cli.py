"""`deleaker eval`: leakage evaluation on SLIM-format prompts (docs/eval.md).

    deleaker eval run --dataset slim/ --model /models/FLUX.1-dev --device cuda --dtype bf16 --out runs/dev
    deleaker eval judge runs/dev --judge paper,vqascore --endpoint http://127.0.0.1:8000/v1 --model Qwen/Qwen2.5-VL-72B-Instruct
    deleaker eval report runs/dev
    deleaker eval check --dataset slim.parquet     # load and list bad records only
"""

from __future__ import annotations

import argparse
import logging
import sys


log = logging.getLogger("deleaker.eval")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker eval", description="semantic-leakage evaluation (SLIM format)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="load a dataset and report bad records")
    c.add_argument("--dataset", help="saved HF dataset folder, .parquet (or folder of them), .jsonl or .csv "
                                     "(default: the shipped sample)")

    r = sub.add_parser("run", help="generate vanilla and DeLeaker images (resumable)")
    r.add_argument("--dataset", help="as for check (default: the shipped sample)")
    r.add_argument("--split", action="append", default=[], help="only this split (repeatable)")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--model", help="diffusers-format FLUX folder (torch backend); default: the tiny offline model")
    src.add_argument("--artifact", help="folder written by `deleaker-export onnx` (onnxruntime backend)")
    r.add_argument("--backend", help="torch (default with --model), onnxruntime (default with --artifact)")
    r.add_argument("--preset", default="flux-dev", help="DeLeaker preset (deleaker generate --help lists them)")
    r.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    r.add_argument("--height", type=int, default=512)
    r.add_argument("--width", type=int, default=512)
    r.add_argument("--guidance", type=float, default=3.5)
    r.add_argument("--batch", type=int, default=2, help="requests per batch (the pipeline's max_batch)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="torch backend weights dtype")
    r.add_argument("--out", required=True, help="run folder (created; an existing one is resumed)")
    r.add_argument("--judge", default="paper", help="comma-separated judges the run is for: reference images "
                   "are made only when one of them reads them (paper does; vqascore, lpips, toyworld do not)")

    j = sub.add_parser("judge", help="judge a run's pairs (resumable)")
    j.add_argument("run", help="run folder")
    j.add_argument("--judge", default="paper", help="comma-separated: paper, vqascore, lpips, toyworld")
    j.add_argument("--endpoint", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    j.add_argument("--model", help="model name the endpoint serves")
    j.add_argument("--api-key-env", help="environment variable holding the API key (none: no key sent)")
    j.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    j.add_argument("--retries", type=int, default=3, help="retries per call (exponential backoff)")
    j.add_argument("--concurrency", type=int, default=4, help="items judged at once")
    j.add_argument("--no-structured", action="store_true",
                   help="do not send response_format=json_schema (servers without structured output)")
    j.add_argument("--prompts", default="v1", help="prompt version (eval/prompts/VERSION)")
    j.add_argument("--lpips-weights", help="local folder with LPIPS AlexNet weights (judge lpips)")

    rep = sub.add_parser("report", help="table, chart and HTML gallery of a judged run")
    rep.add_argument("run", help="run folder")
    rep.add_argument("--outcomes-from", default="paper", help="judge whose outcomes fill the table")
    return p


def _check(args) -> int:
    from .data import load_records

    res = load_records(args.dataset)
    if not res.records:
        for p in res.problems:
            print(f"bad record {p}")
        raise ValueError(f"{args.dataset or 'the dataset'} has no usable records"
                         + (f" ({len(res.problems)} bad, listed above)" if res.problems else " (it is empty)"))
    splits = {}
    for r in res.records:
        splits[r.split] = splits.get(r.split, 0) + 1
    print(f"{len(res.records)} usable record(s): " + ", ".join(f"{k} {v}" for k, v in sorted(splits.items())))
    for p in res.problems:
        print(f"bad record {p}")
    return 1 if res.problems else 0


def _run(args) -> int:
    from .data import SAMPLE
    from .run import RunSettings, run_generation

    backend = args.backend or ("onnxruntime" if args.artifact else "torch")
    settings = RunSettings(dataset=str(args.dataset or SAMPLE), source=args.artifact or args.model, backend=backend,
                           preset=args.preset, steps=args.steps, height=args.height, width=args.width,
                           guidance=args.guidance, device=args.device, dtype=args.dtype, splits=tuple(args.split))
    from .judges.base import get_judge

    names = [n.strip() for n in args.judge.split(",") if n.strip()]
    if not names:
        raise ValueError("--judge is empty")
    references = any(get_judge(n).reads_references for n in names)  # unknown names fail before any work
    counts = run_generation(settings, args.out, batch=args.batch, progress=not args.quiet, references=references)
    print(f"{args.out}: {counts['ok']} generated, {counts['skipped']} already done, {counts['error']} failed, "
          f"{counts['problems']} bad record(s) skipped")
    return 1 if counts["error"] else 0


def _judge(args) -> int:
    from .client import EndpointConfig
    from .judges.base import JudgeOptions, JudgeUnavailable, get_judge, judge_run
    from .store import RunDir

    run = RunDir(args.run).require()
    names = [n.strip() for n in args.judge.split(",") if n.strip()]
    if not names:
        raise ValueError("--judge is empty")
    classes = [get_judge(n) for n in names]  # unknown names fail before any work
    if args.concurrency < 1 or args.retries < 0 or not args.timeout > 0:
        raise ValueError("--concurrency must be >= 1, --retries >= 0, --timeout > 0")
    endpoint = None
    if any(c.needs_endpoint for c in classes):
        if not args.endpoint or not args.model:
            raise ValueError(f"judge(s) {', '.join(c.name for c in classes if c.needs_endpoint)} need --endpoint "
                             "and --model")
        endpoint = EndpointConfig(endpoint=args.endpoint, model=args.model, api_key_env=args.api_key_env,
                                  timeout=args.timeout, retries=args.retries, concurrency=args.concurrency,
                                  structured=not args.no_structured)
    options = JudgeOptions(endpoint=endpoint, prompts=args.prompts, lpips_weights=args.lpips_weights)
    rc = 0
    for cls in classes:
        try:
            judge = cls(options)
        except JudgeUnavailable as e:
            print(f"judge {cls.name}: skipped: {e}")
            continue
        counts = judge_run(run, judge, concurrency=args.concurrency, progress=not args.quiet)
        print(f"judge {cls.name}: {counts['ok']} ok, {counts['unparseable']} unparseable, {counts['error']} failed, "
              f"{counts['skipped']} judged before")
        rc = rc or (1 if counts["error"] else 0)
    return rc


def _report(args) -> int:
    from .report import write_report
    from .store import RunDir

    write_report(RunDir(args.run), args.outcomes_from)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    fn = {"check": _check, "run": _run, "judge": _judge, "report": _report}[args.command]
    from deleaker.export.cli import run_cli

    return run_cli("deleaker eval", lambda: fn(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
