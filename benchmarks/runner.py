"""Run a BenchSpec: plan every measurement, load each backend once, measure with a progress bar,
label every record (machine, versions, random weights) and fill the vanilla ratios."""

from __future__ import annotations

import contextlib
import importlib
import logging
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from deleaker.modeling.checkpoint import resolve_dtype

from . import harness, models as M
from .presets import BenchSpec
from .report import environment

log = logging.getLogger("deleaker.bench")

SCHEMA = "deleaker-bench/1"


@dataclass(frozen=True)
class Case:
    """One side-by-side comparison: every impl of a backend on one size, batch, S and entity set."""

    backend: str
    mode: str
    width: int
    height: int
    batch_size: int
    steps: int
    entities: tuple[str, ...]
    impls: tuple[str, ...]  # torch: sdpa/reference/cuda/inactive; other backends: inactive/engine

    def describe(self) -> str:
        return (f"{self.mode} {self.backend} {self.width}x{self.height} b{self.batch_size} S{self.steps} "
                f"e{len(self.entities)}")


def default_impls(spec: BenchSpec, backend: str) -> tuple[str, ...]:
    if backend != "torch":
        return ("inactive", "engine")
    if spec.impls is not None:
        return spec.impls
    return ("sdpa", "reference", "cuda") if spec.device.startswith("cuda") else ("sdpa", "reference")


def plan(spec: BenchSpec) -> list[Case]:
    """Every case of the spec, grouped by backend (each backend is loaded once)."""
    cases, seen = [], set()
    for backend in spec.backends:
        impls = default_impls(spec, backend)
        for mode in spec.modes:
            batches = spec.batch_sizes
            for w, h in spec.resolutions:
                for b in batches:
                    for s in spec.steps:
                        for ents in spec.entity_sets:
                            # step mode only sees the entity count: one case per count
                            key = (backend, mode, w, h, b, s, len(ents) if mode == "step" else tuple(ents))
                            if key not in seen:
                                seen.add(key)
                                cases.append(Case(backend, mode, w, h, b, s, tuple(ents), impls))
    return cases


class _Loaded:
    """Lazily loaded models per backend: a torch transformer (step mode), a backend + Pipeline (e2e)."""

    def __init__(self, spec: BenchSpec):
        self.spec = spec
        self.cache: dict[tuple, object] = {}
        self.errors: dict[tuple, str] = {}

    def get(self, key: tuple, make: Callable[[], object]):
        if key in self.errors:
            raise _LoadError(self.errors[key])
        if key not in self.cache:
            try:
                with _quiet_hf():
                    self.cache[key] = make()
            except Exception as e:  # noqa: BLE001 - recorded as a skip for every item that needs it
                log.debug("loading %s failed", key, exc_info=True)
                self.errors[key] = f"{type(e).__name__}: {e}"
                raise _LoadError(self.errors[key]) from e
        return self.cache[key]

    def pipeline(self, backend: str):
        def make():
            from deleaker.runtime.backends import load_backend
            from deleaker.runtime.pipeline import Pipeline

            spec = self.spec
            if backend == "torch":
                if spec.model and spec.model.startswith(M.RANDOM_PREFIX):
                    raise M.BenchError(f"{spec.model} is a transformer only (no text encoders or VAE): "
                                       f"no end-to-end generation")
                be = load_backend("torch", M.torch_source(spec.model), device=spec.device, dtype=spec.dtype, progress=False,
                                  cuda_graphs=spec.cuda_graphs, compile=spec.compile)
            else:
                be = load_backend(backend, spec.artifact, device=spec.device, progress=False,
                                  **({"threads": spec.threads} if spec.threads else {}))
            return Pipeline(be, config=spec.deleaker_config(), max_batch=max(spec.batch_sizes))

        return self.get(("pipeline", backend), make)

    def family(self):
        """The --model folder's family when it is not FLUX.1 (benchmarks/family_step.py), else None."""
        from .family_step import model_family

        return model_family(self.spec.model)

    def family_transformer(self, family):
        from .family_step import load_family_transformer

        spec = self.spec
        return self.get(("family-transformer",), lambda: load_family_transformer(
            spec.model, family, device=spec.device, dtype=resolve_dtype(spec.dtype)))

    def transformer(self):
        """The torch transformer for step mode; shared with the e2e backend when one is loaded."""
        spec = self.spec
        if "e2e" in spec.modes and not (spec.model or "").startswith(M.RANDOM_PREFIX):
            # one copy of the weights: step mode times the e2e backend's own transformer
            return self.pipeline("torch").backend.model.transformer

        def make():  # device, dtype and model were checked by spec.validate()
            return M.load_flux_transformer(M.torch_source(spec.model), device=spec.device, dtype=resolve_dtype(spec.dtype))

        return self.get(("transformer",), make)


class _LoadError(RuntimeError):
    pass


@contextlib.contextmanager
def _quiet_hf():
    """diffusers/transformers loading chatter (accelerate hints, weight-loading bars) off while loading."""
    restore = []
    for mod in ("diffusers", "transformers"):
        try:
            lg = importlib.import_module(f"{mod}.utils.logging")
        except ImportError:
            continue
        level, bars = lg.get_verbosity(), lg.is_progress_bar_enabled()
        lg.set_verbosity_error()
        lg.disable_progress_bar()
        restore.append((lg, level, bars))
    try:
        yield
    finally:
        for lg, level, bars in restore:
            lg.set_verbosity(level)
            if bars:
                lg.enable_progress_bar()


def _step_index(spec: BenchSpec, steps: int, blocks_per_step: int, default_preset: str = "flux-dev") -> tuple[int, str]:
    if spec.step is not None:
        return spec.step, ""
    try:
        return M.busiest_step(spec.deleaker_config(steps, default_preset).resolved(blocks_per_step)), ""
    except ValueError as e:
        return 0, f"step 0: DeLeaker windows invalid for {blocks_per_step} blocks per step ({e})"


def _measure(case: Case, spec: BenchSpec, loaded: _Loaded, profile_dir) -> list[dict]:
    n_ent = len(case.entities)
    common = dict(height=case.height, width=case.width, warmup=spec.warmup, runs=spec.runs, seed=spec.seed)
    family = loaded.family() if case.backend == "torch" else None
    if family is not None and case.mode == "step":  # SD3/3.5, Qwen-Image, FLUX.2 (spec.validate: step only)
        from .family_step import bench_family_step_variants, source_vae_scale_factor

        tr = loaded.family_transformer(family)
        step, note = _step_index(spec, case.steps, family.blocks_per_step(tr), family.preset)
        rows = bench_family_step_variants(
            tr, family, case.impls, batch_size=case.batch_size, text_tokens=spec.text_tokens, entities=n_ent,
            entity_slots=spec.entity_slots, config=spec.deleaker_config(default_preset=family.preset),
            steps=case.steps, step=step, plant=M.plant_for(spec), vae_scale_factor=source_vae_scale_factor(spec.model),
            **common)
    elif case.backend == "torch" and case.mode == "step":
        tr = loaded.transformer()
        step, note = _step_index(spec, case.steps, _blocks_per_step(tr))
        rows = harness.bench_step_variants(
            tr, case.impls, batch_size=case.batch_size, text_tokens=spec.text_tokens, entities=n_ent,
            entity_slots=spec.entity_slots, config=spec.deleaker_config(), steps=case.steps, step=step,
            plant=M.plant_for(spec), profile_dir=profile_dir, **common)
    else:
        pipe = loaded.pipeline(case.backend)
        note = ""
        if case.mode == "step":
            step, note = _step_index(spec, case.steps, pipe.backend.info.blocks_per_step)
            variants = tuple("deleaker" if i == "engine" else "vanilla" for i in case.impls)
            rows = harness.bench_backend_step_variants(
                pipe.backend, variants, batch_size=case.batch_size, entities=n_ent, steps=case.steps, step=step,
                config=spec.deleaker_config(), **common)
        else:
            rows = harness.bench_generate_variants(
                pipe, case.impls, prompt=spec.prompt, entities=case.entities, steps=case.steps,
                batch_size=case.batch_size, config=spec.deleaker_config(),
                profile_dir=profile_dir if case.backend == "torch" else None, **common)
    for r in rows:
        r["note"] = "; ".join(x for x in (r.get("note"), note) if x)
    return rows


def _blocks_per_step(transformer) -> int:
    from deleaker.modeling.flux import blocks_per_step

    return blocks_per_step(transformer)


def _case_fields(case: Case, impl: str) -> dict:
    torch_be = case.backend == "torch"
    variant = "deleaker" if impl in ("reference", "cuda", "engine") else "vanilla"
    return {"mode": case.mode, "backend": case.backend, "impl": impl, "variant": variant,
            "label": M.IMPL_LABELS.get(impl, impl) if torch_be else harness._backend_label(variant)[1],
            "width": case.width, "height": case.height, "batch_size": case.batch_size, "steps": case.steps,
            "entities": len(case.entities)}


def run_spec(spec: BenchSpec, *, preset: str | None = None, progress: bool = True,
             profile_dir: str | Path | None = None, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Measure everything in `spec`; returns the records with ratio_vs_vanilla filled in.
    on_record gets each record as soon as it is measured (before ratios), e.g. to stream it."""
    spec.validate()
    cases = plan(spec)
    if spec.threads and any(b == "torch" for b in spec.backends):
        import torch

        torch.set_num_threads(spec.threads)
    env = environment(spec.device)
    common = {"schema": SCHEMA, "run_id": env["timestamp"], "preset": preset,
              "model": spec.model or ("(tiny offline model)" if "torch" in spec.backends else None),
              "artifact": spec.artifact, "threads": spec.threads,
              "random_weights": spec.random_weights if spec.random_weights is not None else _detect_random(spec),
              **{f"env_{k}": v for k, v in env.items()}}
    loaded = _Loaded(spec)
    records = []
    bar = tqdm(cases, desc="deleaker-bench", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.describe())
        try:
            rows = _measure(case, spec, loaded, profile_dir)
        except _LoadError as e:
            rows = [{"status": "skipped", "note": f"{case.backend} not loaded: {e}"}] * len(case.impls)
        except Exception as e:  # noqa: BLE001 - one failed case (e.g. out of memory) must not lose the run
            log.debug("%s failed:\n%s", case.describe(), traceback.format_exc())
            msg = str(e).splitlines()[0] if str(e) else ""
            rows = [{"status": "error", "note": f"{type(e).__name__}: {msg}"}] * len(case.impls)
            harness._free_device_memory()
        for impl, row in zip(case.impls, rows):
            rec = {**common, **_case_fields(case, impl), **row}
            rec["model"] = common["model"] if case.backend == "torch" else spec.artifact  # same for a case's rows
            records.append(rec)
            if on_record:
                on_record(rec)  # as measured (ratios come at the end, over all records)
    bar.close()
    return harness.add_ratios(records)


def _detect_random(spec: BenchSpec) -> bool | None:
    flags = []
    if "torch" in spec.backends:
        flags.append(M.weights_are_random(spec.model))
    if any(b != "torch" for b in spec.backends):
        flags.append(M.weights_are_random(spec.artifact))
    if any(f is True for f in flags):
        return True
    return None if any(f is None for f in flags) else False
