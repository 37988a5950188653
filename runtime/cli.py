"""`deleaker` command line: generate images (vanilla, DeLeaker, or both side by side)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .config import PRESETS, preset
from .errors import run_reporting_errors

log = logging.getLogger("deleaker")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker", description="DeLeaker text-to-image runtime")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate an image from a prompt")
    g.add_argument("--prompt", required=True)
    g.add_argument("--entities", default="", help="comma-separated entity words that occur in the prompt")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="diffusers-format FLUX folder (torch backend); default: the tiny offline model")
    src.add_argument("--artifact", help="folder written by `deleaker-export onnx` (onnxruntime backend)")
    g.add_argument("--backend", help="torch (default with --model), onnxruntime (default with --artifact), tensorrt")
    g.add_argument("--preset", default="flux-dev", help=f"DeLeaker preset: {', '.join(PRESETS)}")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    g.add_argument("--height", type=int, default=256)
    g.add_argument("--width", type=int, default=256)
    g.add_argument("--guidance", type=float, default=3.5, help="guidance scale (guidance-distilled models)")
    g.add_argument("--device", default="cpu", help="torch/onnxruntime device: cpu or cuda")
    g.add_argument("--attention", default="reference", choices=("reference", "cuda"),
                   help="torch backend: DeLeaker op implementation (cuda: the fused kernels, `make plugin`)")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="torch backend weights dtype")
    g.add_argument("--no-deleaker", action="store_true", help="plain attention (same engine, no entity active)")
    g.add_argument("--compare", action="store_true", help="write vanilla and DeLeaker side by side")
    g.add_argument("--out", required=True, help="output PNG path")
    g.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def _generate(args) -> int:
    import numpy as np

    from .backends import load_backend
    from .images import save_png, side_by_side
    from .pipeline import GenerateRequest, Pipeline

    # Validate everything cheap before loading anything.
    cfg = preset(args.preset)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if args.compare and args.no_deleaker:
        raise ValueError("--compare already includes the vanilla image; drop --no-deleaker")
    entities = tuple(e.strip() for e in args.entities.split(",")) if args.entities.strip() else ()
    if any(not e for e in entities):
        raise ValueError(f"--entities has an empty item: {args.entities!r}")
    if not args.no_deleaker and len(entities) < 2:
        log.warning("DeLeaker separates two or more entities; with %d it is plain attention", len(entities))
    steps = args.steps if args.steps is not None else cfg.num_steps
    backend_name = args.backend or ("onnxruntime" if args.artifact else "torch")
    source = args.artifact or args.model
    options = dict(device=args.device, deleaker_config=cfg.replace(num_steps=steps), progress=not args.quiet)
    if backend_name == "torch":
        options.update(op=args.attention, dtype=args.dtype)
    elif args.attention != "reference" or args.dtype != "fp32":
        raise ValueError(f"--attention/--dtype apply to the torch backend; the {backend_name} backend runs "
                         "what was exported")
    backend = load_backend(backend_name, source, **options)
    pipe = Pipeline(backend)
    base = GenerateRequest(prompt=args.prompt, entities=entities, seed=args.seed, steps=steps, height=args.height,
                           width=args.width, guidance_scale=args.guidance, deleaker=not args.no_deleaker)
    pipe.check(base)
    if args.compare:
        runs = [(dataclasses.replace(base, deleaker=False), "vanilla"), (base, "DeLeaker")]
    else:
        runs = [(base, "DeLeaker" if base.deleaker else "vanilla")]
    results = [pipe.generate(r, progress=not args.quiet) for r, _ in runs]
    if args.compare:
        delta = np.abs(results[0].images.astype(np.int16) - results[1].images.astype(np.int16))
        log.info("DeLeaker vs vanilla: mean |difference| %.3f, max %d (pixel levels 0-255)", delta.mean(), delta.max())
        image = side_by_side([r.images[0] for r in results], [f"{label} (seed {args.seed})" for _, label in runs])
    else:
        image = results[0].images[0]
    save_png(image, out)
    log.info("wrote %s (%s)", out, " + ".join(f"{label} {r.seconds:.1f}s" for (_, label), r in zip(runs, results)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="deleaker: %(message)s")
    return run_reporting_errors("deleaker", lambda: _generate(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
