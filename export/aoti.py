"""`deleaker-export aoti`: the DeLeaker step, the text encoders and the VAE decoder as AOTInductor packages.

Each model is captured with torch.export and compiled ahead of time by AOTInductor
(torch._inductor.aoti_compile_and_package) into one .pt2 package: native code plus weights,
loaded by the `aoti` backend (modeling/aoti_backend.py) with torch alone, no diffusers,
transformers or onnx. The packages are compiled for one device (cpu or cuda) and keep float32
I/O whatever the weights' dtype, like the ONNX artifact.

The DeLeaker op stays ONE opaque call per joint attention inside the compiled graph
(torch.ops.deleaker.attention; its fake implementation gives the compiler the shapes). The
package calls it through the dispatcher at run time: the CPU kernel is the reference op, the
CUDA kernel the fused library once modeling/cuda_op.py has loaded it. So the process running a
package must have the op registered (the aoti backend imports modeling/reference_op.py, which
needs only torch).

The step's I/O is runtime/step_io.py's, with batch and image tokens dynamic (one package serves
every batch and every image size in the recorded range); T5 and CLIP have a dynamic batch, the
VAE decoder dynamic batch, latent height and width. The artifact folder:

    ARTIFACT/
      manifest.json       export/manifest.py's format; backends.aoti = {model: file}
      transformer.pt2 text_encoder.pt2 text_encoder_2.pt2 vae_decoder.pt2
      tokenizer/ tokenizer_2/

    deleaker-export aoti --model DIR --out ARTIFACT [--height H --width W] [--min-size S --max-size S]
                         [--dtype fp32|fp16|bf16] [--device cpu|cuda] [--force]

`deleaker-export verify --backend aoti` (export/verify.py) compares an artifact with the torch backend
on the same checkpoint (step and loop).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import torch

from deleaker.runtime import step_io

from deleaker.modeling import reference_op  # noqa: F401  (registers torch.ops.deleaker.attention and its fake)
from .onnx_export import (ClipPooled, ExportError, Exported, ExportSpec, T5Embeds, TransformerStep,
                          VaeDecode, _to, step_dynamic_shapes, transformer_example)
from .artifact_writer import export_models, write_tokenizers_and_manifest
from .out_folder import check_out, publish, temp_folder
from .progress import stage
from deleaker.modeling.checkpoint import resolve_dtype
from deleaker.modeling.torch_backend import check_op_layout

log = logging.getLogger("deleaker")

BACKEND = "aoti"
MODELS = step_io.MODEL_NAMES
FILES = {name: f"{name}.pt2" for name in MODELS}
DEVICES = ("cpu", "cuda")
VAE_MAX_BATCH = 16  # images one decoder call takes (the pipeline decodes one batch at a time)


# --------------------------------------------------------------------------------------------
# One model: torch.export, then AOTInductor
# --------------------------------------------------------------------------------------------

def _shape(v) -> list:
    return [int(d) if isinstance(d, int) or str(d).isdigit() else str(d) for d in v.shape]


def _dtype_name(t) -> str:
    return str(t.dtype).removeprefix("torch.")


def _io_spec(ep, output_names: list[str]) -> tuple[dict, dict]:
    """{name: {"dtype", "shape"}} of the exported program's user inputs and outputs (symbolic
    dims as the exporter names them, e.g. s0)."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT" and hasattr(spec.arg, "name"):
            val = placeholders[spec.arg.name].meta.get("val")
            if isinstance(val, torch.Tensor):
                inputs[spec.arg.name] = {"dtype": _dtype_name(val), "shape": _shape(val)}
    out_node = next(n for n in ep.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in out_node.args[0]]
    outputs = {name: {"dtype": _dtype_name(v), "shape": _shape(v)} for name, v in zip(output_names, vals)}
    return inputs, outputs


def compile_package(module: torch.nn.Module, kwargs: dict, dynamic_shapes: dict, output_names: list[str],
                    path: Path, extra: dict | None = None) -> Exported:
    """torch.export `module` on example `kwargs`, compile with AOTInductor into the .pt2 at `path`."""
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)  # pytree deprecation
        with stage(f"exporting {path.stem} (torch.export)"):
            ep = torch.export.export(module, (), kwargs=kwargs, dynamic_shapes=dynamic_shapes)
        inputs, outputs = _io_spec(ep, output_names)
        t1 = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        with stage(f"compiling {path.stem} with AOTInductor (C++ compilation: minutes on a CPU)"):
            torch._inductor.aoti_compile_and_package(ep, package_path=str(path))
    seconds = time.perf_counter() - t0
    log.info("compiled %s in %.1fs (export %.1fs, AOTInductor %.1fs)", path.name, seconds, t1 - t0, seconds - t1 + t0)
    del ep
    return Exported(file=path.name, inputs=inputs, outputs=outputs, external_data=None, seconds=seconds,
                    extra={"device": str(next(iter(kwargs.values())).device.type), **(extra or {})})


def _batch_dim():
    return torch.export.Dim("batch", min=1, max=1024)


def compile_transformer(transformer, path: Path, spec: ExportSpec, device: str) -> Exported:
    """The DeLeaker step (step_io I/O), batch and image tokens dynamic, each joint attention one op call."""
    from deleaker.modeling.flux import DeLeakerFlux

    dtype = resolve_dtype(spec.dtype)
    guidance = bool(transformer.config.guidance_embeds)
    flux = DeLeakerFlux(_to(transformer, dtype).to(device).eval())
    step = TransformerStep(flux, dtype, guidance).eval()
    kwargs = {k: v.to(device) for k, v in transformer_example(transformer, spec).items()}
    ex = compile_package(step, kwargs, step_dynamic_shapes(guidance), list(step_io.OUTPUT_NAMES), path,
                         extra={"blocks_per_step": flux.blocks_per_step, "dynamic": list(step_io.DYNAMIC_DIMS)})
    return ex


def compile_clip(text_encoder, path: Path, spec: ExportSpec, device: str, max_length: int = 77) -> Exported:
    enc = ClipPooled(_to(text_encoder, resolve_dtype(spec.encoder_dtype)).to(device)).eval()
    ids = torch.zeros(2, max_length, dtype=torch.int64, device=device)  # [B, 77]
    ids[:, -1] = text_encoder.config.eos_token_id
    io = step_io.TEXT_ENCODER
    return compile_package(enc, {io.input: ids}, {io.input: {0: _batch_dim()}}, [io.output], path,
                           extra={"dynamic": ["batch"]})


def compile_t5(text_encoder, path: Path, spec: ExportSpec, device: str) -> Exported:
    enc = T5Embeds(_to(text_encoder, resolve_dtype(spec.encoder_dtype)).to(device)).eval()
    ids = torch.ones(2, spec.max_text_tokens, dtype=torch.int64, device=device)  # [B, T]
    io = step_io.TEXT_ENCODER_2
    return compile_package(enc, {io.input: ids}, {io.input: {0: _batch_dim()}}, [io.output], path,
                           extra={"dynamic": ["batch"]})


def compile_vae_decoder(vae, path: Path, spec: ExportSpec, device: str) -> Exported:
    dec = VaeDecode(_to(vae, resolve_dtype(spec.encoder_dtype)).to(device)).eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    z = torch.randn(2, vae.config.latent_channels, spec.height // f, spec.width // f, device=device)  # [B, 16, h, w]
    lo, hi = spec.size_range
    # bounded by the recorded size range, and a batch of at most VAE_MAX_BATCH (the compiled
    # convolutions' index arithmetic is 32-bit: the exporter asks for a bound)
    io = step_io.VAE_DECODER
    dyn = {io.input: {0: torch.export.Dim("batch", min=1, max=VAE_MAX_BATCH),
                      2: torch.export.Dim("latent_height", min=max(2, lo // f), max=hi // f),
                      3: torch.export.Dim("latent_width", min=max(2, lo // f), max=hi // f)}}
    return compile_package(dec, {io.input: z}, dyn, [io.output], path,
                           extra={"dynamic": ["batch", "latent_height", "latent_width"], "max_batch": VAE_MAX_BATCH})


# --------------------------------------------------------------------------------------------
# The artifact
# --------------------------------------------------------------------------------------------

def _check_device(device: str) -> str:
    kind = device.split(":")[0]
    if kind not in DEVICES:
        raise ExportError(f"--device must be cpu or cuda, got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ExportError("--device cuda: torch sees no CUDA GPU here (AOTInductor compiles for the device it runs on)")
    return device


def export_aoti(model_dir: str | Path, out_dir: str | Path, spec: ExportSpec | None = None, device: str = "cpu",
               force: bool = False) -> Path:
    """Compile a diffusers-format FLUX folder into an AOTInductor artifact (manifest.json + .pt2 + tokenizers).

    Components are loaded, compiled and freed one at a time.
    """
    from deleaker.modeling.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    spec = spec or ExportSpec(max_text_tokens=ckpt.max_sequence_length)
    device = _check_device(device)
    if spec.max_text_tokens > ckpt.max_sequence_length:
        raise ExportError(f"--max-text-tokens {spec.max_text_tokens} exceeds what {ckpt.root.name}'s T5 tokenizer "
                          f"allows ({ckpt.max_sequence_length})")
    spec.validate(multiple=ckpt.vae_scale_factor * 2)
    spec.deleaker.resolved(ckpt.blocks_per_step)  # a bad DeLeaker setting fails before any work
    check_op_layout(device)
    out = check_out(out_dir, {"--model": ckpt.root}, force)
    tmp = temp_folder(out)
    t0 = time.perf_counter()
    try:
        tdtype, edtype = resolve_dtype(spec.dtype), resolve_dtype(spec.encoder_dtype)
        steps = {
            "transformer": (lambda: ckpt.load_transformer(tdtype),
                            lambda m, p: compile_transformer(m, p, spec, device)),
            "text_encoder": (lambda: ckpt.load_text_encoder(edtype),
                             lambda m, p: compile_clip(m, p, spec, device, ckpt.clip_max_length)),
            "text_encoder_2": (lambda: ckpt.load_text_encoder_2(edtype), lambda m, p: compile_t5(m, p, spec, device)),
            "vae_decoder": (lambda: ckpt.load_vae(edtype), lambda m, p: compile_vae_decoder(m, p, spec, device)),
        }
        exported = export_models(steps, tmp, ".pt2")

        def aoti_fields(manifest: dict) -> None:
            manifest["producer"].pop("onnx_opset", None)
            manifest["producer"]["aoti_device"] = torch.device(device).type
            manifest["backends"] = {BACKEND: {name: ex.file for name, ex in exported.items()}}

        write_tokenizers_and_manifest(tmp, ckpt, spec, exported, None, edit=aoti_fields)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("AOTInductor artifact written to %s in %.1fs", out, time.perf_counter() - t0)
    return out
