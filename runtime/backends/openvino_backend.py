"""The `openvino` backend: serves a portable artifact (`deleaker-export onnx --portable`) with OpenVINO on the CPU.

OpenVINO is an ONNX consumer independent of ONNX Runtime (its own importer and CPU kernels). It
cannot convert the deleaker::DeLeakerAttention node of the default (function) form, so this
backend takes only artifacts whose transformer is in the portable form (every node inlined into
standard ops; docs/export.md). It reads the same ONNX files as the onnxruntime backend (the
manifest's onnxruntime file list) and runs them in the same session loop (OnnxRuntimeSession over
base.Session): only the compiled models differ. Inference precision is pinned to f32 (some CPUs
would otherwise run bf16).

Constraints: device cpu; form portable; openvino (pip install 'deleaker[openvino]') is imported
when a backend is created, never at module import.
"""

from __future__ import annotations

import logging
import threading

import numpy as np

from .. import step_io
from ..artifact import Artifact, ArtifactError, load_artifact
from .base import Backend, SessionInputs
from .onnxruntime_backend import OnnxRuntimeSession

log = logging.getLogger("deleaker")

BACKEND = "openvino"
FILES_OF = "onnxruntime"  # the manifest lists the ONNX files under the backend that wrote them
DEVICES = ("cpu",)
FORMS = ("portable",)  # transformer.onnx forms OpenVINO converts (export/onnx_portable.py)
_NP = {"float32": np.float32, "int64": np.int64}


class OpenVinoError(ValueError):
    """The openvino backend cannot run this artifact or request; the message says why and what to do."""


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise OpenVinoError(f"the openvino backend needs openvino ({e}); pip install 'deleaker[openvino]'") from None
    return openvino


class _Model:
    """One compiled model and its infer request, called like the onnxruntime backend's models:
    run(feeds by step_io name) -> outputs by name (copies the caller owns)."""

    def __init__(self, ov, core, artifact: Artifact, name: str, config: dict):
        path = artifact.path(FILES_OF, name)
        self.name = name
        try:
            self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        except Exception as e:  # OpenVINO raises its own exception types; one line with the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"openvino cannot load {path}: {msg}") from e
        tensors = artifact.tensors(name)
        # OpenVINO keeps the graph's input and output order but may report another of a tensor's
        # names (get_any_name); the manifest names each port, checked against all of its names
        self.input_names = list(tensors["inputs"])
        self.output_names = list(tensors["outputs"])
        for kind, ports, names in (("inputs", self.compiled.inputs, self.input_names),
                                   ("outputs", self.compiled.outputs, self.output_names)):
            got = [sorted(p.get_names()) for p in ports]
            if len(got) != len(names) or any(n not in g for n, g in zip(names, got)):
                raise ArtifactError(f"{path}: its {kind} {got} are not the manifest's {names}; re-export it with "
                                    f"`deleaker-export onnx --portable`")
        self._dtypes = [_NP.get(tensors["inputs"][n].get("dtype"), np.float32) for n in self.input_names]
        self.request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request serves one call at a time

    def run(self, feeds: dict[str, np.ndarray], out_shapes: dict | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OpenVinoError(f"{self.name}: missing input(s) {', '.join(missing)}")
        args = [np.require(feeds[n], dtype=t, requirements="C") for n, t in zip(self.input_names, self._dtypes)]
        with self._lock:
            res = self.request.infer(args)
            return {n: np.array(res[port], dtype=np.float32, copy=True)
                    for n, port in zip(self.output_names, self.compiled.outputs)}


class OpenVinoSession(OnnxRuntimeSession):
    """The onnxruntime backend's session (host arrays, the transformer called once per step) over
    OpenVINO's compiled transformer."""

    error = OpenVinoError


class OpenVinoBackend(Backend):
    name = BACKEND
    devices = DEVICES
    options = ()  # it runs what was exported (the portable form)
    fused_attention = False
    torch_tensors = False
    attention_impls = ()
    device = "cpu"

    def __init__(self, artifact: Artifact, threads: int | None = None):
        transformer = artifact.tensors("transformer")
        form = transformer.get("form", "function")  # artifacts before the form was recorded are function form
        if form not in FORMS:
            raise OpenVinoError(f"artifact {artifact.root} holds the {form} form of transformer.onnx (deleaker::"
                                f"DeLeakerAttention nodes, which OpenVINO cannot convert); the openvino backend runs "
                                f"the portable form: deleaker-export onnx --portable --model CHECKPOINT --out DIR")
        ov = _ov()
        self.artifact = artifact
        self.info = artifact.model_info()
        config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        self.models = {name: _Model(ov, core, artifact, name, config) for name in step_io.MODEL_NAMES}
        log.info("openvino backend: %s on the CPU (%s form)", artifact.root, form)

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", threads: int | None = None,
             progress: bool = True) -> "OpenVinoBackend":
        if source is None:
            raise OpenVinoError("the openvino backend serves a portable artifact: pass --artifact DIR (make one with "
                                "`deleaker-export onnx --portable --model CHECKPOINT --out DIR`)")
        if device not in DEVICES:
            raise OpenVinoError(f"the openvino backend runs on the CPU; got device {device!r} (use --device cpu, or "
                                f"the onnxruntime backend for CUDA)")
        return cls(load_artifact(source), threads=threads)

    # -- the Backend interface ---------------------------------------------------------------

    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.info.max_text_tokens
        if t5_ids.shape[-1] != T:
            raise OpenVinoError(f"T5 ids have {t5_ids.shape[-1]} tokens; this artifact was exported for {T}")
        clip, t5 = step_io.TEXT_ENCODER, step_io.TEXT_ENCODER_2
        pooled = self.models[clip.name].run({clip.input: clip_ids})[clip.output]
        embeds = self.models[t5.name].run({t5.input: t5_ids})[t5.output]
        return embeds, pooled

    def start_session(self, inputs: SessionInputs) -> OpenVinoSession:
        return OpenVinoSession(self, inputs)

    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        vae = step_io.VAE_DECODER
        return self.models[vae.name].run({vae.input: vae_latents})[vae.output]
