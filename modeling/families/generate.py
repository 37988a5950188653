"""`deleaker generate --model DIR` for a folder of a family other than FLUX.1 (torch backend).

The runtime's own pipeline (runtime/pipeline.py) is FLUX.1's: its text encoding, packing and
scheduler. For SD3/3.5, Qwen-Image and FLUX.2 the sampling loop is the family's own diffusers
pipeline, loaded from the folder, with DeLeaker installed through the family adapter
(modeling/families/dropin.py): entity tokens found with the family's tokenizer(s) and prompt
template, the joint attention's layout, and its guidance structure (DeLeaker edits the
conditional branch; SD3's unconditional rows and Qwen-Image's negative-prompt call run plain
attention; docs/models.md). DeLeaker off (or --compare's vanilla image) is that pipeline's stock
output, bit for bit.

runtime/cli.py reaches this through the `deleaker.pipelines` entry point (the runtime never imports
torch), after its own checks of the output path and the entities; `generate` refuses an
unsupported transformer class in one line before loading anything.

EditCounters: what the op did, read from every DeLeaker attention call's own output (its history):
calls, the calls inside the intervention window with two or more active entities, and the
image rows their entity masks cover (the masks the op builds from that history).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from deleaker.runtime.config import DeLeakerConfig, ResolvedConfig, preset

from . import family_of_folder
from .base import CFG_SEPARATE, Family

log = logging.getLogger("deleaker")



class FamilyGenerateError(ValueError):
    """A request the family path cannot run (one line)."""


@dataclass
class EditCounters:
    """DeLeaker's edits in one pipeline call, summed over its attention calls (conditional rows)."""

    calls: int = 0  # DeLeaker attention calls (blocks x steps)
    intervening: int = 0  # calls inside the intervention window with >= 2 active entities
    masked_rows: int = 0  # image rows covered by an entity mask, summed over the intervening calls
    per_entity: list = field(default_factory=list)  # masked rows per entity slot
    history_filled: list = field(default_factory=list)  # per entity: its history is non-zero after the run
    note: str = ""  # how the rows were counted, when not at every intervening call

    def line(self, entities) -> str:
        rows = ", ".join(f"{e} {n}" for e, n in zip(entities, self.per_entity))
        return (f"{self.calls} DeLeaker attention calls, {self.intervening} intervening, "
                f"{self.masked_rows} masked image rows ({rows or 'none'})" + (f"; {self.note}" if self.note else ""))


def intervenes(cfg: ResolvedConfig, n_active: int, tau: int) -> bool:
    """Whether a call at block-step `tau` with `n_active` entities edits with history masks (the
    presets use history; calls with masks from their own probabilities only are not counted)."""
    return (n_active >= 2 and cfg.start_intervention_from <= tau <= cfg.stop_intervention_at
            and cfg.use_history and tau > cfg.start_aggregating_from)


def count_call(c: EditCounters, cfg: ResolvedConfig, ent, hist, tau: int, h: int, w: int,
               masks_known: bool = True) -> None:
    """Add one DeLeaker attention call at block-step `tau` to `c`, per sample: intervening (see
    intervenes), and the image rows of the masks the op forms from the history the call returned
    (reference_op: the source of the masks once history is in use)."""
    from ..reference_op import entity_masks, smooth_masks

    for b in range(ent.shape[0]):
        active = (ent[b] > 0).any(dim=-1).nonzero().flatten().tolist()
        if not intervenes(cfg, len(active), tau):
            continue
        c.intervening += 1
        if not masks_known:
            continue
        masks = entity_masks(hist[b, active].float(), cfg.std_mul_text)
        if cfg.do_smoothing:
            masks = smooth_masks(masks, h, w)
        rows = masks.sum(dim=-1).tolist()
        c.masked_rows += int(sum(rows))
        for e, n in zip(active, rows):
            c.per_entity[e] += int(n)


class _Counting:
    """Wraps one DeLeaker processor's op: after each call, count_call on the history it returned."""

    def __init__(self, proc, counters: EditCounters, cfg: ResolvedConfig):
        self.op, self.counters, self.cfg = proc.op, counters, cfg
        self.offset, self.bps = proc.attrs["block_offset"], proc.attrs["blocks_per_step"]

    def __call__(self, q, k, v, ent, history, step, grid, *rest):
        from ..reference_op import tau_of

        out, hist = self.op(q, k, v, ent, history, step, grid, *rest)
        self.counters.calls += 1
        count_call(self.counters, self.cfg, ent, hist, tau_of(int(step), self.offset, self.bps),
                   *(int(x) for x in grid))
        return out, hist


class StepCounting:
    """The same counters for steps run whole in ONNX Runtime (modeling/families/onnx_step.py), where
    the torch processors are not called and only each step's final history comes back: every
    block of the step is a call; the last block's masks are the ones the op forms from that
    history, so masked rows are counted at each step's last block (the torch path counts them at
    every block). on_step is OnnxStepRunner's callback."""

    def __init__(self, counters: EditCounters, cfg: ResolvedConfig, blocks_per_step: int):
        self.counters, self.cfg, self.bps = counters, cfg, blocks_per_step
        self.steps = 0

    def on_step(self, call, hist) -> None:
        c, bps, step = self.counters, self.bps, int(call.step)
        h, w = (int(x) for x in call.grid)
        self.steps += 1
        c.calls += bps
        for offset in range(bps):  # masks known at the last block only: the history the step returned
            count_call(c, self.cfg, call.entity_tokens, hist, step * bps + offset, h, w, masks_known=offset == bps - 1)


def load(model_dir: str | Path, device: str = "cpu", dtype: str = "fp32", without: tuple[str, ...] = ()):
    """(family, the folder's diffusers pipeline). An unsupported folder is refused before loading.
    without: components not to load (None in the pipeline; ONNX Runtime stand-ins replace them)."""
    from diffusers import DiffusionPipeline

    from ..checkpoint import resolve_dtype
    from ..libs import quiet_libraries

    family = family_of_folder(model_dir)
    if family.name == "flux1":
        raise FamilyGenerateError("FLUX.1 folders run on the runtime's own pipeline (deleaker generate --model)")
    quiet_libraries()  # no weight-loading bars or accelerate hints: the log says what loaded
    pipe = DiffusionPipeline.from_pretrained(str(model_dir), dtype=resolve_dtype(dtype),
                                             **{name: None for name in without}).to(device)
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def guidance_kwargs(family: Family, guidance: float) -> dict:
    """The pipeline's guidance arguments: SD3's CFG and FLUX.2's distilled guidance take
    guidance_scale; Qwen-Image's true CFG takes true_cfg_scale and a negative prompt (" ", as its
    model card)."""
    if family.guidance == CFG_SEPARATE:
        return {"negative_prompt": " ", "true_cfg_scale": guidance}
    return {"guidance_scale": guidance}


def run(pipe, family: Family, prompt: str, entities: tuple, *, seed: int, steps: int, height: int, width: int,
        guidance: float, config, deleaker: bool = True, device: str = "cpu", step_file: str | Path | None = None,
        output_type: str = "pil"):
    """One image (uint8 [H, W, 3]; output_type "np": float [H, W, 3] in [0, 1]) and its
    EditCounters (None with DeLeaker off). The pipeline has DeLeaker installed for the call only.
    step_file: an exported step (export/family_onnx.py) that runs the DeLeaker steps in ONNX
    Runtime (onnx_step.OnnxStepRunner; counted with StepCounting)."""
    from .. import diffusers_integration as dl

    factor = int(getattr(pipe, "vae_scale_factor", 8)) * 2  # every family packs 2x2 latent patches
    if height % factor or width % factor:
        raise FamilyGenerateError(f"{family.title}: height and width must be multiples of {factor}, got "
                                  f"{height}x{width}")
    inst = dl.install(pipe, config=config)
    counters = runner = None
    try:
        if deleaker:
            cfg = config.replace(num_steps=steps).resolved(inst.blocks_per_step)
            counters = EditCounters(per_entity=[0] * max(4, len(entities)))
            if step_file is not None:
                from .onnx_step import OnnxStepRunner

                counting = StepCounting(counters, cfg, inst.blocks_per_step)
                counters.note = "rows counted at each step's last block (the history ONNX Runtime returns)"
                runner = OnnxStepRunner(pipe, step_file, on_step=counting.on_step)
            else:
                for m in family.attention_modules(pipe.transformer):
                    proc = m.processor.deleaker
                    proc.op = _Counting(proc, counters, cfg)
        request = dl.DeLeaker(tuple(entities), enabled=deleaker)
        with torch.no_grad():
            image = pipe(prompt=prompt, height=height, width=width, num_inference_steps=steps,
                         generator=torch.Generator(device).manual_seed(seed), output_type=output_type,
                         **guidance_kwargs(family, guidance), **{family.pipeline_kwargs_name: {"deleaker": request}}
                         ).images[0]
        history = inst.history
        if runner is not None and runner.calls != steps:
            raise FamilyGenerateError(f"{runner.calls} of {steps} DeLeaker steps ran in ONNX Runtime")
    finally:
        if runner is not None:
            runner.remove()
        dl.remove(pipe)
    if counters is not None:
        counters.per_entity = counters.per_entity[:len(entities)]
        counters.history_filled = [bool(history[-1, e].abs().sum() > 0) for e in range(len(entities))] \
            if history is not None else []
    return (image if output_type == "np" else np.asarray(image.convert("RGB"))), counters


def _artifact(args):
    """The family step artifact of --artifact, checked (one line for a missing source folder, a
    backend or device it cannot run on); sets args.model to its source folder."""
    from deleaker.runtime.family_artifact import load_family_artifact

    art = load_family_artifact(args.artifact)
    if args.backend not in (None, "onnxruntime"):
        raise FamilyGenerateError(f"{art.root} is a {art.family} step artifact: its steps run on onnxruntime, not "
                                  f"{args.backend}")
    if args.device != "cpu" or args.dtype not in (None, "fp32"):
        raise FamilyGenerateError(f"{art.root}: a family step artifact runs on the CPU in float32 (ONNX Runtime's "
                                  f"CPU provider), not --device {args.device} --dtype {args.dtype}")
    args.model = str(art.check_source())
    return art


def generate(args, entities: tuple, out: Path) -> int:
    """The `deleaker generate` command for a family folder or a family step artifact (args: its
    parsed options; --artifact: the pipeline from the artifact's source folder, its DeLeaker steps in
    ONNX Runtime from the artifact)."""
    from deleaker.runtime.images import display_scale, enlarge, save_png, side_by_side

    art = _artifact(args) if getattr(args, "artifact", None) else None
    family = family_of_folder(args.model)  # one line for an unsupported class, before any loading
    if art is None and args.backend not in (None, "torch"):
        raise FamilyGenerateError(f"{family.title} folders run on the torch backend only (their exported step runs on onnxruntime: "
                                  f"`deleaker-export onnx --model DIR --out ART`, then --artifact ART), not "
                                  f"{args.backend}")
    if args.attention != "reference" or args.compile or args.cuda_graphs == "on":
        raise FamilyGenerateError(f"{family.title}: --attention cuda, --compile and --cuda-graphs apply to FLUX.1; "
                                  f"this family runs the reference op in its diffusers pipeline")
    preset_name = args.preset or (art.deleaker.get("preset") if art else None) or family.preset
    cfg = preset(args.preset) if args.preset or art is None else DeLeakerConfig(**art.deleaker["config"])
    steps = args.steps if args.steps is not None else cfg.num_steps
    height = args.height if args.height is not None else (art.height if art else 256)
    width = args.width if args.width is not None else (art.width if art and args.height is None else height)
    if art is not None:
        art.check_size(height, width)
    if not args.no_deleaker and len(entities) < 2:
        log.warning("DeLeaker separates two or more entities; with %d it is plain attention", len(entities))
    t0 = time.perf_counter()
    components = art.components if art is not None else None  # (folder, names) or None
    family, pipe = load(args.model, args.device, args.dtype, without=tuple(components[1]) if components else ())
    if components:
        from deleaker.modeling.families.onnx_components import install_components

        install_components(pipe, components[0])
    log.info("%s (%s) loaded from %s in %.1fs; preset %s, %d steps, guidance %s (%s)", family.title,
             type(pipe).__name__, args.model, time.perf_counter() - t0, preset_name, steps,
             args.guidance, family.guidance)
    if art is not None:
        onnx = ", ".join(["the DeLeaker steps", *(components[1] if components else [])])
        torch_side = ["scheduler", *([] if components else ["text encoders", "VAE"]),
                      *(["the negative-prompt calls"] if family.guidance == CFG_SEPARATE else [])]
        log.info("ONNX Runtime runs %s from %s (%s, %dx%d, %d text tokens, batch %d); torch runs the %s from %s",
                 onnx, art.root, family.title, art.height, art.width, art.text_tokens, art.batch,
                 ", ".join(torch_side), args.model)
        if args.compare or args.no_deleaker:
            log.info("the vanilla image (DeLeaker off) runs the torch transformer: the step artifact holds DeLeaker "
                     "steps only")
    kw = dict(seed=args.seed, steps=steps, height=height, width=width, guidance=args.guidance, config=cfg,
              device=args.device, step_file=art.step_path if art is not None else None)
    runs = [(False, "vanilla"), (True, "DeLeaker")] if args.compare else [(not args.no_deleaker, None)]
    images = []
    for on, _ in runs:
        t = time.perf_counter()
        image, counters = run(pipe, family, args.prompt, entities, deleaker=on, **kw)
        images.append(image)
        if counters is not None:
            log.info("DeLeaker (%.1fs): %s; history filled for %s", time.perf_counter() - t,
                     counters.line(entities), [e for e, f in zip(entities, counters.history_filled) if f] or "none")
            if counters.masked_rows == 0:
                log.warning("DeLeaker edited nothing here: no entity mask covered an image row in its window "
                            "(%d steps of %d blocks)", steps, family.blocks_per_step(pipe.transformer))
    scale = args.scale if args.scale is not None else display_scale(height, width)
    if args.compare:
        delta = np.abs(images[0].astype(np.int16) - images[1].astype(np.int16))
        log.info("DeLeaker vs vanilla: mean |difference| %.3f, max %d (pixel levels 0-255)", delta.mean(), delta.max())
        picture = side_by_side(images, [f"{label} (seed {args.seed})" for _, label in runs], scale)
    else:
        picture = enlarge(images[0], scale)
    save_png(picture, out)
    log.info("wrote %s (%s, %dx%d, %d steps, %.1fs)", out, family.title, height, width, steps,
             time.perf_counter() - t0)
    return 0
