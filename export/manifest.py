"""manifest.json of an artifact directory: what `deleaker-export` writes, for the runtime to load.

The format (and its reader) is runtime/artifact.py; this module fills it in from an export.
Sections:
  format, format_version, producer        who wrote it, with which library versions
  model                                   what the pipeline needs (ModelInfo fields), the
                                          transformer and scheduler configs
  dtypes                                  weights' dtypes (I/O is always float32 / int64)
  profiles                                batch [1, opt, max] (for TensorRT optimisation profiles;
                                          ONNX Runtime takes any batch), image side, height, width
                                          and image-token ranges (min, opt, max), text tokens and
                                          entity slots (fixed)
  deleaker                                the artifact's DEFAULT DeLeakerConfig (used when a request
                                          brings none) and the op contract version of its nodes;
                                          nothing of it is baked into the graph (op contract v2)
  models                                  per exported model: file, external data, tensors (names,
                                          dtypes, shapes as in the exported graph)
  backends                                files per backend ({"onnxruntime": {model: file}})
  tokenizers                              tokenizer folders
  files                                   every file of the artifact with its byte size
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

from deleaker.runtime import op_schema
from deleaker.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST
from deleaker.runtime.config import DeLeakerConfig

# Image side range (pixels) recorded when --min-size/--max-size are not given, widened to include
# the example size: wide enough that the runtime's default sizes (256x256 on the tiny model,
# 1024x1024 for FLUX) need no flags.
DEFAULT_MIN_SIZE, DEFAULT_MAX_SIZE = 64, 1024


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a missing library is just not recorded
            pass
    try:
        from importlib.metadata import version

        out["deleaker"] = version("deleaker")
    except Exception:
        pass
    return out


def deleaker_section(config: DeLeakerConfig, blocks_per_step: int) -> dict:
    """The default settings (validated for this model) and the op contract of the nodes."""
    config.resolved(blocks_per_step)  # raises ConfigError on a bad default
    return {"config": dataclasses.asdict(config), "op_version": op_schema.ONNX_OPSET_VERSION}


def build_manifest(*, ckpt, spec, exported: dict, tokenizers: dict, source: str, opset: int) -> dict:
    """ckpt: export.checkpoint.FluxCheckpoint; spec: onnx_export.ExportSpec;
    exported: {model name: onnx_export.Exported}; tokenizers: {"tokenizer": folder, "tokenizer_2": folder}."""
    tcfg, vcfg = ckpt.transformer_config, ckpt.vae_config
    lo, hi = spec.size_range
    factor = ckpt.vae_scale_factor * 2  # pixels per image token
    model = {
        "in_channels": int(tcfg.get("in_channels", 64)),
        "latent_channels": int(vcfg.get("latent_channels", 16)),
        "vae_scale_factor": ckpt.vae_scale_factor,
        "vae_scaling_factor": float(vcfg.get("scaling_factor", 1.0)),
        "vae_shift_factor": float(vcfg.get("shift_factor") or 0.0),
        "max_text_tokens": spec.max_text_tokens,
        "clip_max_length": ckpt.clip_max_length,
        "entity_slots": spec.entity_slots,
        "guidance_embeds": ckpt.guidance_embeds,
        "blocks_per_step": ckpt.blocks_per_step,
        "num_double_blocks": int(tcfg.get("num_layers", 19)),
        "num_single_blocks": int(tcfg.get("num_single_layers", 38)),
        "transformer_config": {k: v for k, v in tcfg.items() if not k.startswith("_")},
        "scheduler_config": dict(ckpt.scheduler_config),
    }
    opt_tokens = (spec.height // factor) * (spec.width // factor)
    profiles = {
        "batch": [1, 1, spec.max_batch],  # min, opt, max
        "image_side": [lo, hi],  # pixels, both height and width
        "height": [lo, spec.height, hi],
        "width": [lo, spec.width, hi],
        "image_tokens": [(lo // factor) ** 2, opt_tokens, (hi // factor) ** 2],
        "text_tokens": spec.max_text_tokens,
        "entity_slots": spec.entity_slots,
    }
    models = {}
    for name, ex in exported.items():
        models[name] = {"file": ex.file, "external_data": ex.external_data, "inputs": ex.inputs,
                        "outputs": ex.outputs, "export_seconds": round(ex.seconds, 2), **ex.extra}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "producer": {"name": "deleaker-export", "onnx_opset": opset, **_versions()},
        "source_model": source,
        "model": model,
        "dtypes": {"transformer": spec.dtype, "text_encoders": spec.encoder_dtype, "vae": spec.encoder_dtype,
                   "io": "float32 (int64 for ids, step, grid, windows, rules)"},
        "profiles": profiles,
        "deleaker": deleaker_section(spec.deleaker, ckpt.blocks_per_step),
        "models": models,
        "backends": {"onnxruntime": {name: ex.file for name, ex in exported.items()}},
        "tokenizers": dict(tokenizers),
        "files": {},  # filled by write_manifest
    }


def write_manifest(root: Path, manifest: dict) -> Path:
    """Record every file's size, then write manifest.json (last, so it marks a complete artifact)."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            rel = p.relative_to(root).as_posix()
            if rel != MANIFEST:
                files[rel] = p.stat().st_size
    manifest = {**manifest, "files": dict(sorted(files.items()))}
    path = root / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path
