"""Generate with DeLeaker through a model family's own diffusers pipeline (the drop-in).

    python -m deleaker.modeling.families --model DIR --prompt "a cat and a cheetah in a field" \
        --entities cat,cheetah --out cat.png [--steps N] [--seed S] [--size H W] [--no-deleaker]

DIR is a diffusers folder of a supported family (docs/models.md); its family is read from the
folder before anything is loaded, and an unsupported one is refused in one line. The pipeline
is the folder's own (model_index.json), loaded in float32 on the CPU or --device; DeLeaker is
installed with the family's preset, the image saved as PNG, and one line reports whether the
run edited (the mask history of the last step).
"""

from __future__ import annotations

import argparse
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deleaker.modeling.families", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="diffusers folder of a supported family")
    p.add_argument("--prompt", required=True)
    p.add_argument("--entities", default="", help="comma-separated words of the prompt to keep apart")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"), help="image size (default: 256 256)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-deleaker", action="store_true", help="the pipeline's own attention (DeLeaker installed, off)")
    p.add_argument("--debug", action="store_true", help="full traceback on errors")
    return p


def run(args) -> int:
    import torch
    from diffusers import DiffusionPipeline

    from deleaker.runtime.config import preset
    from deleaker.runtime.images import save_png

    from .. import diffusers_integration as dl
    from . import family_of_folder

    family = family_of_folder(args.model)  # one line for an unsupported folder, before any loading
    cfg = preset(family.preset)
    steps = args.steps or cfg.num_steps
    height, width = args.size or (256, 256)
    entities = tuple(e.strip() for e in args.entities.split(",") if e.strip())
    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(args.model, dtype=torch.float32).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    inst = dl.install(pipe, config=cfg)
    request = dl.DeLeaker(entities, enabled=not args.no_deleaker)
    extra = {"negative_prompt": " ", "true_cfg_scale": 4.0} if family.name == "qwenimage" else {}  # its true CFG
    with torch.no_grad():
        image = pipe(prompt=args.prompt, height=height, width=width, num_inference_steps=steps,
                     generator=torch.Generator(args.device).manual_seed(args.seed), output_type="pil",
                     **extra, **{family.pipeline_kwargs_name: {"deleaker": request}}).images[0]
    history = inst.history
    dl.remove(pipe)
    path = save_png(image, args.out)
    edited = history is not None and bool(history.abs().sum() > 0)
    print(f"{family.title}: wrote {path} ({height}x{width}, {steps} steps, {time.perf_counter() - t0:.1f}s); "
          f"DeLeaker {'off' if args.no_deleaker else ('edited' if edited else 'on, history empty')}"
          f"{'' if args.no_deleaker else f' for entities {list(entities)}'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from deleaker.runtime.errors import run_reporting_errors

    args = _parser().parse_args(argv)
    return run_reporting_errors("python -m deleaker.modeling.families", lambda: run(args), args.debug)


if __name__ == "__main__":
    sys.exit(main())
