"""`deleaker-bench` step mode on a model family other than FLUX.1 (SD3/3.5, Qwen-Image, FLUX.2).

One transformer of the family (its diffusers folder), its joint attentions switched per variant,
same weights, same inputs, interleaved runs (harness.measure_interleaved):
  sdpa       the family's own diffusers attention processors (vanilla)
  reference  the family's DeLeaker processors (modeling/families), `entities` slots active
  inactive   the same DeLeaker processors with no active slot (the op as plain attention)
Inputs are the family adapter's synthetic step inputs (Family.step_inputs, seeded) and
models.synthetic_entity_tokens over the family's joint text (which text positions are entities
does not change the work).

Planted entities (models.Plant) for random weights: the family processors hand the op q and k in
the model's token order, so the plant is written there, at the image rows and text rows the
family's layout puts them (op_schema.segment_starts): entity e's block of image queries and its
text keys share a component on head dim e. The stock processors expose no q and k: vanilla runs
the unplanted model (the same amount of work; its output is not compared). The plant writes a
few rows in place, a negligible cost inside the DeLeaker variants' timing.

Edit counters: after the timing, one more forward with every DeLeaker op call counted as FLUX.1's
step mode counts them (op_bench.reference_counters, summarised by models._summarize_counters:
the same `edit_counters` fields), so a record proves what the timed op did.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from deleaker.modeling.families import Family, UnsupportedModel, family_of_folder, vae_scale_factor
from deleaker.modeling.flux import DeLeakerCall
from deleaker.modeling.reference_op import settings_tensors
from deleaker.runtime import op_schema
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from . import models as M
from .harness import Variant, _case_fields, add_ratios, measure_interleaved, resolve_config, step_records

log = logging.getLogger("deleaker.bench")

IMPLS = ("sdpa", "reference", "inactive")  # the fused op is FLUX.1's (text_image) only here


def model_family(source: str | None) -> Family | None:
    """The family of a bench --model folder when it is not FLUX.1 (None: FLUX.1, random:, the tiny
    default). An unsupported transformer class is refused in one line."""
    if source is None or source.startswith(M.RANDOM_PREFIX):
        return None
    family = family_of_folder(M.transformer_folder(source))  # UnsupportedModel names the supported families
    if family.name == "flux1":
        return None
    if family.step_inputs is None:
        raise UnsupportedModel(f"{family.title}: no benchmark step inputs defined")
    return family


def load_family_transformer(source: str, family: Family, device="cpu", dtype=torch.float32):
    """The family's transformer from a diffusers folder (or its transformer folder)."""
    import diffusers

    cls = getattr(diffusers, family.transformer_class)
    sub = M.transformer_folder(source)
    return cls.from_pretrained(sub, torch_dtype=dtype, low_cpu_mem_usage=False).to(device).eval()


def source_vae_scale_factor(source: str) -> int:
    """Pixels per latent of the folder's VAE (the model folder's vae/ when `source` has one, else 8)."""
    folder = Path(source).expanduser()
    return vae_scale_factor(folder if (folder / "vae").is_dir() else folder.parent)


class PlantedOp:
    """A DeLeaker processor's op with Plant written into its q and k (see the module docstring)."""

    def __init__(self, op, plant: M.Plant, regions: torch.Tensor, layout: int, head_dim: int):
        self.op, self.regions, self.layout = op, regions, layout  # regions [E, I] bool
        self.amp = (plant.boost * head_dim ** 0.5) ** 0.5  # q.k / sqrt(d) gains boost

    def __call__(self, q, k, v, ent, *rest):  # q, k, v [B, H, N, D] in the model's order
        grid = rest[2]
        T, I, N = ent.shape[-1], int(grid[0]) * int(grid[1]), q.shape[-2]
        starts = op_schema.segment_starts(self.layout, T, I, N)
        with torch.no_grad():
            for e in range(self.regions.shape[0]):
                rows = self.regions[e].nonzero().flatten().to(q.device) + starts["image"]
                q[:, :, rows, e] = self.amp  # set, not add: an even gain over the block
                toks = (ent[0, e] > 0).nonzero().flatten().to(k.device) + starts["text"]
                k[:, :, toks, e] = self.amp
        return self.op(q, k, v, ent, *rest)


def counting(op, layout: int, per_call: list):
    """`op` that also records each call's edit counters (op_bench.reference_counters: rows per
    entity mask, masked rows, cut pairs, per sample), from the reference op's per-sample code run
    on q, k, v put in the canonical order (text, image, excluded) as the op itself does."""
    from . import op_bench as ob

    def run(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs):
        T, I, N = ent.shape[-1], int(grid[0]) * int(grid[1]), q.shape[-2]
        order = torch.tensor(op_schema.canonical_order(layout, T, I, N), device=q.device)
        qc, kc, vc = (x.index_select(2, order) for x in (q, k, v))
        _, _, recs = ob.reference_run(qc, kc, vc, ent, hist, step, grid, windows, knobs, rules, attrs)
        per_call.append(ob.reference_counters(ent, recs))
        return op(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs)

    return run


def bench_family_step_variants(transformer, family: Family, impls: Sequence[str] = ("sdpa", "reference"), *,
                               height: int = 512, width: int = 512, vae_scale_factor: int = 8, batch_size: int = 1,
                               text_tokens: int = 512, entities: int = 2, entity_slots: int = DEFAULT_ENTITY_SLOTS,
                               config=None, steps: int | None = None, step: int | None = None, warmup: int = 2,
                               runs: int = 5, seed: int = 0, plant: M.Plant | None = None,
                               counters: bool = True) -> list[dict]:
    """Time one forward of a family transformer per impl (sdpa, reference, inactive; module
    docstring). Records as harness.bench_step_variants', plus family and layout; DeLeaker rows
    carry mask_coverage and edit_counters. config: the DeLeaker settings (default: the family's
    preset), resolved for `steps` and the family's blocks per step."""
    from deleaker.runtime import latents as lat
    from deleaker.runtime.config import preset

    modules = family.attention_modules(transformer)
    bps = len(modules)
    cfg = resolve_config(config if config is not None else preset(family.preset), steps, bps)
    p = next(transformer.parameters())
    device, dtype = p.device, p.dtype
    step = M.busiest_step(cfg) if step is None else int(step)
    geo = lat.geometry(height, width, vae_scale_factor)
    case = _case_fields(height=height, width=width, batch_size=batch_size, text_tokens=text_tokens,
                        entities=entities, entity_slots=entity_slots, steps=cfg.num_steps, step=step, warmup=warmup,
                        runs=runs, vae_scale_factor=vae_scale_factor)
    inputs = family.step_inputs(transformer, batch_size, geo.grid, text_tokens,
                                torch.Generator().manual_seed(seed))
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    ent = torch.from_numpy(M.synthetic_entity_tokens(batch_size, entity_slots, text_tokens, entities)).to(device)
    windows, knobs, rules = settings_tensors([cfg] * batch_size, device)
    grid = torch.tensor(geo.grid, dtype=torch.long, device=device)

    def call(active: bool) -> DeLeakerCall:  # fresh each run: the processors replace its history
        return DeLeakerCall(entity_tokens=ent if active else torch.zeros_like(ent),
                            history=torch.zeros(batch_size, entity_slots, geo.image_seq_len, device=device),
                            step=torch.tensor(step, device=device), grid=grid, windows=windows, knobs=knobs,
                            rules=rules)

    stock = [m.processor for m in modules]
    deleaker = family.processors(transformer, "reference")
    ops = [proc.op for proc in deleaker]
    regions = head_dim = None
    if plant is not None:
        plant.validate(entities)
        regions = M.plant_regions(geo.grid, entities, plant.coverage)  # [E, I]
        head_dim = modules[0].inner_dim // modules[0].heads
        if entities > head_dim:
            raise M.BenchError(f"planting {entities} entities needs as many head dims; this model has {head_dim}")

    def set_ops(wrap=lambda op: op):  # each DeLeaker op, wrapped (counting), under the plant
        for proc, op in zip(deleaker, ops):
            proc.op = wrap(op) if plant is None else PlantedOp(wrap(op), plant, regions, family.layout_code, head_dim)

    set_ops()

    def use(procs):
        for m, proc in zip(modules, procs, strict=True):
            m.set_processor(proc)

    def variant(impl: str) -> Variant:
        @torch.inference_mode()
        def run():
            if impl == "sdpa":
                return transformer(**inputs, return_dict=False)[0], None
            c = call(impl == "reference")
            out = transformer(**inputs, **family.call_kwargs(c), return_dict=False)[0]
            return out, c.history

        return Variant(impl, lambda: use(stock if impl == "sdpa" else deleaker), run)

    def base(impl):
        return {"mode": "step", "backend": "torch", "impl": impl, "label": M.IMPL_LABELS.get(impl, impl),
                "variant": "deleaker" if impl == "reference" else "vanilla", "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), "family": family.name, "layout": family.layout, **case}

    skipped = {impl: None if impl in IMPLS else
               f"{family.title} runs the reference op here (the fused op is checked on FLUX.1 only)" for impl in impls}
    variants = [variant(impl) for impl in impls if not skipped[impl]]
    try:
        measure_interleaved(variants, warmup, runs, device)
        per_call: list[list[dict]] = []
        if counters and any(v.name == "reference" and v.error is None for v in variants):
            use(deleaker)  # after the timing: one more forward with every op call counted
            set_ops(lambda op: counting(op, family.layout_code, per_call))
            try:
                with torch.inference_mode():
                    transformer(**inputs, **family.call_kwargs(call(True)), return_dict=False)
            finally:
                set_ops()
    finally:
        use(stock)
    taus = range(step * bps, (step + 1) * bps)
    note = ""
    if cfg.use_history and not any(cfg.start_aggregating_from <= t < cfg.stop_aggregating_at for t in taus):
        # the input history is zero (the state where aggregation starts): past the window it stays so
        note = (f"step {step} does not aggregate history at {cfg.num_steps} steps; with the zero input history "
                f"its masks are empty (pick --step or --steps so the step aggregates)")
    rows = []
    for rec, v in step_records(impls, skipped, variants, base, cfg.num_steps, batch_size):
        rows.append(rec)
        if v is None:
            continue
        rec["plant"] = None if plant is None else {"coverage": plant.coverage, "boost": plant.boost,
                                                   "where": "op inputs (DeLeaker impls)"}
        rec["mask_coverage"] = None
        if v.name == "reference":
            rec["note"] = note
            hist = v.last[1].float().cpu().numpy()
            rec["mask_coverage"] = M.mask_coverage(hist, entities, cfg.std_mul_text, geo.grid, cfg.do_smoothing)
            rec["edit_counters"] = {**M._summarize_counters(per_call), "source": "reference"} if per_call else None
    return add_ratios(rows)
