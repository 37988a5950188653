"""`deleaker-export verify`: ONNX Runtime (the artifact) against PyTorch (the checkpoint).

First the transformer graph's form is checked against the manifest (function: one
DeLeakerAttention node per block with the function; portable: standard ops only, see
export/onnx_portable.py). Then three checks, each a polygraphy Comparator run of two runners on
the same feeds:
  op    the DeLeakerAttention function body inside the artifact (in a one-node model; for a
        portable artifact, that node inlined as the export inlines it) vs the
        reference op, on random inputs with structured entity attention, at block-steps before,
        inside and after the windows, history in and out; a batch of two samples with different
        settings (the artifact's default and a variant), as op contract v2 allows;
  step  transformer.onnx (or an AOTInductor artifact's transformer.pt2) vs DeLeakerFlux
        (diffusers + reference op), random step inputs, the same two settings per sample;
  loop  the whole denoising loop through the public Pipeline API on the onnxruntime backend
        (the artifact) vs the torch backend (the checkpoint): final latents and history,
        DeLeaker on and off, with the artifact's default settings.
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

from deleaker.runtime import op_schema, step_io
from deleaker.runtime.artifact import ArtifactError, load_artifact
from deleaker.runtime.artifact_check import GraphTensor, check_graph
from deleaker.runtime.config import DeLeakerConfig, ResolvedConfig

CHECKS = ("op", "step", "loop")
# the checks of each engine kind (the aoti backend has no op of its own to check)
BACKEND_CHECKS = {"onnxruntime": CHECKS, "aoti": ("step", "loop")}
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
# The settings the checks run with
# --------------------------------------------------------------------------------------------

def check_configs(default: DeLeakerConfig, steps: int, blocks_per_step: int) -> list[ResolvedConfig]:
    """Two samples' settings: the artifact's default for `steps` steps, and a variant with the same
    windows but other thresholds, alpha and rules (so a batch mixes settings, as v2 allows)."""
    base = default.replace(num_steps=steps)
    variant = base.replace(std_mul_text=base.std_mul_text * 0.5, std_mul_image_image=base.std_mul_image_image * 0.5,
                           k_strength=base.k_strength * 1.5, do_smoothing=not base.do_smoothing,
                           do_text_text_weakening=not base.do_text_text_weakening)
    return [base.resolved(blocks_per_step), variant.resolved(blocks_per_step)]


def _settings_feed(configs) -> dict:
    packed = op_schema.pack_settings(configs)
    return {name: packed[name] for name in op_schema.SETTINGS_TENSORS}


def load_transformer_graph(artifact):
    """transformer.onnx's graph (weights stay on disk), or a one-line ArtifactError if it is not ONNX."""
    import onnx

    path = artifact.path("onnxruntime", "transformer")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: the file is not a valid ONNX model
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}: {msg}); copy the artifact "
                            f"again or re-export it with `deleaker-export onnx --model CHECKPOINT --out "
                            f"{artifact.root}`") from None


def transformer_form(artifact, blocks_per_step: int) -> str:
    """The transformer graph's form (function or portable, export/onnx_portable.py) checked against
    the manifest's record: a one-line description, or a one-line ArtifactError."""
    from . import onnx_portable

    graph = load_transformer_graph(artifact)
    try:
        return onnx_portable.check_form(graph, artifact.tensors("transformer"), blocks_per_step)
    except onnx_portable.FormError as e:
        raise ArtifactError(f"{artifact.path('onnxruntime', 'transformer')}: {e}; re-export the artifact") from None


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


def _op_feeds(configs: list[ResolvedConfig], E: int) -> tuple[list[dict], list[str], list[int]]:
    """Feeds at block-steps before the history starts, inside the intervention window and after
    it (of the first config; the others share its windows). Returns (feeds, names, block offsets)."""
    c = configs[0]
    bps = c.blocks_per_step
    a0, i0, i1 = c.start_aggregating_from, c.start_intervention_from, c.stop_intervention_at
    taus = {"before_window": max(0, a0 - 1), "inside_window": max(i0, a0 + 1), "after_window": i1 + 1}
    feeds, names, offsets = [], [], []
    T, h, w = 8, 6, 8
    B = len(configs)
    for i, (name, tau) in enumerate(taus.items()):
        if name == "before_window" and a0 == 0:
            continue
        x = structured_op_inputs(B, 2, 16, T, h, w, E, active=min(E, 2), seed=i)
        x["history"] = torch.rand(B, E, h * w, generator=torch.Generator().manual_seed(10 + i)) * 0.05
        feed = OrderedDict((k, v.numpy()) for k, v in x.items())
        feed["step"] = np.array(tau // bps, dtype=np.int64)
        feed["grid"] = np.array([h, w], dtype=np.int64)
        feed.update(_settings_feed(configs))
        feeds.append(feed)
        names.append(f"{name} (tau {tau})")
        offsets.append(tau % bps)
    return feeds, names, offsets


def check_op(artifact, configs: list[ResolvedConfig], atol: float, rtol: float) -> list[OutputResult]:
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from . import onnx_op, onnx_portable
    from deleaker.modeling.reference_op import deleaker_attention_ref

    E = int(artifact.model["entity_slots"])
    bps = int(artifact.model["blocks_per_step"])
    # the function body inside the artifact itself (graph only; weights stay on disk); a portable
    # artifact has none: its nodes are this deleaker's body inlined, so that is what is checked
    graph = load_transformer_graph(artifact)
    portable = onnx_portable.graph_form(graph) == onnx_portable.PORTABLE
    function = next((f for f in graph.functions if (f.domain, f.name) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)),
                    None)
    opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), onnx_op.DEFAULT_OPSET)
    del graph
    if portable:
        function = onnx_op.make_function(E, opset)
    if function is None:
        raise ArtifactError(f"{artifact.path('onnxruntime', 'transformer')} holds no {op_schema.ONNX_DOMAIN}::"
                            f"{op_schema.OP_NAME} function; re-export the artifact")
    feeds, names, offsets = _op_feeds(configs, E)
    rows = []
    FunctionRunner = _runner_base()
    for feed, name, offset in zip(feeds, names, offsets):
        attrs = op_schema.node_attributes(offset, bps)
        model = onnx_op.make_single_op_model(E, attrs, function=function, opset=opset)
        # the portable form: the same node inlined, as `deleaker-export onnx --portable` does
        model = (onnx_portable.inline_op(model, E) if portable else model).SerializeToString()

        def reference(fd, attrs=attrs):
            t = {k: torch.from_numpy(np.asarray(v)) for k, v in fd.items()}
            out, hist = deleaker_attention_ref(*(t[n] for n in op_schema.INPUT_NAMES), **attrs)
            return {"out": out.numpy(), "history_out": hist.numpy()}

        meta = {k: (v.dtype, list(v.shape)) for k, v in feed.items()}
        runners = [OnnxrtRunner(SessionFromOnnx(model), name="onnxruntime"),
                   FunctionRunner(reference, meta, [t.name for t in op_schema.OUTPUTS], "reference-op")]
        rows += _compare("op", runners, [feed], [name], atol, rtol)
    return rows


# --------------------------------------------------------------------------------------------
# step: the transformer engine (transformer.onnx or transformer.pt2) vs DeLeakerFlux
# --------------------------------------------------------------------------------------------

def check_step(artifact, ckpt, configs: list[ResolvedConfig], height: int, width: int, device: str, atol: float,
               rtol: float, backend: str = "onnxruntime") -> list[OutputResult]:
    """The artifact's transformer engine (transformer.onnx in ONNX Runtime, or transformer.pt2) vs
    DeLeakerFlux on the checkpoint, on random step inputs with one setting per sample of `configs`."""
    from deleaker.modeling.checkpoint import resolve_dtype
    from deleaker.modeling.flux import DeLeakerFlux
    from .onnx_export import ExportSpec, TransformerStep, transformer_example

    dtype = artifact.manifest["dtypes"]["transformer"]
    m = artifact.model
    guidance = bool(m["guidance_embeds"])
    transformer = ckpt.load_transformer(resolve_dtype(dtype)).to(device)
    step_module = TransformerStep(DeLeakerFlux(transformer), resolve_dtype(dtype), guidance).eval()
    spec = ExportSpec(height=height, width=width, min_size=min(height, width), max_size=max(height, width),
                      max_text_tokens=int(m["max_text_tokens"]), entity_slots=int(m["entity_slots"]))
    bps = int(m["blocks_per_step"])
    i0 = configs[0].start_intervention_from
    names = step_io.input_names(guidance)
    torch.manual_seed(0)
    feeds, feed_names = [], []
    # step 0 crosses a0 and i0 inside one forward for FLUX's defaults; the next step is all inside
    for s in sorted({0, i0 // bps, i0 // bps + 1}):
        x = transformer_example(transformer, spec, batch=len(configs), configs=configs)
        x["step"] = torch.tensor(s, dtype=torch.int64)
        feeds.append(OrderedDict((k, x[k].numpy()) for k in names))
        feed_names.append(f"step {s}")

    def torch_call(fn):  # a module or an AOTInductor package, called with the step's inputs by name
        def call(fd):
            kw = {k: torch.from_numpy(np.asarray(fd[k])).to(device) for k in names}
            with torch.no_grad():
                out = fn(**kw)
            return {n: o.float().cpu().numpy() for n, o in zip(step_io.OUTPUT_NAMES, out)}
        return call

    meta = {k: (v.dtype, list(v.shape)) for k, v in feeds[0].items()}
    FunctionRunner = _runner_base()
    if backend == "aoti":
        from deleaker.modeling.aoti_backend import load_package

        package = load_package(artifact.path("aoti", "transformer"), device)
        engine = FunctionRunner(torch_call(package), meta, list(step_io.OUTPUT_NAMES), "aoti")
    else:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

        providers = ["cuda", "cpu"] if device.startswith("cuda") else ["cpu"]
        engine = OnnxrtRunner(SessionFromOnnx(str(artifact.path("onnxruntime", "transformer")), providers=providers),
                              name="onnxruntime")
    runners = [engine, FunctionRunner(torch_call(step_module), meta, list(step_io.OUTPUT_NAMES), "torch")]
    return _compare("step", runners, feeds, feed_names, atol, rtol)


# --------------------------------------------------------------------------------------------
# loop: the public Pipeline API on both backends
# --------------------------------------------------------------------------------------------

def check_loop(artifact, model_dir: Path, config: DeLeakerConfig, prompt: str, entities: tuple[str, ...], steps: int,
               height: int, width: int, device: str, atol: float, rtol: float,
               backend: str = "onnxruntime") -> list[OutputResult]:
    """The whole loop through the public Pipeline on the artifact's `backend` vs the torch backend on
    its checkpoint: final latents and history, DeLeaker on and off."""
    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    m = artifact.model
    art_pipe = Pipeline(load_backend(backend, str(artifact.root), device=device, progress=False))
    torch_pipe = Pipeline(load_backend("torch", str(model_dir), device=device, progress=False,
                                       dtype=artifact.manifest["dtypes"]["transformer"],
                                       entity_slots=int(m["entity_slots"]), max_text_tokens=int(m["max_text_tokens"])))

    def run(pipe):
        def fn(fd):
            req = GenerateRequest(prompt=prompt, entities=entities, seed=int(fd["seed"][0]), steps=steps,
                                  height=height, width=width, deleaker=bool(fd["deleaker"][0]), config=config)
            (r,) = pipe.generate([req])
            return {"latents": r.latents, "history": r.history}
        return fn

    feeds = [OrderedDict(seed=np.array([0], np.int64), deleaker=np.array([d], np.int64)) for d in (1, 0)]
    meta = {"seed": (np.int64, [1]), "deleaker": (np.int64, [1])}
    FunctionRunner = _runner_base()
    runners = [FunctionRunner(run(art_pipe), meta, ["latents", "history"], f"{backend}-pipeline"),
               FunctionRunner(run(torch_pipe), meta, ["latents", "history"], "torch-pipeline")]
    return _compare("loop", runners, feeds, ["DeLeaker on", "DeLeaker off"], atol, rtol)


# --------------------------------------------------------------------------------------------

def onnx_graph_io(path: Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """(inputs, outputs) of an ONNX file as the runtime's graph check reads them (no weights loaded)."""
    import onnx

    _ELEM = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 9: "bool", 16: "bfloat16"}
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises DecodeError and friends
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{path} is not a readable ONNX model ({type(e).__name__}: {msg}); copy the artifact "
                            f"again or re-export it with `deleaker-export onnx`") from None

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)
            out.append(GraphTensor(v.name, _ELEM.get(t.elem_type, str(t.elem_type)), dims))
        return out
    initializers = {i.name for i in graph.initializer}
    return tensors(v for v in graph.input if v.name not in initializers), tensors(graph.output)


def check_graphs(artifact) -> None:
    """Every ONNX graph of the artifact against its manifest: the check the onnxruntime backend runs
    when it opens the artifact (runtime/artifact_check.py), one line per mismatch."""
    for name in step_io.MODEL_NAMES:
        path = artifact.path("onnxruntime", name)
        check_graph(artifact, name, *onnx_graph_io(path), path)


def verify(artifact_dir: str | Path, model_dir: str | Path, checks=None, steps: int | None = None,
           height: int | None = None, width: int | None = None, device: str = "cpu",
           prompt: str = "a cat and a cheetah in a field", entities: tuple[str, ...] = ("cat", "cheetah"),
           atol: float | None = None, rtol: float | None = None, report=print,
           backend: str = "onnxruntime") -> list[OutputResult]:
    """Run the checks of the artifact's `backend` engine against PyTorch; `report` gets one line per
    output. Returns every row (see OutputResult.passed). onnxruntime: op, step, loop; aoti: step, loop."""
    from polygraphy.logger import G_LOGGER

    from deleaker.modeling.checkpoint import open_checkpoint

    if backend not in BACKEND_CHECKS:
        raise ValueError(f"verify checks the onnxruntime or aoti engines of an artifact, not {backend!r}")
    available = BACKEND_CHECKS[backend]
    checks = tuple(checks or available)
    unknown = set(checks) - set(available)
    if unknown:
        raise ValueError(f"unknown check(s) {sorted(unknown)} for --backend {backend}; choose from {', '.join(available)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    artifact = load_artifact(artifact_dir)
    artifact.backend_files(backend)  # one clear error for an artifact without that engine
    ckpt = open_checkpoint(model_dir)
    bps = int(artifact.model["blocks_per_step"])
    if ckpt.blocks_per_step != bps:
        raise ValueError(f"{model_dir} has {ckpt.blocks_per_step} blocks per step, the artifact "
                         f"{bps}: not the checkpoint it was exported from")
    if backend == "onnxruntime":
        check_graphs(artifact)  # graph I/O against the manifest: the same check as the backend's at load
        # a corrupt graph, or one not in the form the manifest records, is one clear error before any check
        report(transformer_form(artifact, bps))
    lo, _ = artifact.size_range
    height, width = height or lo, width or lo
    default = artifact.default_config()
    steps = steps or default.num_steps
    configs = check_configs(default, steps, bps)
    tol = TOLERANCES[artifact.manifest["dtypes"]["transformer"]]
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own lines are the report
    G_LOGGER.colors = False
    rows = []
    for check in checks:
        a, r = tol[check]
        a, r = atol if atol is not None else a, rtol if rtol is not None else r
        if check == "op":
            new = check_op(artifact, configs, a, r)
        elif check == "step":
            new = check_step(artifact, ckpt, configs, height, width, device, a, r, backend=backend)
        else:
            new = check_loop(artifact, Path(model_dir), default.replace(num_steps=steps), prompt, entities, steps,
                             height, width, device, a, r, backend=backend)
        for row in new:
            report(row.line())
        rows += new
    return rows
