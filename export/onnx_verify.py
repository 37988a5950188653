"""`deleaker-export verify`: ONNX Runtime (the artifact) against PyTorch (the checkpoint).

Three checks, each a polygraphy Comparator run of two runners on the same feeds:
  op    the DeLeakerAttention function body (a one-node model with the artifact's settings) vs
        the reference op, on random inputs with structured entity attention, at steps before,
        inside and after the windows, history in and out;
  step  transformer.onnx vs DeLeakerFlux (diffusers + reference op), random step inputs;
  loop  the whole denoising loop (runtime pipeline) on the onnxruntime backend vs the torch
        backend: final latents and history, DeLeaker on and off.
Each output's max/mean absolute and relative errors are reported; any output past tolerance
fails the check.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deleaker.runtime import op_schema
from deleaker.runtime.artifact import load_artifact
from deleaker.runtime.config import DeLeakerConfig

CHECKS = ("op", "step", "loop")
# (atol, rtol) per check and weight dtype. fp32: both sides compute in float32 and differ only in
# summation order (~1e-6 after a softmax); a step adds ~60 blocks of that, a loop compounds it
# over the steps through the scheduler. Half precision: one rounding of the activations is ~1e-3
# (fp16) / ~8e-3 (bf16) relative, and grows the same way.
TOLERANCES = {
    "fp32": {"op": (1e-4, 1e-4), "step": (1e-3, 1e-3), "loop": (1e-2, 1e-2)},
    "fp16": {"op": (1e-4, 1e-4), "step": (2e-2, 2e-2), "loop": (1e-1, 5e-2)},
    "bf16": {"op": (1e-4, 1e-4), "step": (1e-1, 5e-2), "loop": (2e-1, 1e-1)},
}


@dataclass(frozen=True)
class OutputResult:
    check: str
    feed: str  # which input set
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float
    atol: float
    rtol: float
    passed: bool

    def line(self) -> str:
        return (f"{self.check:5} {self.feed:22} {self.output:12} max_abs {self.max_abs:.3e}  mean_abs "
                f"{self.mean_abs:.3e}  max_rel {self.max_rel:.3e}  mean_rel {self.mean_rel:.3e}  "
                f"(atol {self.atol:g}, rtol {self.rtol:g})  {'PASS' if self.passed else 'FAIL'}")


def _runner_base():
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class FunctionRunner(BaseRunner):
        """A polygraphy runner around a Python function feed_dict -> {name: array}."""

        def __init__(self, fn, inputs: dict, outputs: list[str], name: str):
            super().__init__(name=name, prefix="fn-runner")
            self._fn = fn
            self._meta = TensorMetadata()
            for k, (dtype, shape) in inputs.items():
                self._meta.add(k, dtype=dtype, shape=shape)
            self.output_names = outputs

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return self._meta

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = self._fn(feed_dict)
            self.inference_time = time.perf_counter() - t0
            return OrderedDict((k, np.asarray(out[k])) for k in self.output_names)

        def deactivate_impl(self):
            pass

    return FunctionRunner


def _compare(check: str, runners, feeds: list[dict], feed_names: list[str], atol: float, rtol: float):
    """Run both runners on every feed with polygraphy and collect per-output statistics."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc

    results = Comparator.run(runners, data_loader=feeds)
    accuracy = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    rows = []
    (by_pair,) = accuracy  # one compare function -> one AccuracyResult
    for _, iterations in by_pair.items():
        for name, per_output in zip(feed_names, iterations):
            for out_name, r in per_output.items():
                rows.append(OutputResult(check, name, out_name, float(r.max_absdiff), float(r.mean_absdiff),
                                         float(r.max_reldiff), float(r.mean_reldiff), atol, rtol, bool(r)))
    return rows


# --------------------------------------------------------------------------------------------
# op: function body vs reference
# --------------------------------------------------------------------------------------------

def structured_op_inputs(B: int, H: int, D: int, T: int, h: int, w: int, E: int, active: int, seed: int = 0) -> dict:
    """Random q/k/v where the first `active` slots each own a block of image rows that attends
    strongly to the slot's tokens (a direction added to those q rows and the tokens' k), so the
    masks are clear-cut rectangles and the intervention visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    I, N = h * w, T + h * w
    q = torch.randn(B, H, N, D, generator=g) * 0.5
    k = torch.randn(B, H, N, D, generator=g) * 0.5
    v = torch.randn(B, H, N, D, generator=g)
    ent = torch.zeros(B, E, T)
    strength = 2.0 * D ** 0.25
    band = max(1, h // max(active, 1))
    for e in range(active):
        t0 = 1 + 2 * e
        ent[:, e, t0:t0 + 2] = 1.0
        u = torch.zeros(D)
        u[e % D] = strength
        rows = T + torch.arange(e * band * w, min(I, (e + 1) * band * w))
        q[:, :, rows, :] += u
        k[:, :, t0:t0 + 2, :] += u
    return {"q": q, "k": k, "v": v, "entity_tokens": ent, "history": torch.zeros(B, E, I)}


def _op_feeds(attrs: dict, E: int) -> tuple[list[dict], list[str]]:
    bps = attrs["blocks_per_step"]
    a0, i0, i1 = attrs["start_aggregating_from"], attrs["start_intervention_from"], attrs["stop_intervention_at"]
    # tau before the history starts, inside the intervention window, after it
    taus = {"before_window": max(0, a0 - 1), "inside_window": max(i0, a0 + 1), "after_window": i1 + 1}
    feeds, names = [], []
    T, h, w = 8, 6, 8
    for i, (name, tau) in enumerate(taus.items()):
        if name == "before_window" and a0 == 0:
            continue
        x = structured_op_inputs(2, 2, 16, T, h, w, E, active=min(E, 2), seed=i)
        x["history"] = torch.rand(2, E, h * w, generator=torch.Generator().manual_seed(10 + i)) * 0.05
        feed = OrderedDict((k, v.numpy()) for k, v in x.items())
        feed["step"] = np.array(tau // bps, dtype=np.int64)
        feed["grid"] = np.array([h, w], dtype=np.int64)
        feed["__offset"] = tau % bps
        feeds.append(feed)
        names.append(f"{name} (tau {tau})")
    return feeds, names


def check_op(artifact, atol: float, rtol: float) -> list[OutputResult]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from . import onnx_op
    from .reference_op import deleaker_attention_ref

    import onnx

    E = int(artifact.model["entity_slots"])
    base = dict(artifact.deleaker["attributes"])
    # the function body inside the artifact itself (graph only; weights stay on disk)
    graph = onnx.load(str(artifact.path("onnxruntime", "transformer")), load_external_data=False)
    function = next(f for f in graph.functions if (f.domain, f.name) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME))
    del graph
    feeds, names = _op_feeds({**base, "block_offset": 0}, E)
    rows = []
    FunctionRunner = _runner_base()
    for feed, name in zip(feeds, names):
        offset = feed.pop("__offset")
        attrs = {**base, "block_offset": int(offset)}
        model = onnx_op.make_single_op_model(E, attrs, function=function).SerializeToString()

        def reference(fd, attrs=attrs):
            t = {k: torch.from_numpy(np.asarray(v)) for k, v in fd.items()}
            out, hist = deleaker_attention_ref(t["q"], t["k"], t["v"], t["entity_tokens"], t["history"], t["step"],
                                               t["grid"], **attrs)
            return {"out": out.numpy(), "history_out": hist.numpy()}

        meta = {k: (v.dtype, list(v.shape)) for k, v in feed.items()}
        runners = [OnnxrtRunner(SessionFromOnnx(model), name="onnxruntime"),
                   FunctionRunner(reference, meta, [t.name for t in op_schema.OUTPUTS], "reference-op")]
        rows += _compare("op", runners, [feed], [name], atol, rtol)
    return rows


# --------------------------------------------------------------------------------------------
# step: transformer.onnx vs DeLeakerFlux
# --------------------------------------------------------------------------------------------

def check_step(artifact, ckpt, height: int, width: int, device: str, atol: float, rtol: float) -> list[OutputResult]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from .flux import DeLeakerFlux
    from .onnx_export import ExportSpec, TransformerStep, _DTYPES, transformer_example

    dtype = artifact.manifest["dtypes"]["transformer"]
    m = artifact.model
    cfg = DeLeakerConfig(**artifact.deleaker["config"])
    transformer = ckpt.load_transformer(_DTYPES[dtype]).to(device)
    flux = DeLeakerFlux(transformer, cfg)
    step_module = TransformerStep(flux, _DTYPES[dtype], bool(m["guidance_embeds"])).eval()
    spec = ExportSpec(height=height, width=width, max_text_tokens=int(m["max_text_tokens"]),
                      entity_slots=int(m["entity_slots"]))
    attrs = artifact.deleaker["attributes"]
    bps = int(m["blocks_per_step"])
    torch.manual_seed(0)
    feeds, names = [], []
    # step 0 crosses a0 and i0 inside one forward for FLUX's defaults; the next step is all inside
    for s in sorted({0, max(0, attrs["start_intervention_from"] // bps), attrs["start_intervention_from"] // bps + 1}):
        x = transformer_example(transformer, spec, batch=1)
        if not m["guidance_embeds"]:
            x.pop("guidance")
        x["step"] = torch.tensor(s, dtype=torch.int64)
        feeds.append(OrderedDict((k, v.numpy()) for k, v in x.items()))
        names.append(f"step {s}")

    def torch_step(fd):
        t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in fd.items()}
        with torch.no_grad():
            noise, hist = step_module(**{k: t.get(k) for k in ("hidden_states", "encoder_hidden_states",
                                                                "pooled_projections", "timestep", "img_ids",
                                                                "txt_ids", "guidance", "entity_tokens", "history",
                                                                "step", "grid")})
        return {"noise_pred": noise.float().cpu().numpy(), "history_out": hist.float().cpu().numpy()}

    providers = ["cuda", "cpu"] if device.startswith("cuda") else ["cpu"]
    meta = {k: (v.dtype, list(v.shape)) for k, v in feeds[0].items()}
    runners = [OnnxrtRunner(SessionFromOnnx(str(artifact.path("onnxruntime", "transformer")), providers=providers),
                            name="onnxruntime"),
               _runner_base()(torch_step, meta, ["noise_pred", "history_out"], "torch")]
    return _compare("step", runners, feeds, names, atol, rtol)


# --------------------------------------------------------------------------------------------
# loop: the runtime pipeline on both backends
# --------------------------------------------------------------------------------------------

def check_loop(artifact, model_dir: Path, prompt: str, entities: tuple[str, ...], steps: int, height: int,
               width: int, device: str, atol: float, rtol: float) -> list[OutputResult]:
    from deleaker.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    from .torch_backend import TorchBackend

    m = artifact.model
    cfg = DeLeakerConfig(**artifact.deleaker["config"]).replace(num_steps=steps)
    ort_pipe = Pipeline(OnnxRuntimeBackend(artifact, device=device, deleaker_config=cfg))
    torch_pipe = Pipeline(TorchBackend.load(str(model_dir), device=device, dtype=artifact.manifest["dtypes"]["transformer"],
                                            deleaker_config=cfg, entity_slots=int(m["entity_slots"]),
                                            max_text_tokens=int(m["max_text_tokens"])))

    def run(pipe):
        def fn(fd):
            req = GenerateRequest(prompt=prompt, entities=entities, seed=int(fd["seed"][0]), steps=steps,
                                  height=height, width=width, deleaker=bool(fd["deleaker"][0]))
            r = pipe.generate(req, progress=False)
            return {"latents": r.latents, "history": r.history}
        return fn

    feeds = [OrderedDict(seed=np.array([0], np.int64), deleaker=np.array([d], np.int64)) for d in (1, 0)]
    meta = {"seed": (np.int64, [1]), "deleaker": (np.int64, [1])}
    FunctionRunner = _runner_base()
    runners = [FunctionRunner(run(ort_pipe), meta, ["latents", "history"], "onnxruntime-pipeline"),
               FunctionRunner(run(torch_pipe), meta, ["latents", "history"], "torch-pipeline")]
    return _compare("loop", runners, feeds, ["DeLeaker on", "DeLeaker off"], atol, rtol)


# --------------------------------------------------------------------------------------------

def verify(artifact_dir: str | Path, model_dir: str | Path, checks=CHECKS, steps: int | None = None,
           height: int | None = None, width: int | None = None, device: str = "cpu",
           prompt: str = "a cat and a cheetah in a field", entities: tuple[str, ...] = ("cat", "cheetah"),
           atol: float | None = None, rtol: float | None = None, report=print) -> list[OutputResult]:
    """Run the checks; `report` gets one line per output. Returns every row (see OutputResult.passed)."""
    from polygraphy.logger import G_LOGGER

    from .checkpoint import open_checkpoint

    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    artifact = load_artifact(artifact_dir)
    ckpt = open_checkpoint(model_dir)
    if ckpt.blocks_per_step != artifact.model["blocks_per_step"]:
        raise ValueError(f"{model_dir} has {ckpt.blocks_per_step} blocks per step, the artifact "
                         f"{artifact.model['blocks_per_step']}: not the checkpoint it was exported from")
    lo, _ = artifact.size_range
    height, width = height or lo, width or lo
    steps = steps or int(artifact.deleaker["num_steps"])
    tol = TOLERANCES[artifact.manifest["dtypes"]["transformer"]]
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own lines are the report
    G_LOGGER.colors = False
    rows = []
    for check in checks:
        a, r = tol[check]
        a, r = atol if atol is not None else a, rtol if rtol is not None else r
        if check == "op":
            new = check_op(artifact, a, r)
        elif check == "step":
            new = check_step(artifact, ckpt, height, width, device, a, r)
        else:
            new = check_loop(artifact, Path(model_dir), prompt, entities, steps, height, width, device, a, r)
        for row in new:
            report(row.line())
        rows += new
    return rows
