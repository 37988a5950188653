"""The `onnxruntime` backend: serves an artifact directory (deleaker-export onnx) with ONNX Runtime.

One InferenceSession per model (CLIP, T5, transformer, VAE decoder). Calls go through
IOBinding with buffers kept per model and per shape, so a denoising loop reuses the same input
and output buffers every step (on CUDA they stay on the GPU; inputs are copied into them in
place). The DeLeakerAttention nodes run their ONNX function body (standard ops), so no plugin
is needed. CPU everywhere; the CUDA execution provider where onnxruntime-gpu is installed.

onnxruntime is imported when a backend is created, never at module import.

The artifact is request-invariant (op contract v2): step count and DeLeaker settings are
per-sample inputs, so the four sessions opened at load serve every request.
"""

from __future__ import annotations

import logging

import numpy as np

from .. import step_io
from ..artifact import Artifact, ArtifactError, load_artifact
from ..artifact_check import check_graph, ort_tensors
from .base import Backend, Session, SessionInputs

log = logging.getLogger("deleaker")

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_}


class OnnxRuntimeError(ValueError):
    """The onnxruntime backend cannot run the request; the message says why and what to do."""


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxRuntimeError(f"the onnxruntime backend needs onnxruntime ({e}); pip install 'deleaker[onnx]'") from e
    return onnxruntime


class _Model:
    """One session with IOBinding and buffers reused across calls of the same shapes."""

    def __init__(self, ort, source, name: str, providers: list, options, device: str):
        self.ort = ort
        self.name = name
        self.device = device  # "cpu" or "cuda"
        self.session = ort.InferenceSession(source, options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._in_dtypes = {i.name: i.type for i in self.session.get_inputs()}
        self.binding = self.session.io_binding()
        self._in_bufs: dict[str, object] = {}  # name -> OrtValue (device buffers, reused)
        self._out_bufs: dict[str, object] = {}
        self._keep: list[np.ndarray] = []

    def _input(self, name: str, arr: np.ndarray):
        if self.device == "cpu":
            # CPU: bind the numpy array itself, no copy (kept alive until the run is over)
            self._keep.append(arr)
            self.binding.bind_cpu_input(name, arr)
            return
        buf = self._in_bufs.get(name)
        if buf is None or tuple(buf.shape()) != arr.shape:
            buf = self.ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
            self._in_bufs[name] = buf
        else:
            buf.update_inplace(arr)
        self.binding.bind_ortvalue_input(name, buf)

    def run(self, feeds: dict[str, np.ndarray], out_shapes: dict[str, tuple] | None = None) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise OnnxRuntimeError(f"{self.name}: missing input(s) {', '.join(missing)}")
        self._keep = []
        for name in self.input_names:
            want = np.int64 if "int64" in self._in_dtypes[name] else np.float32
            self._input(name, np.ascontiguousarray(feeds[name], dtype=want))
        for name in self.output_names:
            shape = (out_shapes or {}).get(name)
            if shape is None:  # unknown shape: let ORT allocate on the device
                self.binding.bind_output(name, self.device, 0)
                continue
            buf = self._out_bufs.get(name)
            if buf is None or tuple(buf.shape()) != tuple(shape):
                buf = self.ort.OrtValue.ortvalue_from_shape_and_type(list(shape), np.float32, self.device, 0)
                self._out_bufs[name] = buf
            self.binding.bind_ortvalue_output(name, buf)
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        outs = self.binding.get_outputs()
        self._keep = []
        # copy out: the buffers are overwritten by the next call, the caller keeps the arrays
        return {name: np.array(v.numpy(), copy=True) for name, v in zip(self.output_names, outs)}


class OnnxRuntimeSession(Session):
    """One batch through the transformer session. On the CPU provider host memory is the device;
    with the CUDA provider the loop inputs are copied into the bound device buffers each step."""

    error = OnnxRuntimeError

    def __init__(self, backend: "OnnxRuntimeBackend", inputs: SessionInputs):
        self.backend = backend
        self.model = backend.models["transformer"]
        super().__init__(inputs, backend.info.entity_slots)

    def encode(self, clip_ids, t5_ids):
        embeds, pooled = self.backend.encode_prompt(clip_ids, t5_ids)
        return dict(zip(step_io.ENCODER_OUTPUTS, (embeds, pooled)))

    def put(self, name, value):
        # host arrays: _Model binds them (CPU) or copies them into its device buffers (CUDA)
        return np.asarray(value, np.float32) if name in ("hidden_states", "history") else np.asarray(value)

    def transformer(self, x, timestep, history, step):
        feeds = {**self.feeds, "hidden_states": x, "timestep": timestep, "history": history, "step": step}
        out = self.model.run({k: v for k, v in feeds.items() if k in self.model.input_names},
                             out_shapes={"noise_pred": x.shape, "history_out": history.shape})
        return out["noise_pred"], out["history_out"]

    def fetch(self, value):
        return value


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    devices = ("cpu", "cuda")
    options = ()  # it runs what was exported
    fused_attention = False  # the exported graph computes the joint attention map
    torch_tensors = False
    attention_impls = ()

    def __init__(self, artifact: Artifact, device: str = "cpu", threads: int | None = None):
        ort = _ort()
        self.ort = ort
        self.artifact = artifact
        self.info = artifact.model_info()
        self.device = "cuda" if device.startswith("cuda") else device
        if self.device not in ("cpu", "cuda"):
            raise OnnxRuntimeError(f"unknown device {device!r} for onnxruntime; use cpu or cuda")
        available = ort.get_available_providers()
        if self.device == "cuda":
            if "CUDAExecutionProvider" not in available:
                raise OnnxRuntimeError("device cuda needs onnxruntime-gpu (this onnxruntime has only "
                                       f"{', '.join(available)}); pip install onnxruntime-gpu, or use --device cpu")
            self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self.options.log_severity_level = 3  # errors only: the function body's shape warnings are noise
        self.sessions_opened: dict[str, int] = {}  # model name -> sessions opened (one each, ever)
        self.models = {name: self._open(name) for name in step_io.MODEL_NAMES}

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", threads: int | None = None,
             progress: bool = True) -> "OnnxRuntimeBackend":
        if source is None:
            raise OnnxRuntimeError("the onnxruntime backend serves an artifact: pass --artifact DIR "
                                   "(make one with `deleaker-export onnx --model CHECKPOINT --out DIR`)")
        return cls(load_artifact(source), device=device, threads=threads)

    # -- sessions --------------------------------------------------------------------------

    def _open(self, name: str) -> _Model:
        path = self.artifact.path("onnxruntime", name)
        try:
            model = _Model(self.ort, str(path), name, self.providers, self.options, self.device)
        except Exception as e:  # ORT raises its own exception types; make it one line with the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"onnxruntime cannot load {path}: {msg}") from e
        # the graph's I/O against the manifest, before any request can meet a disagreement
        check_graph(self.artifact, name, ort_tensors(model.session.get_inputs()),
                    ort_tensors(model.session.get_outputs()), path)
        self.sessions_opened[name] = self.sessions_opened.get(name, 0) + 1
        return model

    # -- the Backend interface ---------------------------------------------------------------

    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.info.max_text_tokens
        if t5_ids.shape[-1] != T:
            raise OnnxRuntimeError(f"T5 ids have {t5_ids.shape[-1]} tokens; this artifact was exported for {T}")
        clip, t5 = step_io.TEXT_ENCODER, step_io.TEXT_ENCODER_2
        pooled = self.models[clip.name].run({clip.input: clip_ids})[clip.output]
        embeds = self.models[t5.name].run({t5.input: t5_ids})[t5.output]
        return embeds, pooled

    def start_session(self, inputs: SessionInputs) -> OnnxRuntimeSession:
        return OnnxRuntimeSession(self, inputs)

    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        b, _, h, w = vae_latents.shape
        f = self.info.vae_scale_factor
        vae = step_io.VAE_DECODER
        return self.models[vae.name].run({vae.input: vae_latents}, out_shapes={vae.output: (b, 3, h * f, w * f)})[
            vae.output]
