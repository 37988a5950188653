"""gpu_verify's model stages: the FLUX.1-dev-sized anchor step (eager, CUDA-graph replay,
compiled) and 20-step generations at batch 1, 2, 4. On a GPU: FLUX.1-dev sizes, bf16, vanilla
(stock diffusers SDPA) vs the fused op. Dry run: the same code on the CPU with a FLUX of tiny
widths (TINY_FLUX), fp32, vanilla vs the reference op.

Every DeLeaker row carries evidence that it edited: the harness's edit counters (eager) or the
mask coverage of the history the timed step wrote (graph, compiled, generations)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from deleaker.modeling.checkpoint import resolve_dtype

from .gpu_verify_result import NO_GPU, Result, failed, passed, skipped

# FLUX's block structure at tiny widths (the tiny offline model's sizes), for the dry run
TINY_FLUX = dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=16,
                 axes_dims_rope=(4, 6, 6), joint_attention_dim=32, pooled_projection_dim=32)


@dataclasses.dataclass(frozen=True)
class Sizes:
    device: str
    dtype: str
    impl: str  # the DeLeaker impl timed against "sdpa"
    overrides: dict  # transformer config changes (none: FLUX.1-dev)
    resolutions: tuple[int, ...]
    text_tokens: int
    plant_coverage: float
    gen_resolution: int
    gen_batches: tuple[int, ...]
    gen_steps: int
    warmup: int
    runs: int
    gen_runs: int


GPU = Sizes("cuda", "bf16", "cuda", {}, (512, 1024), 512, 0.14, 1024, (1, 2, 4), 20, 2, 5, 1)
DRY = Sizes("cpu", "fp32", "reference", TINY_FLUX, (256,), 64, 0.04, 128, (1, 2, 4), 20, 1, 3, 1)
STEPS = 20  # the DeLeaker windows are resolved for a 20-step schedule


def _sizes(dry: bool) -> Sizes | None:
    import torch

    if dry:
        return DRY
    return GPU if torch.cuda.is_available() else None


def _write(out: Path, name: str, rows: list[dict]) -> None:
    with open(out / name, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def _transformer(sz: Sizes):
    from . import models as M

    return M.random_flux_transformer("flux-dev", device=sz.device, dtype=resolve_dtype(sz.dtype), **sz.overrides)


# ---------------------------------------------------------------------------------------------
# anchor step


def anchor(out: Path, dry: bool, modes=("eager", "graph")) -> Result:
    """The step at each resolution, vanilla vs DeLeaker, in each of `modes`."""
    from . import models as M

    sz = _sizes(dry)
    if sz is None:
        return failed("torch sees no CUDA GPU")
    tr = _transformer(sz)
    plant = M.Plant(coverage=sz.plant_coverage)
    rows, numbers, problems, skips = [], {}, [], []
    for res in sz.resolutions:
        for mode in modes:
            if mode == "graph" and sz.device != "cuda":
                skips.append(f"graph: {NO_GPU}")
                continue
            got = MODES[mode](tr, sz, res, plant)
            rows += got
            _write(out, "rows.jsonl", rows)  # partial results survive a timeout
            _check(got, f"{res} {mode}", numbers, problems)
    if problems:
        return failed("; ".join(problems), **numbers)
    if not rows:
        return skipped("; ".join(skips), **numbers)
    return Result("passed", "; ".join(f"{s} (dry run)" for s in skips), numbers)


def anchor_compiled(out: Path, dry: bool) -> Result:
    if dry:  # measured: over 4 minutes for the tiny step on the 2-core CPU, past the dry run's limit
        return skipped("dry run: compiling the step takes minutes on a small CPU (tests/modeling/test_torch_graphs.py "
                       "checks a compiled step against eager on the CPU)")
    return anchor(out, dry, modes=("compiled",))


def _check(rows: list[dict], key: str, numbers: dict, problems: list) -> None:
    """Key numbers of one (resolution, mode); problems when a row failed or DeLeaker did not edit."""
    for r in rows:
        if r.get("status") != "ok":
            problems.append(f"{key} {r['label']}: {r.get('status')} {r.get('note')}")
            continue
        if r["variant"] != "deleaker":
            continue
        numbers[f"{key} ratio"] = r["ratio_vs_vanilla"]
        numbers[f"{key} ms"] = round(r["step_median_s"] * 1e3, 2)
        if r.get("extra_device_mib_vs_vanilla") is not None:
            numbers[f"{key} extra MiB"] = r["extra_device_mib_vs_vanilla"]
        ec = r.get("edit_counters")
        if ec is not None:
            numbers[f"{key} edited blocks"] = ec.get("edited_blocks")
            if not ec.get("edited_blocks") or not ec.get("masked_rows"):
                problems.append(f"{key}: the DeLeaker step edited nothing ({ec})")
        cov = r.get("mask_coverage")
        numbers[f"{key} coverage"] = cov
        if not cov or not all(c > 0 for c in cov):
            problems.append(f"{key}: the timed step's history gives empty masks ({cov})")


def _eager(tr, sz: Sizes, res: int, plant) -> list[dict]:
    from . import harness

    rows = harness.bench_step_variants(tr, ("sdpa", sz.impl), height=res, width=res, text_tokens=sz.text_tokens,
                                       entities=2, steps=STEPS, warmup=sz.warmup, runs=sz.runs, plant=plant)
    for r in rows:
        r["exec"] = "eager"
    return rows


class _StepCase:
    """The harness's step inputs for one resolution, and the planted hooks, for modes the
    harness does not time itself (graph replay, compiled)."""

    def __init__(self, tr, sz: Sizes, res: int, plant):
        from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

        from . import harness, models as M

        self.dl = harness.as_deleaker_model(tr)
        self.cfg = harness.resolve_config(None, STEPS, self.dl.blocks_per_step)
        self.step = M.busiest_step(self.cfg)
        c = tr.config
        self.arrays = M.step_arrays(batch=1, height=res, width=res, text_tokens=sz.text_tokens,
                                    in_channels=c.in_channels, text_dim=c.joint_attention_dim,
                                    pooled_dim=c.pooled_projection_dim, guidance=bool(c.guidance_embeds), entities=2,
                                    slots=DEFAULT_ENTITY_SLOTS, step=self.step, config=self.cfg)
        p = next(tr.parameters())
        self.device = p.device
        self.args = M.torch_step_args(self.arrays, p.device, p.dtype)
        self.grid = tuple(int(x) for x in self.arrays["grid"])
        self.hooks = M.PlantedHooks(tr, plant, self.args[7], self.grid, 2)
        self.case = dict(mode="step", backend="torch", height=res, width=res, batch_size=1,
                         text_tokens=sz.text_tokens, entities=2, steps=STEPS, step=self.step, device=str(p.device),
                         dtype=str(p.dtype).replace("torch.", ""), warmup=sz.warmup, runs=sz.runs)

    def processors(self, impl: str) -> list:
        """`impl`'s processor objects, made once (a compiled step guards on them)."""
        from . import models as M

        M.set_attention(self.dl, impl)
        return [b.attn.processor for b in self._blocks()]

    def install(self, procs: list) -> None:
        for b, p in zip(self._blocks(), procs):
            b.attn.processor = p

    def _blocks(self):
        tr = self.dl.transformer
        return list(tr.transformer_blocks) + list(tr.single_transformer_blocks)

    def rows(self, variants, exec_name: str, extra: dict) -> list[dict]:
        from . import harness, models as M

        rows = []
        for v in variants:
            impl = v.name
            base = {**self.case, "impl": impl, "label": M.IMPL_LABELS[impl], "exec": exec_name,
                    "variant": "vanilla" if impl == "sdpa" else "deleaker", **extra.get(impl, {})}
            if v.error:
                rows.append({**base, "status": "error", "note": v.error})
                continue
            r = {**base, "status": "ok", "note": "", **harness._timing_fields(v.samples, v.timer),
                 **v.memory.fields()}
            hist = v.last[1].float().cpu().numpy()
            r["mask_coverage"] = (M.mask_coverage(hist, 2, self.cfg.std_mul_text, self.grid, self.cfg.do_smoothing)
                                  if impl != "sdpa" else None)
            rows.append(r)
        return harness.add_ratios(rows)

    def close(self) -> None:
        self.hooks.remove()


def _max_diff(a, b) -> float:
    return float((a[0].float() - b[0].float()).abs().max())


def _graph(tr, sz: Sizes, res: int, plant) -> list[dict]:
    """Each impl's step captured in a CUDA graph over static inputs, replays timed interleaved;
    each replay's output compared with its eager step."""
    import torch

    from .harness import Variant, measure_interleaved

    c = _StepCase(tr, sz, res, plant)
    try:
        variants, extra = [], {}
        for impl in ("sdpa", sz.impl):
            c.processors(impl)
            with torch.inference_mode():
                eager = c.dl(*c.args)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        c.dl(*c.args)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    static = c.dl(*c.args)
                g.replay()
                torch.cuda.synchronize()
                extra[impl] = {"replay_vs_eager_max_diff": _max_diff(static, eager)}

            def run(g=g, static=static):
                g.replay()
                return static

            variants.append(Variant(impl, lambda: None, run))
        measure_interleaved(variants, sz.warmup, sz.runs, c.device)
        return c.rows(variants, "graph", extra)
    finally:
        c.close()


def _compiled(tr, sz: Sizes, res: int, plant) -> list[dict]:
    """torch.compile of the whole DeLeaker step, per impl (its processor objects installed
    before each call, so each impl's compiled graph stays valid); first call timed as compile,
    output compared with the eager step, then timed interleaved."""
    import time

    import torch
    import torch._dynamo

    from .harness import Variant, measure_interleaved

    c = _StepCase(tr, sz, res, plant)
    try:
        variants, extra = [], {}
        torch._dynamo.reset()
        fn = torch.compile(c.dl)
        for impl in ("sdpa", sz.impl):
            procs = c.processors(impl)
            with torch.inference_mode():
                eager = c.dl(*c.args)
                t0 = time.perf_counter()
                first = fn(*c.args)
                if c.device.type == "cuda":
                    torch.cuda.synchronize()
                extra[impl] = {"compile_s": round(time.perf_counter() - t0, 1),
                               "compiled_vs_eager_max_diff": _max_diff(first, eager)}

            @torch.inference_mode()
            def run():
                return fn(*c.args)

            variants.append(Variant(impl, lambda procs=procs: c.install(procs), run))
        measure_interleaved(variants, sz.warmup, sz.runs, c.device)
        from torch._dynamo.utils import counters

        for impl in extra:
            extra[impl]["graph_breaks"] = sum(counters["graph_break"].values())
            extra[impl]["unique_graphs"] = counters["stats"]["unique_graphs"]
        return c.rows(variants, "compiled", extra)
    finally:
        c.close()


MODES = {"eager": _eager, "graph": _graph, "compiled": _compiled}


# ---------------------------------------------------------------------------------------------
# generations


def generation_backend(sz: Sizes):
    """A torch backend whose transformer is FLUX.1-dev-sized (random weights; `sz.overrides`
    shrink it), with the tiny offline model's text encoders, tokenizers and VAE (their sizes set
    the transformer's text and pooled widths). Eager steps, so each variant's processors run."""
    import torch

    from deleaker.modeling.checkpoint import load_checkpoint
    from deleaker.modeling.tiny_model import PRESETS, ensure_tiny_model
    from deleaker.modeling.torch_backend import TorchBackend

    from . import models as M

    dtype = resolve_dtype(sz.dtype)
    tiny = PRESETS["tiny"]
    parts = load_checkpoint(ensure_tiny_model(), dtype=torch.float32)
    tr = M.random_flux_transformer("flux-dev", device=sz.device, dtype=dtype,
                                   **{**sz.overrides, "joint_attention_dim": tiny.t5_d_model,
                                      "pooled_projection_dim": tiny.clip_hidden})
    models = dataclasses.replace(parts, transformer=tr, dtype=dtype, vae=parts.vae.to(dtype))
    return TorchBackend(models, device=sz.device, op=sz.impl, cuda_graphs=False, max_text_tokens=sz.text_tokens)


def generate(out: Path, dry: bool) -> Result:
    """gen_steps-step generations at gen_resolution, batch 1, 2, 4: images/s of vanilla and
    DeLeaker (settings flux-dev without smoothing: random weights make noise maps, which the 3x3
    opening would erase; the mask coverage of each DeLeaker row shows it edited)."""
    from deleaker.runtime.config import preset
    from deleaker.runtime.pipeline import Pipeline

    from . import harness

    sz = _sizes(dry)
    if sz is None:
        return failed("torch sees no CUDA GPU")
    cfg = preset("flux-dev", do_smoothing=False).replace(num_steps=sz.gen_steps)
    pipe = Pipeline(generation_backend(sz), config=cfg, max_batch=max(sz.gen_batches))
    rows, numbers, problems = [], {}, []
    for b in sz.gen_batches:
        got = harness.bench_generate_variants(pipe, ("sdpa", sz.impl), prompt="a cat and a cheetah in a field",
                                              entities=("cat", "cheetah"), height=sz.gen_resolution,
                                              width=sz.gen_resolution, steps=sz.gen_steps, batch_size=b, warmup=1,
                                              runs=sz.gen_runs, config=cfg)
        rows += got
        _write(out, "rows.jsonl", rows)
        for r in got:
            if r.get("status") != "ok":
                problems.append(f"b{b} {r['label']}: {r.get('status')} {r.get('note')}")
                continue
            numbers[f"b{b} {r['variant']} img/s"] = round(r["images_per_s"], 3)
            if r["variant"] == "deleaker":
                numbers[f"b{b} ratio"] = r["ratio_vs_vanilla"]
                if not r["mask_coverage"] or not all(c > 0 for c in r["mask_coverage"]):
                    problems.append(f"b{b}: DeLeaker's masks are empty ({r['mask_coverage']})")
    if problems:
        return failed("; ".join(problems), **numbers)
    return passed(**numbers)
