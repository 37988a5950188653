"""`deleaker-export`: build artifacts from a diffusers-format FLUX checkpoint, and verify them.

    deleaker-export onnx --model DIR --out ARTIFACT [--height H --width W] [--min-size S --max-size S]
                         [--max-batch 4] [--max-text-tokens 512] [--entity-slots 4]
                         [--dtype fp32|fp16|bf16] [--preset flux-dev] [--portable] [--force]

An artifact serves every step count and DeLeaker setting (they are per-request inputs of the
exported step); --preset only records the default settings for requests that bring none.
    deleaker-export verify ARTIFACT --model DIR [--checks op,step,loop] [--steps N] [--height H --width W]
                         [--atol A --rtol R]
    deleaker-export aoti --model DIR --out ARTIFACT [...]   (AOTInductor packages; docs/compiled.md)
    deleaker-export engine ARTIFACT [--plugin PATH] [--min S] [--opt S] [--max S] [--max-batch N]
                         (TensorRT engines beside the ONNX files; docs/tensorrt.md)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from deleaker.runtime.errors import INTERRUPTED_EXIT_CODE, run_reporting_errors

from .manifest import DEFAULT_MAX_SIZE, DEFAULT_MIN_SIZE

from deleaker.modeling.libs import quiet_libraries
from deleaker.runtime.cli_help import DefaultsHelpFormatter
from deleaker.runtime.dtypes import WEIGHT_DTYPES

log = logging.getLogger("deleaker")
_DEFAULT_PROMPT, _DEFAULT_ENTITIES = "a cat and a cheetah in a field", "cat,cheetah"


def add_artifact_options(p: argparse.ArgumentParser) -> None:
    """What every artifact exporter (onnx, aoti) takes: source, folder, sizes, text length, slots,
    dtypes, default DeLeaker settings."""
    p.add_argument("--model", required=True, help="diffusers-format FLUX checkpoint folder")
    p.add_argument("--out", required=True, help="artifact folder to write")
    p.add_argument("--height", type=int, help="example image height in pixels (TensorRT opt); default 1024 for "
                   "FLUX.1, 256 for a model family's step artifact (its only size)")
    p.add_argument("--width", type=int, help="example image width in pixels (default: 1024, or as --height for a "
                   "family's step)")
    p.add_argument("--min-size", type=int,
                   help=f"smallest image side the artifact accepts (default: {DEFAULT_MIN_SIZE}, or H/W if smaller)")
    p.add_argument("--max-size", type=int,
                   help=f"largest image side the artifact accepts (default: {DEFAULT_MAX_SIZE}, or H/W if larger)")
    p.add_argument("--max-text-tokens", type=int, help="T5 text length T (default: the checkpoint's, <= 512)")
    p.add_argument("--entity-slots", type=int, default=4, help="entity slots E fixed in the graph")
    p.add_argument("--dtype", default="fp32", choices=tuple(WEIGHT_DTYPES), help="transformer weights")
    p.add_argument("--encoder-dtype", default="fp32", choices=tuple(WEIGHT_DTYPES),
                   help="CLIP, T5 and VAE weights (T5 overflows in fp16)")
    p.add_argument("--preset", help="DeLeaker preset recorded as the artifact's default settings (requests may "
                   "override; default: the one the model's card names, else flux-dev)")
    p.add_argument("--force", action="store_true", help="replace the artifact already in --out (a folder with manifest.json)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deleaker-export", description="Export FLUX + DeLeaker for the lean runtime")
    sub = p.add_subparsers(dest="command", required=True)

    o = sub.add_parser("onnx", formatter_class=DefaultsHelpFormatter,
                       help="write an ONNX artifact (transformer with DeLeakerAttention, encoders, VAE)")
    add_artifact_options(o)
    o.add_argument("--max-batch", type=int,
                   help="largest batch of the manifest's batch profile (TensorRT); ONNX Runtime takes any (default 4)")
    o.add_argument("--prompt", help="a model family's step artifact: the example prompt its first DeLeaker call is "
                   "captured from (Qwen-Image: the artifact serves prompts of its token length); default "
                   "'a cat and a cheetah in a field'")
    o.add_argument("--entities", help="with --prompt: its entity words (default cat,cheetah)")
    o.add_argument("--step-only", action="store_true",
                   help="a model family's step artifact without its text encoders and VAE in ONNX (they then run "
                        "in torch from the source folder)")
    o.add_argument("--guidance", type=float, help="a model family's step artifact: the guidance of the captured "
                   "call (SD3's CFG batch depends on it; default 3.5, as deleaker generate)")
    o.add_argument("--external-data", action="store_true",
                   help="weights in .onnx.data files for every model (default: only for models over 2 GB)")
    o.add_argument("--portable", action="store_true",
                   help="inline every DeLeakerAttention node into standard ONNX ops, so any ONNX runtime (e.g. "
                        "OpenVINO) loads transformer.onnx; no TensorRT plugin path (docs/export.md)")

    v = sub.add_parser("verify", formatter_class=DefaultsHelpFormatter, help="compare an artifact in ONNX Runtime with the PyTorch model")
    v.add_argument("artifact", help="artifact folder written by `deleaker-export onnx`")
    v.add_argument("--model", required=True, help="the checkpoint the artifact was exported from")
    v.add_argument("--backend", choices=("onnxruntime", "aoti"), default="onnxruntime",
                   help="which of the artifact's engines to check against PyTorch")
    v.add_argument("--checks", help="comma-separated: op, step, loop (default: all the backend has; aoti: step, loop)")
    v.add_argument("--steps", type=int,
                   help="denoising steps the checks' DeLeaker windows are resolved for (default: the artifact's "
                        "default settings')")
    v.add_argument("--height", type=int, help="image height (default: the smallest the artifact accepts)")
    v.add_argument("--width", type=int, help="image width")
    v.add_argument("--prompt", help=f"default {_DEFAULT_PROMPT!r}; a family step artifact: its example prompt")
    v.add_argument("--entities", help=f"default {_DEFAULT_ENTITIES}; a family step artifact: its example's")
    v.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    v.add_argument("--atol", type=float, help="absolute tolerance for every check (default: per check and dtype)")
    v.add_argument("--rtol", type=float, help="relative tolerance for every check")

    a = sub.add_parser("aoti", formatter_class=DefaultsHelpFormatter,
                       help="write an AOTInductor artifact (.pt2 packages for the aoti backend)")
    add_artifact_options(a)
    a.add_argument("--device", default="cpu", help="cpu or cuda: the device the packages are compiled for")
    for sp in (o, v, a):
        sp.add_argument("--quiet", action="store_true", help="only errors (and verify's result lines)")
        sp.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    from .tensorrt_engine import add_parser as add_engine_parser

    add_engine_parser(sub)
    return p


def export_spec(args):
    """The ExportSpec of `deleaker-export onnx|aoti` arguments (the checkpoint is read for its text length)."""
    from deleaker.runtime.config import preset
    from deleaker.runtime.model_card import default_preset, read_card

    from .onnx_export import ExportSpec

    kw = {}
    if args.max_text_tokens is not None:
        kw["max_text_tokens"] = args.max_text_tokens
    else:
        from deleaker.modeling.checkpoint import open_checkpoint

        kw["max_text_tokens"] = open_checkpoint(args.model).max_sequence_length
    if getattr(args, "max_batch", None) is not None:
        kw["max_batch"] = args.max_batch
    return ExportSpec(height=args.height or 1024, width=args.width or 1024, min_size=args.min_size, max_size=args.max_size,
                      entity_slots=args.entity_slots, dtype=args.dtype, encoder_dtype=args.encoder_dtype,
                      deleaker=preset(args.preset or default_preset(read_card(args.model))), external_data=True if getattr(args, "external_data", False) else None,
                      portable=bool(getattr(args, "portable", False)), **kw)


def _family_of(model: str):
    """The model family of a folder whose transformer is not FLUX.1's, else None (read before loading)."""
    from deleaker.modeling.families import UnsupportedModel, family_of_folder

    try:
        family = family_of_folder(model)
    except UnsupportedModel:
        return None  # FLUX.1's path says what is wrong with the folder
    return None if family.name == "flux1" else family


# options of the FLUX.1 artifact that a family step artifact has no use for: (given?, why)
_FLUX_ONLY = {
    "--dtype": (lambda a: a.dtype != "fp32", "the step is exported in float32"),
    "--encoder-dtype": (lambda a: a.encoder_dtype != "fp32", "its text encoders and VAE are exported in float32"),
    "--portable": (lambda a: a.portable, "the step keeps its DeLeakerAttention nodes"),
    "--min-size/--max-size": (lambda a: a.min_size is not None or a.max_size is not None,
                              "the step has static shapes: --height/--width only"),
    "--max-batch": (lambda a: a.max_batch is not None, "the batch is the captured call's"),
    "--max-text-tokens": (lambda a: a.max_text_tokens is not None, "the text length is the captured prompt's"),
    "--external-data": (lambda a: a.external_data, "external data is used above 2 GB only"),
}


def _onnx(args) -> int:
    from .onnx_export import export_artifact

    family = _family_of(args.model)
    if family is not None:
        from .family_artifact import EXAMPLE_ENTITIES, EXAMPLE_PROMPT, export_family_artifact

        given = [name for name, (test, _) in _FLUX_ONLY.items() if test(args)]
        if given:
            raise ValueError(f"{given[0]} does not apply to a {family.title} step artifact "
                             f"({_FLUX_ONLY[given[0]][1]})")
        if (args.prompt is None) != (args.entities is None):
            raise ValueError("--prompt and --entities go together (the example call needs both)")
        entities = tuple(e.strip() for e in args.entities.split(",") if e.strip()) if args.entities else \
            EXAMPLE_ENTITIES
        export_family_artifact(args.model, args.out, height=args.height, width=args.width,
                               entity_slots=args.entity_slots, preset_name=args.preset,
                               guidance=args.guidance if args.guidance is not None else 3.5,
                               prompt=args.prompt or EXAMPLE_PROMPT, entities=entities, force=args.force,
                               components=not args.step_only)
        return 0  # the last log line names the artifact
    if args.step_only:
        raise ValueError("--step-only applies to a model family's step artifact, not to FLUX.1's (whose artifact "
                         "always holds its encoders and VAE)")
    for name in ("prompt", "entities", "guidance"):
        if getattr(args, name) is not None:
            raise ValueError(f"--{name} applies to a model family's step artifact, not to FLUX.1's (whose artifact "
                             f"serves any prompt)")

    export_artifact(args.model, args.out, export_spec(args), force=args.force)
    return 0  # the last log line names the artifact


def _aoti(args) -> int:
    from .aoti import export_aoti

    export_aoti(args.model, args.out, export_spec(args), device=args.device, force=args.force)
    return 0  # the last log line names the artifact


def _verify(args) -> int:
    from .verify import verify

    for name in ("atol", "rtol"):
        v = getattr(args, name)
        if v is not None and not (v >= 0 and v != float("inf")):
            raise ValueError(f"--{name} must be a finite number >= 0, got {v}")
    checks = tuple(c.strip() for c in args.checks.split(",") if c.strip()) if args.checks else None
    entities = tuple(e.strip() for e in args.entities.split(",") if e.strip()) if args.entities is not None else None
    from deleaker.runtime.family_artifact import is_family_artifact, load_family_artifact

    if is_family_artifact(args.artifact):
        from .family_verify import verify_family

        art = load_family_artifact(args.artifact, check_files=False)
        if args.backend != "onnxruntime" or args.device != "cpu":
            raise ValueError(f"a {art.family_title} step artifact is verified in ONNX Runtime on the CPU, not "
                             f"--backend {args.backend} --device {args.device}")
        art.check_size(args.height or art.height, args.width or art.width)  # its only size
        rows = verify_family(args.artifact, args.model, checks=checks, steps=args.steps, prompt=args.prompt,
                             entities=entities, atol=args.atol, rtol=args.rtol)
    else:
        rows = verify(args.artifact, args.model, checks=checks, steps=args.steps, height=args.height, width=args.width,
                      device=args.device, prompt=args.prompt or _DEFAULT_PROMPT,
                      entities=entities or tuple(_DEFAULT_ENTITIES.split(",")), atol=args.atol, rtol=args.rtol,
                      backend=args.backend)
    edits = [r for r in rows if r.output == "edit"]  # family step artifacts: DeLeaker's edit, shown per check
    outputs = [r for r in rows if r.output != "edit"]
    failed = [r for r in outputs + edits if not r.passed]
    print(f"verify: {sum(r.passed for r in outputs)}/{len(outputs)} outputs within tolerance"
          + (f"; DeLeaker edited in {sum(r.passed for r in edits)}/{len(edits)} checks" if edits else "")
          + (f"; FAILED: {', '.join(sorted({f'{r.check}/{r.output}' for r in failed}))}" if failed else ""))
    return 1 if failed else 0


def run_cli(prog: str, fn, debug: bool = False) -> int:
    """run_reporting_errors, plus Ctrl-C (and SIGTERM) as one line `prog: interrupted` and exit
    code 130; the `finally` blocks of the work (temp folders) run first."""
    def terminate(signum, frame):
        raise KeyboardInterrupt

    owns_signals = _main_thread()  # signal handlers can only be set from the main thread
    previous = signal.signal(signal.SIGTERM, terminate) if owns_signals else None
    try:
        return run_reporting_errors(prog, fn, debug)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    finally:
        if owns_signals:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="deleaker-export: %(message)s")
    def go() -> int:
        quiet_libraries()
        if args.command == "engine":
            from .tensorrt_engine import run

            return run(args)
        return {"onnx": _onnx, "aoti": _aoti, "verify": _verify}[args.command](args)

    code = run_cli("deleaker-export", go, args.debug)
    if code == INTERRUPTED_EXIT_CODE and argv is None:  # the command's own process
        # CPython ends a process by SIGINT (-2, not 130) when a library ran Python code through its
        # C API (PyRun_*) while Ctrl-C arrived, whatever main returns; the temp folders are gone
        # by now (the work's finally blocks), so end with the documented code ourselves.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
