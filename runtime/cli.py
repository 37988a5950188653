"""`deleaker` command line: generate images (vanilla, DeLeaker, or both side by side)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from .backends.options import add_backend_flags, load_options
from .cli_help import DefaultsHelpFormatter
from .config import DEFAULT_PRESET, PRESETS, preset
from .embedded import default_source
from .errors import run_reporting_errors
from .family_artifact import is_family_artifact
from .images import MIN_SHOWN_SIDE
from .model_card import DEFAULT_SIDE, default_preset, default_size, read_card
from .outputs import check_output

log = logging.getLogger("deleaker")


# Subcommands that live in optional parts of the package register under this entry-point group
# (pyproject.toml: name = "module:main"), so this module names none of them and imports one only
# when it is run. Their one-line help, for `deleaker --help` without importing them:
COMMANDS_GROUP = "deleaker.commands"
COMMAND_HELP = {
    "serve": "serve the model over HTTP with dynamic batching",
    "eval": "measure leakage: generate, judge and report (SLIM format)",
}


def _commands() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


def _parser(commands: dict) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker", description="DeLeaker text-to-image runtime")
    sub = p.add_subparsers(dest="command", required=True)
    for name in sorted(commands):
        sub.add_parser(name, help=COMMAND_HELP.get(name, f"see `deleaker {name} --help`"), add_help=False)
    g = sub.add_parser("generate", help="generate an image from a prompt",
                       formatter_class=DefaultsHelpFormatter)
    g.add_argument("--prompt", help="what to draw (default: the model card's example prompt and entities, e.g. the "
                   "embedded model's)")
    g.add_argument("--entities", default="", help="comma-separated entity words that occur in the prompt")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--model", help="diffusers folder of FLUX.1, SD3/3.5, Qwen-Image or FLUX.2 (torch backend; "
                     "docs/models.md); default: the embedded toy-world "
                     "model (32x32, its own words only: docs/toyworld.md), as its exported artifact on onnxruntime")
    src.add_argument("--artifact", help="folder written by `deleaker-export onnx` (onnxruntime backend; an SD3/3.5, "
                     "Qwen-Image or FLUX.2 step artifact runs its DeLeaker steps in ONNX Runtime inside the family's "
                     "pipeline, docs/models.md)")
    g.add_argument("--backend", help="torch (default with --model; without --model or --artifact: the embedded "
                                     "model's diffusers folder), onnxruntime (default with --artifact or neither), "
                                     "openvino (a --portable artifact), aoti (an artifact of `deleaker-export aoti`), "
                                     "tensorrt")
    g.add_argument("--preset", help=f"DeLeaker preset: {', '.join(PRESETS)} (default: the one the model's card "
                   f"names, e.g. toyworld for the embedded model; else {DEFAULT_PRESET})")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, help="denoising steps (default: the preset's)")
    g.add_argument("--height", type=int, help="image height in pixels, a multiple of the model's image token (16 for "
                   "FLUX.1, 4 for the embedded model; docs/api.md#sizes) (default: the model card's size, e.g. 32 for "
                   "the embedded model; else 256, or the artifact's export size)")
    g.add_argument("--width", type=int, help="image width in pixels (default: as --height)")
    g.add_argument("--guidance", type=float, default=3.5, help="guidance scale (guidance-distilled models)")
    g.add_argument("--device", default="cpu", help="torch/onnxruntime device: cpu or cuda")
    add_backend_flags(g)  # --attention, --dtype, ...: what the backends declare (backends/options.py)
    g.add_argument("--no-deleaker", action="store_true", help="plain attention (same engine, no entity active)")
    g.add_argument("--compare", action="store_true", help="write vanilla and DeLeaker side by side")
    g.add_argument("--out", required=True, help="output PNG path")
    g.add_argument("--scale", type=int, help="write each image enlarged this many times, pixel for pixel (no "
                   f"smoothing); default: enough to make images smaller than {MIN_SHOWN_SIDE} px at least that "
                   "(1: the model's own pixels)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or logs")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def _generate(args) -> int:
    from .request import GenerateRequest, check_request
    from .pipeline import check_device

    # Everything that needs no model is checked before loading one (a load takes seconds to minutes).
    if args.model is None and not args.artifact:  # the embedded model: its artifact, or its folder for torch
        args.backend, args.model, args.artifact = default_source(args.backend)
    card = read_card(args.model or args.artifact)  # the declared preset, size and words (None: no card)
    if args.prompt is None:  # a first run with no options draws what the model can draw
        if card is None or not card.example_prompt:
            raise ValueError("--prompt is required: this model's folder has no card with an example prompt")
        args.prompt = card.example_prompt
        if not args.entities.strip():
            args.entities = ",".join(card.example_entities)
        log.info("no --prompt: the model card's example %r with the entities %s", args.prompt, args.entities or "none")
    cfg = preset(args.preset or default_preset(card))
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png file, got {args.out}")
    if not out.parent.exists():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if out.is_dir():
        raise ValueError(f"--out {args.out} is a folder; give a .png file path")
    check_output(out, {"--model": args.model, "--artifact": args.artifact})
    if args.compare and args.no_deleaker:
        raise ValueError("--compare already includes the vanilla image; drop --no-deleaker")
    entities = tuple(e.strip() for e in args.entities.split(",")) if args.entities.strip() else ()
    if any(not e for e in entities):
        raise ValueError(f"--entities has an empty item: {args.entities!r}")
    check_device(args.device)
    if args.scale is not None and not 1 <= args.scale <= 64:
        raise ValueError(f"--scale must be an integer in [1, 64], got {args.scale}")
    if args.model is not None and (family_generate := _family_pipeline(args.model)) is not None:
        return family_generate(args, entities, out)  # SD3 / Qwen-Image / FLUX.2: their own pipelines
    if args.artifact and is_family_artifact(args.artifact):  # their step artifacts: the same, steps in ONNX Runtime
        return _families_entry(f"{args.artifact}: a model family's step artifact")(args, entities, out)
    steps = args.steps if args.steps is not None else cfg.num_steps
    geometry = _declared_geometry(args)  # the model's size rule, read before its weights load
    size_range = geometry.size_range if geometry is not None else None
    backend_name = args.backend or (_artifact_backend(args.artifact) if args.artifact else "torch")
    options = _backend_options(args, backend_name)
    height, width = _size(args, size_range, card)
    if card is not None and (err := card.vocabulary_error(args.prompt)):
        raise ValueError(err)
    base = GenerateRequest(prompt=args.prompt, entities=entities, seed=args.seed, steps=steps, height=height,
                           width=width, guidance_scale=args.guidance, deleaker=not args.no_deleaker,
                           config=cfg)
    # the checks the Pipeline runs again once the model is loaded (the size rule where the folder states it)
    check_request(base, geometry if geometry is not None and geometry.vae_scale_factor else None)
    if not args.no_deleaker and len(entities) < 2:
        log.warning("DeLeaker separates two or more entities; with %d it is plain attention", len(entities))
    return _run(args, backend_name, options, base, out)


def _backend_options(args, backend_name: str) -> dict:
    """The backend's load() keywords: the flags its class declares it takes (backends/options.py)."""
    from .backends import backend_class

    return load_options(backend_class(backend_name), args, device=args.device, progress=not args.quiet)


def _run(args, backend_name: str, options: dict, base, out: Path) -> int:
    import numpy as np

    from .backends import load_backend
    from .images import display_scale, enlarge, save_png, side_by_side
    from .pipeline import Pipeline

    backend = load_backend(backend_name, args.artifact or args.model, **options)
    pipe = Pipeline(backend, config=base.config)
    pipe.check(base)
    if args.compare:
        runs = [(dataclasses.replace(base, deleaker=False), "vanilla"), (base, "DeLeaker")]
    else:
        runs = [(base, "DeLeaker" if base.deleaker else "vanilla")]
    results = pipe.generate([r for r, _ in runs], progress=not args.quiet)
    if args.compare:
        delta = np.abs(results[0].images.astype(np.int16) - results[1].images.astype(np.int16))
        line = f"DeLeaker vs vanilla: mean |difference| {delta.mean():.3f}, max {delta.max()} (pixel levels 0-255)"
        if delta.max() == 0:
            log.warning("%s: DeLeaker edited nothing here (%s)", line, pipe.why_no_edit(results[1]))
        else:
            log.info("%s", line)
    h, w = results[0].image.shape[:2]
    scale = args.scale if args.scale is not None else display_scale(h, w)
    if args.compare:
        image = side_by_side([r.image for r in results], [f"{label} (seed {args.seed})" for _, label in runs], scale)
    else:
        image = enlarge(results[0].image, scale)
    save_png(image, out)  # atomic: a temp file renamed into place
    if scale > 1:
        log.info("%dx%d images written %dx larger (%dx%d, each pixel a block: no smoothing; --scale 1 keeps the "
                 "model's pixels)", w, h, scale, w * scale, h * scale)
    if len(results) > 1 and results[0].batch_size == len(results):  # --compare: both images in one session
        log.info("wrote %s (%s in one batch, %.1fs)", out, " and ".join(label for _, label in runs), results[0].seconds)
    else:
        log.info("wrote %s (%s)", out, " + ".join(f"{label} {r.seconds:.1f}s" for (_, label), r in zip(runs, results)))
    return 0


def _declared_geometry(args):
    """What fixes the size rule (a ModelInfo's vae_scale_factor and size_range), read without
    loading weights: an artifact's manifest, or a diffusers folder's vae/config.json (VAE scale
    factor 2^(levels - 1)). None when the folder does not say (the loaded model is checked anyway)."""
    import json
    from types import SimpleNamespace

    if args.artifact:
        from .artifact import load_artifact

        art = load_artifact(args.artifact, check_files=False)
        factor = art.manifest.get("model", {}).get("vae_scale_factor")
        return SimpleNamespace(vae_scale_factor=factor if isinstance(factor, int) and factor > 0 else None,
                               size_range=art.size_range)
    try:
        vae = json.loads((Path(args.model) / "vae" / "config.json").read_text(encoding="utf-8"))
        levels = len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a readable diffusers folder: loading it says why
    return SimpleNamespace(vae_scale_factor=2 ** (levels - 1), size_range=None)


def _family_pipeline(model: str):
    """For a diffusers folder whose transformer is not FLUX.1's: the model families' generate
    command (modeling/families/generate.py, entry point group deleaker.pipelines), which refuses
    an unsupported class in one line before loading. None for FLUX.1 (or a folder that does not
    say: loading it says why)."""
    import json

    try:
        name = json.loads((Path(model) / "transformer" / "config.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if name == "FluxTransformer2DModel":
        return None
    return _families_entry(f"{model}: its transformer is {name}, not FLUX.1's")


def _families_entry(what: str):
    """The model families' generate command (entry point deleaker.pipelines: families)."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="deleaker.pipelines") if ep.name == "families"]
    if not found:
        raise ValueError(f"{what}, and the model families' pipeline is not installed (pip install -e .)")
    return found[0].load()


def _artifact_backend(path: str) -> str:
    """The backend an artifact is served with by default: onnxruntime, else the one it has files for."""
    from .artifact import load_artifact

    have = load_artifact(path, check_files=False).manifest.get("backends", {})
    return "onnxruntime" if "onnxruntime" in have or not have else sorted(have)[0]


def _size(args, size_range: tuple[int, int] | None, card=None) -> tuple[int, int]:
    """--height/--width, else the model card's size, else the artifact's export size when it fixes
    a range, else 256 (pixels)."""
    if card is not None and card.height is not None and args.height is None and args.width is None:
        return default_size(card)
    default = DEFAULT_SIDE
    if size_range is not None and not size_range[0] <= default <= size_range[1]:
        default = size_range[1]
    height = args.height if args.height is not None else default
    width = args.width if args.width is not None else height
    return height, width


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()  # read once: for dispatch and for the parser's list
    if argv and argv[0] in commands:
        try:
            command_main = commands[argv[0]].load()
        except ImportError as e:
            print(f"deleaker {argv[0]}: needs the optional extra ({e}); pip install -e '.[{argv[0]}]'",
                  file=sys.stderr)
            return 2
        return command_main(argv[1:])
    args = _parser(commands).parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="deleaker: %(message)s")
    return run_reporting_errors("deleaker", lambda: _generate(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
