"""The `aoti` backend: serves an AOTInductor artifact (deleaker-export aoti) with torch alone.

Four .pt2 packages (CLIP pooled, T5, the DeLeaker transformer step, the VAE decoder), each
compiled ahead of time for one device and loaded with torch._inductor.aoti_load_package: no
diffusers, transformers or onnx in the process, no compilation at load. A session keeps every
input, the schedule and the state on the device, as the torch backend does; each step is one
call of the compiled step and the Euler update in float32.

The compiled step calls the DeLeaker op (torch.ops.deleaker.attention) through the dispatcher,
so the op must be registered in this process: loading the backend imports its definition
(deleaker.modeling.reference_op, which needs only torch: the reference kernel, for every device)
and, for op "cuda" (or "auto" on a GPU where the library is built), the fused CUDA kernel
library (deleaker.modeling.cuda_op).

torch is imported when a backend is created, never at module import.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import numpy as np

from deleaker.runtime import step_io
from deleaker.runtime.artifact import Artifact, ArtifactError, load_artifact
from deleaker.runtime.backends.base import Backend, Session, SessionInputs
from deleaker.runtime.backends.options import ATTENTION, BackendOption

log = logging.getLogger("deleaker")

BACKEND = "aoti"
OPS = ("auto", "reference", "cuda")


class AotiError(ValueError):
    """The aoti backend cannot run here or on this artifact; the message says why and what to do."""


def _torch():
    try:
        import torch
    except ImportError as e:
        raise AotiError(f"the aoti backend needs torch ({e}); pip install torch") from e
    return torch


def register_op(op: str = "auto", device: str = "cpu") -> str:
    """Register torch.ops.deleaker.attention for the packages to call; returns the kernel used
    on `device`: "reference" or "cuda" (the fused library)."""
    if op not in OPS:
        raise AotiError(f"unknown op {op!r} for the aoti backend; choose from {', '.join(OPS)}")
    # the op's schema, fake and reference kernel (imports torch and deleaker.runtime only)
    importlib.import_module("deleaker.modeling.reference_op")
    on_gpu = device.startswith("cuda")
    if op == "reference" or (op == "auto" and not on_gpu):
        return "reference"
    if not on_gpu:
        raise AotiError("op 'cuda' (the fused kernels) runs on a GPU: use --device cuda")
    cuda_op = importlib.import_module("deleaker.modeling.cuda_op")
    try:
        cuda_op.load()
    except cuda_op.CudaOpUnavailable as e:
        if op == "cuda":
            raise AotiError(str(e)) from None
        log.info("aoti: fused DeLeaker op not available (%s); the packages call the reference op", e)
        return "reference"
    return "cuda"


def load_package(path: str | Path, device: str = "cpu"):
    """One .pt2 package as a callable on `device` (the op must be registered: register_op)."""
    torch = _torch()
    register_op("reference")  # idempotent; the fused kernel, if wanted, is loaded by the caller first
    dev = torch.device(device)
    try:
        return torch._inductor.aoti_load_package(str(path), device_index=dev.index if dev.index is not None else -1)
    except Exception as e:  # torch raises RuntimeError with a C++ trace; keep the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"cannot load the AOTInductor package {path}: {msg}") from e


class AotiSession(Session):
    """One batch on the device: inputs, schedule and state stay there; a step is one package call."""

    error = AotiError

    def __init__(self, backend: "AotiBackend", inputs: SessionInputs):
        self.backend, self.torch = backend, backend.torch
        self.model = backend.models["transformer"]
        self.names = step_io.input_names(backend.info.guidance_embeds)
        super().__init__(inputs, backend.info.entity_slots)

    def _put(self, value, dtype: str):
        return self.torch.from_numpy(np.ascontiguousarray(value, dtype=dtype)).to(self.backend.device)

    def encode(self, clip_ids, t5_ids):
        with self.torch.no_grad():
            embeds, pooled = self.backend.encode_on_device(self._put(clip_ids, "int64"), self._put(t5_ids, "int64"))
        return dict(zip(step_io.ENCODER_OUTPUTS, (embeds, pooled)))

    def put(self, name, value):
        return self._put(value, step_io.by_name(name).dtype)

    def put_table(self, name, table):
        return self._put(table, table.dtype.name)

    def transformer(self, x, timestep, history, step):
        feeds = {**self.feeds, "hidden_states": x, "timestep": timestep, "history": history, "step": step}
        with self.torch.no_grad():
            return self.model(**{n: feeds[n] for n in self.names})

    def fetch(self, value):
        return value.float().cpu().numpy()


class AotiBackend(Backend):
    name = BACKEND
    devices = ("cpu", "cuda")
    # --attention reference (the default) lets a GPU with the fused library built use it ("auto")
    options = (BackendOption(ATTENTION, "op", {"reference": "auto", "cuda": "cuda"}),)
    fused_attention = False  # set at load: True when the packages call the fused kernel
    torch_tensors = True
    attention_impls = ()  # the op is compiled into the packages

    def __init__(self, artifact: Artifact, device: str = "cpu", op: str = "auto"):
        torch = _torch()
        self.torch = torch
        self.artifact = artifact
        self.info = artifact.model_info()
        self.device = torch.device(device)
        files = artifact.backend_files(BACKEND)
        for name, entry in artifact.manifest["models"].items():
            compiled_for = entry.get("device")
            if name in files and compiled_for and compiled_for != self.device.type:
                raise AotiError(f"artifact {artifact.root} was compiled for {compiled_for}, not {self.device.type}: "
                                f"use --device {compiled_for}, or export again with "
                                f"`deleaker-export aoti --device {self.device.type}`")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise AotiError(f"device {device!r} requested but torch sees no CUDA GPU")
        # the decoder package takes at most this many images per call (the export's bound)
        self.vae_max_batch = int(artifact.manifest["models"].get("vae_decoder", {}).get("max_batch") or 0)
        self.op = register_op(op, str(self.device))
        self.fused_attention = self.op == "cuda"  # the fused kernel holds no [T+I, T+I] map
        self.models = {name: load_package(artifact.path(BACKEND, name), str(self.device))
                       for name in step_io.MODEL_NAMES}
        log.info("aoti: loaded %s on %s (DeLeaker op: %s kernel)", artifact.root, self.device, self.op)

    @classmethod
    def load(cls, source: str | None = None, *, device: str = "cpu", op: str = "auto", threads: int | None = None,
             progress: bool = True) -> "AotiBackend":
        """threads: CPU threads of the packages' kernels (torch's intra-op pool, process-wide)."""
        if source is None:
            raise AotiError("the aoti backend serves an artifact: pass --artifact DIR "
                            "(make one with `deleaker-export aoti --model CHECKPOINT --out DIR`)")
        if threads:
            _torch().set_num_threads(int(threads))
        return cls(load_artifact(source), device=device, op=op)

    def encode_on_device(self, clip_ids, t5_ids):
        """Token ids on the device -> (prompt_embeds [B, T, Dt], pooled [B, Dp]) float32 on the device."""
        T = self.info.max_text_tokens
        if t5_ids.shape[-1] != T:
            raise AotiError(f"T5 ids have {t5_ids.shape[-1]} tokens; this artifact was exported for {T}")
        clip, t5 = step_io.TEXT_ENCODER, step_io.TEXT_ENCODER_2
        pooled = self.models[clip.name](**{clip.input: clip_ids})  # one output: the tensor itself
        embeds = self.models[t5.name](**{t5.input: t5_ids})
        return embeds, pooled

    def encode_prompt(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        with torch.no_grad():
            embeds, pooled = self.encode_on_device(torch.from_numpy(np.ascontiguousarray(clip_ids, np.int64)).to(
                self.device), torch.from_numpy(np.ascontiguousarray(t5_ids, np.int64)).to(self.device))
        return embeds.cpu().numpy(), pooled.cpu().numpy()

    def start_session(self, inputs: SessionInputs) -> AotiSession:
        return AotiSession(self, inputs)

    def decode(self, vae_latents: np.ndarray) -> np.ndarray:
        torch = self.torch
        z = torch.from_numpy(np.ascontiguousarray(vae_latents, np.float32)).to(self.device)  # [B, 16, h, w]
        chunk = self.vae_max_batch or z.shape[0]
        with torch.no_grad():
            vae = step_io.VAE_DECODER
            images = [self.models[vae.name](**{vae.input: part}) for part in z.split(chunk)]  # [b, 3, H, W] each
        return torch.cat(images).cpu().numpy()
