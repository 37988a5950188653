"""The `onnxruntime` backend: serves an artifact directory (deleaker-export onnx) with ONNX Runtime.

One InferenceSession per model (CLIP, T5, transformer, VAE decoder). Calls go through
IOBinding with buffers kept per model and per shape, so a denoising loop reuses the same input
and output buffers every step (on CUDA they stay on the GPU; inputs are copied into them in
place). The DeLeakerAttention nodes run their ONNX function body (standard ops), so no plugin
is needed. CPU everywhere; the CUDA execution provider where onnxruntime-gpu is installed.

onnxruntime is imported when a backend is created, never at module import.

DeLeaker windows are node attributes, fixed at export for the manifest's step count. Asked for
another step count (or other DeLeaker settings), `prepare` rewrites the attributes of the
transformer's DeLeakerAttention nodes and opens a new session (this needs the `onnx` package;
the weights are not copied: external data is read from the artifact).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..artifact import Artifact, ArtifactError, load_artifact
from ..config import DeLeakerConfig
from .base import Backend

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


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, device: str = "cpu", deleaker_config: DeLeakerConfig | None = None,
                 threads: int | None = None):
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
        self._exported = artifact.deleaker
        self.base_config = deleaker_config or DeLeakerConfig(**self._exported["config"])
        self.models = {name: self._open(name) for name in ("text_encoder", "text_encoder_2", "vae_decoder")}
        self._transformer_attrs = None
        self.models["transformer"] = None
        self.prepare(self.base_config.num_steps)

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", deleaker_config: DeLeakerConfig | None = None,
             threads: int | None = None, progress: bool = True, **_ignored) -> "OnnxRuntimeBackend":
        if source is None:
            raise OnnxRuntimeError("the onnxruntime backend serves an artifact: pass --artifact DIR "
                                   "(make one with `deleaker-export onnx --model CHECKPOINT --out DIR`)")
        return cls(load_artifact(source), device=device, deleaker_config=deleaker_config, threads=threads)

    # -- sessions --------------------------------------------------------------------------

    def _open(self, name: str, model_bytes: bytes | None = None) -> _Model:
        path = self.artifact.path("onnxruntime", name)
        options = self.options
        if model_bytes is not None:
            # a patched copy in memory: its external data still lives beside the original file
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = self.options.intra_op_num_threads
            options.log_severity_level = self.options.log_severity_level
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(path.parent))
        try:
            return _Model(self.ort, model_bytes if model_bytes is not None else str(path), name, self.providers,
                          options, self.device)
        except Exception as e:  # ORT raises its own exception types; make it one line with the file
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"onnxruntime cannot load {path}: {msg}") from e

    def _attributes(self, config: DeLeakerConfig) -> dict:
        resolved = config.resolved(self.info.blocks_per_step)
        attrs = resolved.op_attributes(0)
        attrs.pop("block_offset")
        return attrs

    def prepare(self, num_steps: int) -> None:
        """Fix the DeLeaker windows for `num_steps` (re-parameterising the transformer if they differ)."""
        config = self.base_config.replace(num_steps=num_steps)
        attrs = self._attributes(config)
        if attrs == self._transformer_attrs and self.models["transformer"] is not None:
            return
        if _same(attrs, self._exported["attributes"]):
            self.models["transformer"] = self._open("transformer")
        else:
            log.info("re-parameterising the DeLeaker nodes for %d steps (artifact exported for %d)", num_steps,
                     self._exported["num_steps"])
            self.models["transformer"] = None  # release the old session first
            self.models["transformer"] = self._open("transformer", _patched_transformer(
                self.artifact.path("onnxruntime", "transformer"), attrs))
        self._transformer_attrs = attrs

    # -- the Backend interface ---------------------------------------------------------------

    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        T = self.info.max_text_tokens
        if t5_ids.shape[-1] != T:
            raise OnnxRuntimeError(f"T5 ids have {t5_ids.shape[-1]} tokens; this artifact was exported for {T}")
        pooled = self.models["text_encoder"].run({"input_ids": clip_ids})["pooled_projections"]
        embeds = self.models["text_encoder_2"].run({"input_ids": t5_ids})["encoder_hidden_states"]
        return embeds, pooled

    def step(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        model = self.models["transformer"]
        feeds = {k: v for k, v in inputs.items() if k in model.input_names}
        hs, hist = np.asarray(inputs["hidden_states"]), np.asarray(inputs["history"])
        E = self.info.entity_slots
        if hist.ndim != 3 or hist.shape[1] != E:
            raise OnnxRuntimeError(f"history must be [B, {E}, I] for this artifact ({E} entity slots); "
                                   f"got {hist.shape}")
        out = model.run(feeds, out_shapes={"noise_pred": hs.shape, "history_out": hist.shape})
        return out["noise_pred"], out["history_out"]

    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        b, _, h, w = vae_latents.shape
        f = self.info.vae_scale_factor
        return self.models["vae_decoder"].run({"latents": vae_latents}, out_shapes={"images": (b, 3, h * f, w * f)})[
            "images"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (abs(float(a[k]) - float(b[k])) <= 1e-12 * max(1.0, abs(float(b[k])))) for k in a)


def _patched_transformer(path: Path, attrs: dict) -> bytes:
    """The transformer graph with every DeLeakerAttention node's attributes set to `attrs` (block
    offsets kept). Loads the graph only; external weights stay on disk."""
    try:
        import onnx
    except ImportError as e:
        raise OnnxRuntimeError(
            f"this artifact's DeLeaker windows were fixed at export for another step count or other settings; "
            f"changing them needs the onnx package ({e}): pip install onnx, or re-export with "
            f"`deleaker-export onnx --steps N` / matching DeLeaker options") from e
    from ..op_schema import ATTRIBUTES, ONNX_DOMAIN, OP_NAME

    model = onnx.load(str(path), load_external_data=False)
    kinds = {a.name: a.type for a in ATTRIBUTES}
    n = 0
    for node in model.graph.node:
        if node.domain != ONNX_DOMAIN or node.op_type != OP_NAME:
            continue
        n += 1
        for a in node.attribute:
            if a.name in attrs:
                if kinds[a.name] == "int":
                    a.i = int(attrs[a.name])
                else:
                    a.f = float(attrs[a.name])
    if n == 0:
        raise ArtifactError(f"{path} has no {ONNX_DOMAIN}::{OP_NAME} nodes; re-export the artifact")
    return model.SerializeToString()
