"""Measurements, variants side by side: a transformer step (torch module or any Backend) or a
whole generation. Each returns flat dicts, one per variant (one JSON line each; fields in
docs/benchmarks.md), with ratio_vs_vanilla filled in.

Variants of one case are measured interleaved: each variant first runs its warm-up alone
(peak memory is measured there), then the timed runs go round-robin (A B C, B C A, C A B,
...), so a load change on the machine hits every variant alike and the ratio stays fair.

Usable from scripts, e.g. the GPU check:

    from deleaker.benchmarks.harness import bench_step_variants
    from deleaker.benchmarks.models import random_flux_transformer
    tr = random_flux_transformer("flux-dev", device="cuda", dtype=torch.bfloat16)
    rows = bench_step_variants(tr, ("sdpa", "reference", "cuda"), height=1024, width=1024)
    # rows[i]["step_median_s"], ["ratio_vs_vanilla"], ["peak_device_mib"], ["status"], ["note"],
    # DeLeaker rows also ["mask_coverage"] and ["edit_counters"] (read after the timing)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from deleaker.runtime import latents as lat
from deleaker.runtime.step_io import DEFAULT_ENTITY_SLOTS

from .measure import PeakMemory, summarize, time_runs

log = logging.getLogger("deleaker.bench")



# ---------------------------------------------------------------------------------------------
# The interleaved measuring loop


@dataclass
class Variant:
    """One thing to time: setup() switches to it (cheap, untimed), run() is one timed call."""

    name: str
    setup: Callable[[], None]
    run: Callable[[], object]
    samples: list[float] = field(default_factory=list)
    timer: str = ""
    memory: PeakMemory | None = None
    last: object = None  # run()'s last return value
    error: str | None = None  # set when its warm-up failed (it is then left out of the timing)


def measure_interleaved(variants: list[Variant], warmup: int, runs: int, device=None) -> None:
    """Warm up each variant alone under PeakMemory (warmup >= 1), then `runs` timed rounds,
    one run of every variant per round, the order rotated each round. Fills the variants.
    A variant whose warm-up raises gets .error and is left out (the others still run)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (peak memory is measured on the warm-up runs), got {warmup}")
    for v in variants:
        try:
            v.setup()
            with PeakMemory(device) as mem:
                for _ in range(warmup):
                    v.last = v.run()
            v.memory = mem
        except Exception as e:  # noqa: BLE001 - e.g. out of memory in one variant: keep the others
            log.debug("variant %s failed in warm-up", v.name, exc_info=True)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            v.error = f"{type(e).__name__}: {msg}"
            v.last = None
            _free_device_memory()
    ok = [v for v in variants if v.error is None]
    n = len(ok)
    for r in range(runs if n else 0):
        for v in ok[r % n:] + ok[:r % n]:
            v.setup()

            def call(v=v):
                v.last = v.run()

            (t,), v.timer = time_runs(call, 0, 1, device)
            v.samples.append(t)


def _free_device_memory() -> None:
    import sys

    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _skipped(base: dict, note: str) -> dict:
    return {**base, "status": "skipped", "note": note}


def _failed(base: dict, v: Variant) -> dict:
    return {**base, "status": "error", "note": v.error}


def _timing_fields(samples: list[float], timer: str) -> dict:
    s = summarize(samples)
    return {"timer": timer, **{f"step_{k}": v for k, v in s.items()}, "step_samples_s": [float(x) for x in samples]}


def _case_fields(*, height, width, batch_size, text_tokens, entities, entity_slots, steps, step, warmup, runs,
                 vae_scale_factor=lat.VAE_SCALE_FACTOR) -> dict:
    geo = lat.geometry(height, width, vae_scale_factor)
    return {"height": height, "width": width, "image_tokens": geo.image_seq_len, "text_tokens": text_tokens,
            "batch_size": batch_size, "entities": entities, "entity_slots": entity_slots, "steps": steps,
            "step": step, "warmup": warmup, "runs": runs}


def _trace_name(rec: dict) -> str:
    return (f"{rec['mode']}-{rec['backend']}-{rec['label']}-{rec['width']}x{rec['height']}-b{rec['batch_size']}"
            f"-e{rec['entities']}.json")


def _profile(v: Variant, device, out_dir: Path, name: str, n: int) -> str:
    """Run variant `v` `n` more times under torch.profiler and write a chrome trace (open in
    chrome://tracing or https://ui.perfetto.dev). Returns its path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device is not None and getattr(device, "type", "") == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out_dir.mkdir(parents=True, exist_ok=True)
    v.setup()
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(n):
            v.run()
        if cuda:
            torch.cuda.synchronize(device)
    path = out_dir / name
    prof.export_chrome_trace(str(path))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Transformer step, torch module


def as_deleaker_model(model):
    """A DeLeakerFlux for `model` (a FluxTransformer2DModel, or a DeLeakerFlux returned as is)."""
    from deleaker.modeling.flux import DeLeakerFlux

    return model if isinstance(model, DeLeakerFlux) else DeLeakerFlux(model, op_name="reference")


def resolve_config(config, steps: int | None, blocks_per_step: int):
    """The DeLeaker settings of a benchmark case: `config` (default: flux-dev) for `steps` steps."""
    from deleaker.runtime.config import DeLeakerConfig

    cfg = config or DeLeakerConfig()
    if steps is not None:
        cfg = cfg.replace(num_steps=steps)
    return cfg.resolved(blocks_per_step)


def bench_step_variants(model, impls: Sequence[str] = ("sdpa", "reference", "cuda"), *, height: int = 512,
                        width: int = 512, batch_size: int = 1, text_tokens: int = 512, entities: int = 2,
                        entity_slots: int = DEFAULT_ENTITY_SLOTS, config=None, steps: int | None = None,
                        step: int | None = None, warmup: int = 2, runs: int = 5, seed: int = 0,
                        profile_dir: str | Path | None = None, profile_runs: int = 2, plant=None,
                        counters: bool = True) -> list[dict]:
    """Time one transformer forward (one denoising step) of a torch FLUX model for each impl in
    every joint attention: "sdpa" (stock diffusers attention, the vanilla baseline),
    "reference" (DeLeaker, reference op), "cuda" (DeLeaker, fused op), "inactive" (reference
    op with no active entity). Same weights, same inputs, interleaved runs.

    model: FluxTransformer2DModel or DeLeakerFlux, already on its device and dtype.
    config/steps: DeLeaker settings and the step count its windows are resolved for.
    step: denoising step index (default: the busiest DeLeaker step of the config).
    Inputs are synthetic (models.step_arrays) and stay on the device; nothing is copied per run.
    plant: a models.Plant (spatially coherent entity attention for random weights, the same in
    every variant) or None. counters: after the timing, one more forward per DeLeaker impl
    records the op's edit counters (models.step_edit_counters) as `edit_counters`.
    An impl that cannot run here (the fused op without its library or GPU) gives a record with
    status "skipped" and the reason in note."""
    import torch

    from . import models as M

    dl = as_deleaker_model(model)
    cfg = resolve_config(config, steps, dl.blocks_per_step)
    p = next(dl.transformer.parameters())
    device, dtype = p.device, p.dtype
    step = M.busiest_step(cfg) if step is None else int(step)
    tcfg = dl.transformer.config
    case = _case_fields(height=height, width=width, batch_size=batch_size, text_tokens=text_tokens,
                        entities=entities, entity_slots=entity_slots, steps=cfg.num_steps, step=step, warmup=warmup,
                        runs=runs)

    def base(impl):
        return {"mode": "step", "backend": "torch", "impl": impl, "label": M.IMPL_LABELS.get(impl, impl),
                "variant": "deleaker" if impl in ("reference", "cuda") else "vanilla", "device": str(device),
                "dtype": str(dtype).replace("torch.", ""), **case}

    arrays = M.step_arrays(batch=batch_size, height=height, width=width, text_tokens=text_tokens,
                           in_channels=tcfg.in_channels, text_dim=tcfg.joint_attention_dim,
                           pooled_dim=tcfg.pooled_projection_dim, guidance=bool(tcfg.guidance_embeds),
                           entities=entities, slots=entity_slots, step=step, config=cfg, seed=seed)
    args = M.torch_step_args(arrays, device, dtype)
    inactive_args = args[:7] + (torch.zeros_like(args[7]),) + args[8:]  # no active entity slot

    def variant(impl):
        a = inactive_args if impl == "inactive" else args

        @torch.inference_mode()
        def run():
            return dl(*a)

        return Variant(impl, lambda: M.set_attention(dl, impl), run)

    skipped = {impl: M.check_impl_available(impl, device) for impl in impls}
    variants = [variant(impl) for impl in impls if not skipped[impl]]
    hooks = (M.PlantedHooks(dl.transformer, plant, args[7], tuple(int(x) for x in arrays["grid"]), entities)
             if plant is not None else None)
    try:
        measure_interleaved(variants, warmup, runs, device)
        edit_counters = {v.name: _edit_counters(dl, v.name, args) for v in variants  # after the timing
                         if counters and v.error is None and v.name in ("reference", "cuda")}
        rows = _step_rows(impls, skipped, variants, base, cfg, batch_size, entities, arrays, device, profile_dir,
                          profile_runs)
    finally:
        if hooks is not None:
            hooks.remove()
    for r in rows:
        if r["status"] == "ok":
            r["plant"] = None if plant is None else {"coverage": plant.coverage, "boost": plant.boost}
            if r["impl"] in ("reference", "cuda"):
                r["edit_counters"] = edit_counters.get(r["impl"])
    return add_ratios(rows)


def _edit_counters(dl, impl: str, args: tuple) -> dict:
    from . import models as M

    try:
        return M.step_edit_counters(dl, impl, args)
    except Exception as e:  # noqa: BLE001 - e.g. out of memory in the extra forward: the timing stands
        log.debug("edit counters of %s failed", impl, exc_info=True)
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}


def step_records(impls, skipped: dict, variants: list[Variant], base, num_steps: int, batch_size: int):
    """(record, Variant) per impl of a step case: skipped (reason in skipped[impl]), failed in
    warm-up, or timed (status ok, timing, memory, images/s; its Variant to read more from)."""
    by_name = {v.name: v for v in variants}
    for impl in impls:
        if skipped[impl]:
            yield _skipped(base(impl), skipped[impl]), None
            continue
        v = by_name[impl]
        if v.error:
            yield _failed(base(impl), v), None
            continue
        rec = {**base(impl), "status": "ok", "note": "", **_timing_fields(v.samples, v.timer), **v.memory.fields()}
        rec["images_per_s"] = batch_size / (num_steps * rec["step_median_s"])
        yield rec, v


def _step_rows(impls, skipped, variants, base, cfg, batch_size, entities, arrays, device, profile_dir,
               profile_runs) -> list[dict]:
    from . import models as M

    rows = []
    for rec, v in step_records(impls, skipped, variants, base, cfg.num_steps, batch_size):
        if v is None:
            rows.append(rec)
            continue
        impl = v.name
        hist = v.last[1].float().cpu().numpy()
        rec["mask_coverage"] = (M.mask_coverage(hist, entities, cfg.std_mul_text, tuple(arrays["grid"]),
                                                cfg.do_smoothing) if impl in ("reference", "cuda") else None)
        if profile_dir is not None:
            rec["profile_trace"] = _profile(v, device, Path(profile_dir), _trace_name(rec), profile_runs)
        rows.append(rec)
    return rows


def bench_transformer_step(model, impl: str = "reference", **kw) -> dict:
    """bench_step_variants for one impl (no ratio: there is no vanilla beside it)."""
    return bench_step_variants(model, (impl,), **kw)[0]


# ---------------------------------------------------------------------------------------------
# Transformer step, any Backend (numpy in, numpy out)


def _backend_label(variant: str) -> tuple[str, str]:
    """(impl, label) of a non-torch backend's variant: vanilla is the same engine, no slot active."""
    return ("engine", "deleaker") if variant == "deleaker" else ("inactive", "vanilla-inactive")


def bench_backend_step_variants(backend, variants: Sequence[str] = ("vanilla", "deleaker"), *, height: int = 128,
                                width: int = 128, batch_size: int = 1, entities: int = 2, steps: int = 20,
                                step: int = 0, warmup: int = 2, runs: int = 5, seed: int = 0,
                                config=None) -> list[dict]:
    """Time one step of a backend session (the device-resident loop's unit of work) for any backend.

    "vanilla": the same engine with every entity slot inactive (plain attention);
    "deleaker": `entities` synthetic slots active. Each variant gets its own session (synthetic
    noise, padding-token prompts, `config` as every sample's settings) and runs step `step` again
    and again; time_runs synchronises the device where there is one."""
    from deleaker.runtime.backends.base import SessionInputs

    from . import models as M

    for v in variants:
        if v not in ("vanilla", "deleaker"):
            raise M.BenchError(f"variant must be vanilla or deleaker, got {v!r}")
    info = backend.info
    if info.size_range is not None and not all(info.size_range[0] <= v <= info.size_range[1] for v in (height, width)):
        raise M.BenchError(f"{width}x{height} is outside the range this {backend.name} engine was exported for "
                           f"{list(info.size_range)}")
    cfg = resolve_config(config, steps, info.blocks_per_step)
    case = _case_fields(height=height, width=width, batch_size=batch_size, text_tokens=info.max_text_tokens,
                        entities=entities, entity_slots=info.entity_slots, steps=steps, step=step, warmup=warmup,
                        runs=runs, vae_scale_factor=info.vae_scale_factor)
    x = M.step_arrays(batch=batch_size, height=height, width=width, text_tokens=info.max_text_tokens,
                      in_channels=info.in_channels, text_dim=1, pooled_dim=1, guidance=info.guidance_embeds,
                      entities=entities, slots=info.entity_slots, step=step, config=cfg, seed=seed,
                      vae_scale_factor=info.vae_scale_factor)
    static = {k: x[k] for k in ("entity_tokens", "grid", "img_ids", "txt_ids", "guidance", "windows", "knobs",
                                "rules") if k in x}

    def session(deleaker: bool):
        st = static if deleaker else {**static, "entity_tokens": np.zeros_like(static["entity_tokens"])}
        return backend.start_session(SessionInputs(
            clip_ids=np.zeros((batch_size, info.clip_max_length), np.int64),  # [B, 77]
            t5_ids=np.zeros((batch_size, info.max_text_tokens), np.int64),  # [B, T]
            static=st, latents=x["hidden_states"], history=x["history"],
            timesteps=np.full((steps,), 0.5, np.float32), sigmas=np.linspace(1, 0, steps + 1, dtype=np.float32)))

    sessions = {v: session(v == "deleaker") for v in variants}
    device = backend.device if backend.torch_tensors else None  # torch's CUDA timers see only torch work
    vs = [Variant(v, lambda: None, (lambda s=sessions[v]: s.step(step))) for v in variants]
    measure_interleaved(vs, warmup, runs, device)
    rows = []
    for v in vs:
        impl, label = _backend_label(v.name)
        base = {"mode": "step", "backend": backend.name, "impl": impl, "label": label, "variant": v.name,
                "device": str(backend.device), "dtype": str(backend.dtype), **case}
        if v.error:
            rows.append(_failed(base, v))
            continue
        rec = {**base, "status": "ok", "note": "", **_timing_fields(v.samples, v.timer), **v.memory.fields()}
        rec["images_per_s"] = batch_size / (steps * rec["step_median_s"])
        hist = sessions[v.name].result()[1]
        rec["mask_coverage"] = (M.mask_coverage(hist, entities, cfg.std_mul_text, tuple(x["grid"]), cfg.do_smoothing)
                                if v.name == "deleaker" else None)
        rows.append(rec)
    return add_ratios(rows)


# ---------------------------------------------------------------------------------------------
# End to end


def bench_generate_variants(pipeline, impls: Sequence[str] | None = None, *, prompt: str,
                            entities: Sequence[str], height: int = 128, width: int = 128, steps: int = 2,
                            batch_size: int = 1, seed: int = 0, warmup: int = 1, runs: int = 3, config=None,
                            profile_dir: str | Path | None = None) -> list[dict]:
    """Time whole generations (tokenize, encode, S steps, decode) through runtime.Pipeline: one
    batch of `batch_size` requests (seeds seed, seed+1, ...) per run, in one session.

    impls, a backend whose attention can be switched (attention_impls: the torch backend): "sdpa"
    (vanilla, stock diffusers attention), "reference", "cuda",
    "inactive" (default sdpa, reference); other backends: "inactive" (vanilla: the same engine
    with every slot inactive) and "engine" (DeLeaker)."""
    from deleaker.runtime.pipeline import GenerateRequest

    from . import models as M

    be = pipeline.backend
    switchable = bool(be.attention_impls)  # the loaded model's attention can be switched (the torch backend's)
    impls = tuple(impls or (("sdpa", "reference") if switchable else ("inactive", "engine")))
    info = be.info
    device = be.device if switchable else None
    case = _case_fields(height=height, width=width, batch_size=batch_size, text_tokens=info.max_text_tokens,
                        entities=len(entities), entity_slots=info.entity_slots, steps=steps, step=None,
                        warmup=warmup, runs=runs, vae_scale_factor=info.vae_scale_factor)
    cfg = config or pipeline.config
    beta1 = cfg.std_mul_text

    def base(impl):
        deleaker = impl in ("reference", "cuda", "engine")
        label = M.IMPL_LABELS.get(impl, impl) if switchable else _backend_label("deleaker" if deleaker else "vanilla")[1]
        return {"mode": "e2e", "backend": be.name, "impl": impl, "label": label,
                "variant": "deleaker" if deleaker else "vanilla", "device": str(be.device),
                "dtype": str(be.dtype).replace("torch.", ""), "prompt": prompt,
                "entity_words": list(entities), **case}

    req = {d: [GenerateRequest(prompt=prompt, entities=tuple(entities), seed=seed + b, steps=steps, height=height,
                               width=width, deleaker=d, config=cfg) for b in range(batch_size)] for d in (False, True)}
    pipeline.check(req[True][0])
    skipped = {impl: (M.check_impl_available(impl, device) if switchable else None) for impl in impls}

    results: dict[str, list] = {impl: [] for impl in impls}

    def variant(impl):
        r = req[impl in ("reference", "cuda", "engine")]

        def run():
            out = pipeline.generate(r, progress=False)
            if switchable and M.attention_impl(be.model) != ("reference" if impl == "inactive" else impl):
                raise M.BenchError("the backend replaced the attention processors during generate()")
            results[impl].append(out)  # warm-up and timed runs, in order
            return out

        setup = (lambda: M.set_attention(be.model, impl)) if switchable else (lambda: None)
        return Variant(impl, setup, run)

    vs = [variant(impl) for impl in impls if not skipped[impl]]
    measure_interleaved(vs, warmup, runs, None)  # generate() returns host arrays: it is synchronous
    rows = []
    for impl in impls:
        if skipped[impl]:
            rows.append(_skipped(base(impl), skipped[impl]))
            continue
        v = next(v for v in vs if v.name == impl)
        if v.error:
            rows.append(_failed(base(impl), v))
            continue
        timed = [batch[0] for batch in results[impl][warmup:]]  # one result per run (batch wall time)
        secs = [r.seconds for r in timed]
        rec = {**base(impl), "status": "ok", "note": "",
               **_timing_fields([s for r in timed for s in r.step_seconds], "perf_counter"), **v.memory.fields()}
        rec["seconds_per_image"] = float(np.median(secs)) / batch_size
        rec["seconds_per_image_p10"] = float(np.percentile(secs, 10)) / batch_size
        rec["seconds_per_image_p90"] = float(np.percentile(secs, 90)) / batch_size
        rec["images_per_s"] = 1.0 / rec["seconds_per_image"]
        grid = lat.geometry(height, width, info.vae_scale_factor).grid
        rec["mask_coverage"] = (M.mask_coverage(timed[-1].history[None], len(entities), beta1, grid, cfg.do_smoothing)
                                if rec["variant"] == "deleaker" else None)
        if profile_dir is not None and switchable:
            rec["profile_trace"] = _profile(v, device, Path(profile_dir), _trace_name(rec), 1)
        rows.append(rec)
    return add_ratios(rows)


# ---------------------------------------------------------------------------------------------
# Side by side


CASE_KEYS = ("mode", "backend", "model", "device", "dtype", "height", "width", "text_tokens", "batch_size",
             "entities", "steps", "step")
BASELINES = ("vanilla", "vanilla-inactive")  # preferred order of the ratio's denominator


def case_key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in CASE_KEYS)


def add_ratios(rows: Iterable[dict]) -> list[dict]:
    """Fill baseline, ratio_vs_vanilla (time over the case's vanilla time: step median in step
    mode, seconds per image end to end) and extra_device_mib_vs_vanilla, for every ok row."""
    rows = list(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(case_key(r), []).append(r)
    for group in groups.values():
        ok = {r["label"]: r for r in group if r.get("status") == "ok"}
        base = next((ok[b] for b in BASELINES if b in ok), None)
        for r in group:
            r["baseline"] = base["label"] if base else None
            r["ratio_vs_vanilla"] = None
            r["extra_device_mib_vs_vanilla"] = None
            if base is None or r.get("status") != "ok":
                continue
            key = "seconds_per_image" if r["mode"] == "e2e" else "step_median_s"
            r["ratio_vs_vanilla"] = round(r[key] / base[key], 4)
            if r.get("peak_device_mib") is not None and base.get("peak_device_mib") is not None:
                r["extra_device_mib_vs_vanilla"] = round(r["peak_device_mib"] - base["peak_device_mib"], 1)
    return rows
