"""What to measure: a BenchSpec (model, backends, modes, sizes, batches, steps, entities) and
named presets. The CLI starts from a preset and overrides fields from its flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deleaker.runtime.dtypes import WEIGHT_DTYPES

from .errors import BenchError  # noqa: F401 - re-exported (presets.BenchError)

MODES = ("step", "e2e")


@dataclass(frozen=True)
class BenchSpec:
    model: str | None = None  # diffusers FLUX folder or random:<name> (torch backend); None: tiny model
    artifact: str | None = None  # folder written by `deleaker-export` (onnxruntime, tensorrt)
    backends: tuple[str, ...] = ("torch",)
    modes: tuple[str, ...] = ("step",)  # "step": one transformer forward; "e2e": whole generation
    resolutions: tuple[tuple[int, int], ...] = ((512, 512),)  # (width, height) pixels
    batch_sizes: tuple[int, ...] = (1,)
    steps: tuple[int, ...] = (20,)  # denoising steps S (windows; e2e step count)
    entity_sets: tuple[tuple[str, ...], ...] = (("cat", "cheetah"),)  # step mode uses only their count
    prompt: str = "a cat and a cheetah in a field"  # e2e; must contain every entity word
    impls: tuple[str, ...] | None = None  # torch attention impls; None: sdpa, reference (+ cuda on a GPU)
    text_tokens: int = 512  # T of torch step mode (backends use their own)
    entity_slots: int = 4
    step: int | None = None  # step index of step mode; None: the busiest DeLeaker step
    warmup: int = 2
    runs: int = 5
    device: str = "cpu"
    dtype: str = "fp32"
    deleaker_preset: str | None = None  # None: flux-dev, or the model family's preset (docs/models.md)
    deleaker_overrides: tuple[tuple[str, object], ...] = ()
    random_weights: bool | None = None  # None: detect from the model/artifact
    # torch step mode: planted entity structure (models.Plant) for random weights; None: off
    cuda_graphs: bool | None = None  # torch backend e2e: CUDA-graph steps (None: the backend's default)
    compile: bool = False  # torch backend e2e: torch.compile the DeLeaker step
    plant_coverage: float | None = None  # share of the image in each entity's planted block
    plant_boost: float | None = None  # logit gain of the planted q.k; None: models.Plant's default
    seed: int = 0
    threads: int | None = None  # CPU threads (torch intra-op, onnxruntime intra-op); None: library default
    description: str = ""

    def replace(self, **changes) -> "BenchSpec":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        from deleaker.runtime.backends import backend_class

        for b in self.backends:
            backend_class(b)  # unknown, or its library is not installed
        for m in self.modes:
            if m not in MODES:
                raise BenchError(f"unknown mode {m!r}; choose from {', '.join(MODES)}")
        for name in ("backends", "modes", "resolutions", "batch_sizes", "steps", "entity_sets"):
            if not getattr(self, name):
                raise BenchError(f"{name} is empty")
        for w, h in self.resolutions:
            if w <= 0 or h <= 0 or w % 16 or h % 16:
                raise BenchError(f"resolution {w}x{h}: width and height must be positive multiples of 16")
        if any(b < 1 for b in self.batch_sizes) or any(s < 1 for s in self.steps):
            raise BenchError("batch sizes and step counts must be >= 1")
        if self.runs < 1 or self.warmup < 1:
            raise BenchError(f"need runs >= 1 and warmup >= 1 (got runs={self.runs}, warmup={self.warmup})")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")
        if "e2e" in self.modes:
            for ents in self.entity_sets:
                missing = [e for e in ents if e.lower() not in self.prompt.lower()]
                if missing:
                    raise BenchError(f"entities {', '.join(missing)} do not occur in the prompt {self.prompt!r}")
        if self.plant_coverage is not None and not 0 < self.plant_coverage <= 0.25:
            raise BenchError(f"plant_coverage must be in (0, 0.25], got {self.plant_coverage}")
        if self.plant_boost is not None and self.plant_boost <= 0:
            raise BenchError(f"plant_boost must be > 0, got {self.plant_boost}")
        others = [b for b in self.backends if b != "torch"]
        if others and not self.artifact:
            raise BenchError(f"backend(s) {', '.join(others)} need --artifact (a `deleaker-export` folder)")
        self._validate_sources()

    def deleaker_config(self, steps: int | None = None, default_preset: str = "flux-dev"):
        """The DeLeaker settings this benchmark runs: its preset (else `default_preset`, the model
        family's) with its overrides, for `steps`."""
        from deleaker.runtime.config import preset

        cfg = preset(self.deleaker_preset or default_preset, **dict(self.deleaker_overrides))
        return cfg.replace(num_steps=steps) if steps is not None else cfg

    def _validate_sources(self) -> None:
        """Names, counts, device and model checked before anything is loaded or written."""
        import re

        from . import models as M

        for impl in self.impls or ():
            if impl not in M.IMPLS:
                raise BenchError(f"unknown attention impl {impl!r}; choose from {', '.join(M.IMPLS)}")
        if self.dtype not in WEIGHT_DTYPES:
            raise BenchError(f"unknown dtype {self.dtype!r}; choose from {', '.join(WEIGHT_DTYPES)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise BenchError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise BenchError(f"device {self.device!r} requested but torch sees no CUDA GPU")
        for name in ("text_tokens", "entity_slots"):
            if getattr(self, name) < 1:
                raise BenchError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for ents in self.entity_sets:
            if len(ents) > self.entity_slots:
                raise BenchError(f"{len(ents)} entities ({', '.join(ents)}) do not fit {self.entity_slots} entity slots")
        if self.step is not None and self.step < 0:
            raise BenchError(f"step must be >= 0, got {self.step}")
        self.deleaker_config()  # unknown DeLeaker preset or setting
        if "torch" in self.backends and self.model is not None:
            if self.model.startswith(M.RANDOM_PREFIX):
                M.random_model_name(self.model)
                if "e2e" in self.modes:
                    raise BenchError(f"{self.model} is a transformer only (no text encoders or VAE): use --mode step")
            else:
                M.transformer_folder(self.model)
                self._validate_family()

    def _validate_family(self) -> None:
        """A model family other than FLUX.1 (benchmarks/family_step.py): torch step mode only."""
        from .family_step import model_family

        family = model_family(self.model)
        if family is None:
            return
        if "e2e" in self.modes:
            raise BenchError(f"{family.title}: e2e mode times FLUX.1's runtime pipeline; time this family's step "
                             f"with --mode step (whole images: `deleaker generate --model` logs its time)")
        bad = [i for i in self.impls or () if i == "cuda"]
        if bad:
            raise BenchError(f"{family.title}: impl cuda (the fused op) is checked on FLUX.1 only; use sdpa, "
                             f"reference, inactive")


# DeLeaker settings whose windows open in the first steps, so DeLeaker edits even in a 2-step run
# of the tiny model (the measurement tools use them to prove the timed work ran the op)
EDITING_SETTINGS = {"start_aggregating_from": 0, "start_intervention_from": 1, "do_smoothing": False}

PRESETS: dict[str, BenchSpec] = {
    # CPU smoke, used by CI: the tiny offline model, both modes, two sizes, batch 1..2, 2 steps.
    # Windows open at the first block (the tiny model has 4 blocks per step, the flux-dev
    # windows start at block-step 12/18) so DeLeaker intervenes within 2 steps.
    "tiny": BenchSpec(
        modes=("step", "e2e"), resolutions=((64, 64),), batch_sizes=(1, 2), steps=(2,),
        text_tokens=64, warmup=2, runs=5, impls=("sdpa", "reference"), deleaker_preset="tiny",
        deleaker_overrides=(("start_aggregating_from", 0), ("start_intervention_from", 1)),
        description="tiny offline model on CPU: smoke test of every mode (timing is not meaningful; the tiny "
                    "DeLeaker preset, no smoothing, so random weights keep masks and the steps edit)"),
    # performance.md's anchor: FLUX.1-dev-sized transformer, random weights, bf16, one GPU,
    # 512 text tokens, 2 entities, vanilla (stock diffusers SDPA) vs reference vs fused DeLeaker.
    # Planted entity blocks of 14% each (two entities: ~28% of the image), so the default
    # settings' smoothed masks are non-empty and the timed steps really edit.
    "flux-dev-anchor": BenchSpec(
        model="random:flux-dev", modes=("step",), resolutions=((512, 512), (1024, 1024)), batch_sizes=(1,),
        steps=(20,), text_tokens=512, impls=("sdpa", "reference", "cuda"), warmup=2, runs=5, device="cuda",
        dtype="bf16", random_weights=True, plant_coverage=0.14,
        description="performance.md anchor: FLUX.1-dev size, random weights with planted entities, bf16, "
                    "transformer step only"),
    # Throughput against batch size at 1024x1024 (reference op left out: it is slow at batch 4).
    "flux-dev-batch": BenchSpec(
        model="random:flux-dev", modes=("step",), resolutions=((1024, 1024),), batch_sizes=(1, 2, 4),
        steps=(20,), text_tokens=512, impls=("sdpa", "cuda"), warmup=2, runs=5, device="cuda", dtype="bf16",
        random_weights=True, plant_coverage=0.14,
        description="images/s against batch size at 1024x1024, vanilla vs fused DeLeaker (planted entities)"),
}


def get_preset(name: str) -> BenchSpec:
    if name not in PRESETS:
        raise BenchError(f"unknown benchmark preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
