"""TensorRT engines for an artifact: `deleaker-export engine ARTIFACT` (polygraphy's TensorRT API).

    deleaker-export engine ARTIFACT [--plugin PATH] [--min 512] [--opt 1024x768] [--max 1024]
                           [--max-batch 4] [--models transformer,...] [--timing-cache PATH]

Builds one plan per model of the artifact's ONNX files (strongly typed networks: the precisions
are the ONNX graph's), with one optimisation profile each. The transformer's profile follows the
ONE step I/O definition (runtime/step_io.py: which axes are batch / image tokens) and the sizes of
the artifact's manifest (`profiles`), narrowed or moved by --min/--opt/--max and --max-batch.
A timing cache (ARTIFACT/tensorrt/timing.cache by default) makes rebuilds fast.

The plans, a copy of the plugin library and the timing cache go to ARTIFACT/tensorrt/; the
manifest gains `backends.tensorrt` ({model: file}) and a `tensorrt` section (versions, profiles,
build seconds); its `files` list records every file with its byte size.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from deleaker.runtime import op_schema, step_io
from deleaker.runtime.artifact import MANIFEST, load_artifact
from deleaker.runtime.backends import tensorrt_backend as trtb
from deleaker.runtime.cli_help import DefaultsHelpFormatter
from deleaker.runtime.request import RequestError, Size, parse_size

log = logging.getLogger("deleaker")

MODELS = trtb.MODELS
ENGINE_DIR = trtb.BACKEND  # ARTIFACT/tensorrt/
TIMING_CACHE = "timing.cache"


class EngineError(ValueError):
    """An engine build request is invalid; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Sizes and profiles (pure: no TensorRT needed)
# --------------------------------------------------------------------------------------------

def _option_size(text: str, option: str) -> Size:
    """--min/--opt/--max: "1024" (square) or "768x1024" (WIDTHxHEIGHT, as everywhere) in pixels."""
    try:
        size = parse_size(str(text), f"--{option}", square=True)
    except RequestError as e:
        raise EngineError(str(e)) from None
    if min(size) <= 0:
        raise EngineError(f"--{option} must be SIDE or WIDTHxHEIGHT in positive pixels, got {text!r}")
    return size


def size_bounds(manifest: dict, min_size: str | None = None, opt_size: str | None = None,
                max_size: str | None = None) -> dict[str, Size]:
    """{"min", "opt", "max"} -> Size pixels: the manifest's, overridden by the options.

    Every size must be a multiple of the pixels per image token and lie inside the artifact's
    image-side range (what the runtime accepts for it), and min <= opt <= max per side.
    """
    prof, model = manifest["profiles"], manifest["model"]
    lo, hi = (int(v) for v in prof["image_side"])
    sizes = {"min": Size(lo, lo), "opt": Size(width=int(prof["width"][1]), height=int(prof["height"][1])),
             "max": Size(hi, hi)}
    for key, text in (("min", min_size), ("opt", opt_size), ("max", max_size)):
        if text is not None:
            sizes[key] = _option_size(text, key)
    factor = int(model["vae_scale_factor"]) * 2  # pixels per image token side
    for key, s in sizes.items():
        for side in s:
            if side % factor:
                raise EngineError(f"--{key} {s.width}x{s.height}: sides must be multiples of {factor} pixels")
            if not lo <= side <= hi:
                raise EngineError(f"--{key} {s.width}x{s.height} lies outside the artifact's image sides [{lo}, {hi}]; "
                                  f"re-export with `deleaker-export onnx --min-size/--max-size`")
    for name in ("height", "width"):
        lo_, opt, hi_ = (getattr(sizes[k], name) for k in ("min", "opt", "max"))
        if not lo_ <= opt <= hi_:
            raise EngineError(f"need --min <= --opt <= --max in {name}; got {lo_}, {opt}, {hi_}")
    return sizes


def batch_bounds(manifest: dict, max_batch: int | None = None) -> tuple[int, int, int]:
    lo, opt, hi = (int(v) for v in manifest["profiles"]["batch"])
    if max_batch is not None:
        if max_batch < 1:
            raise EngineError(f"--max-batch must be >= 1, got {max_batch}")
        hi = max_batch
    return (1, max(1, min(opt, hi)), hi)


def _dims(manifest: dict) -> dict[str, int]:
    """Static symbolic dims of the step from the manifest ("C", "T", "E", ...)."""
    m, prof = manifest["model"], manifest["profiles"]
    tcfg = m.get("transformer_config", {})
    dims = {"C": int(m["in_channels"]), "T": int(prof["text_tokens"]), "E": int(prof["entity_slots"])}
    shapes = manifest.get("models", {}).get("transformer", {}).get("inputs", {})
    for name, key in ((step_io.TEXT_ENCODER_2.output, "Dt"), (step_io.TEXT_ENCODER.output, "Dp")):
        shape = shapes.get(name, {}).get("shape")
        if shape and isinstance(shape[-1], int):
            dims[key] = int(shape[-1])
    dims.setdefault("Dt", int(tcfg.get("joint_attention_dim", 4096)))
    dims.setdefault("Dp", int(tcfg.get("pooled_projection_dim", 768)))
    return dims


def profiles(manifest: dict, sizes: dict[str, Size], batch: tuple[int, int, int]) -> dict[str, dict]:
    """{model: {input: (min shape, opt shape, max shape)}} for every model of the artifact."""
    m = manifest["model"]
    token = int(m["vae_scale_factor"]) * 2
    tokens = tuple((sizes[k].height // token) * (sizes[k].width // token) for k in ("min", "opt", "max"))
    dyn = {step_io.BATCH: batch, step_io.IMAGE_TOKENS: tokens}
    dims = _dims(manifest)
    out: dict[str, dict] = {"transformer": {}}
    for t in step_io.inputs_for(bool(m["guidance_embeds"])):
        shapes = []
        for k in range(3):
            shape = []
            for d in t.shape:
                if d in dyn:
                    shape.append(dyn[d][k])
                elif isinstance(d, int):
                    shape.append(d)
                elif d in dims:
                    shape.append(dims[d])
                else:
                    raise EngineError(f"step input {t.name} has dim {d!r} the manifest does not give; re-export")
            shapes.append(tuple(shape))
        out["transformer"][t.name] = tuple(shapes)
    clip, t5, vae = step_io.TEXT_ENCODER, step_io.TEXT_ENCODER_2, step_io.VAE_DECODER
    out[clip.name] = {clip.input: tuple((b, int(m["clip_max_length"])) for b in batch)}
    out[t5.name] = {t5.input: tuple((b, int(m["max_text_tokens"])) for b in batch)}
    f = int(m["vae_scale_factor"])
    out[vae.name] = {vae.input: tuple((b, int(m["latent_channels"]), s.height // f, s.width // f)
                                      for b, s in zip(batch, (sizes["min"], sizes["opt"], sizes["max"])))}
    return out


# --------------------------------------------------------------------------------------------
# The plugin's fields (a Python mirror of plugins/tensorrt/deleaker_fields.h)
# --------------------------------------------------------------------------------------------

def plugin_fields(attrs: dict) -> list[tuple[str, "object"]]:
    """[(field name, int64 array of one value)] in op_schema.ATTRIBUTES order (what the creator reads)."""
    import numpy as np

    missing = [a for a in op_schema.ATTRIBUTE_NAMES if a not in attrs]
    unknown = sorted(set(attrs) - set(op_schema.ATTRIBUTE_NAMES))
    if missing or unknown:
        raise EngineError(f"plugin attributes: missing {missing or 'none'}, unknown {unknown or 'none'}; "
                          f"the op has {', '.join(op_schema.ATTRIBUTE_NAMES)}")
    return [(a.name, np.array([int(attrs[a.name])], dtype=np.int64)) for a in op_schema.ATTRIBUTES]


def attributes_from_fields(fields) -> dict:
    """Inverse of plugin_fields: [(name, array-like of one integer)] -> attribute dict."""
    out = {}
    for name, data in fields:
        if name not in op_schema.ATTRIBUTE_NAMES:
            raise EngineError(f"unknown plugin field {name!r}")
        values = list(getattr(data, "tolist", lambda: data)())
        if len(values) != 1:
            raise EngineError(f"plugin field {name!r} must hold one integer, got {values}")
        out[name] = int(values[0])
    return op_schema.node_attributes(**out)


def trt_plugin_fields(trt, attrs: dict):
    """A trt.PluginFieldCollection of the attributes (for creator.create_plugin)."""
    return trt.PluginFieldCollection([trt.PluginField(n, v, trt.PluginFieldType.INT64) for n, v in plugin_fields(attrs)])


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------

def manifest_with_engines(manifest: dict, plans: dict[str, str], profs: dict[str, dict], *, trt_version: str,
                          plugin_file: str | None, timing_cache: str | None, seconds: dict[str, float]) -> dict:
    """The manifest with `backends.tensorrt` = {model: plan file} and a `tensorrt` section
    (sizes are recorded by write_manifest's `files`). Existing plans of other models are kept."""
    backends = dict(manifest.get("backends", {}))
    engines = {**backends.get(ENGINE_DIR, {}), **plans}
    backends[ENGINE_DIR] = dict(sorted(engines.items()))
    old = manifest.get("tensorrt", {})
    section = {
        "tensorrt_version": trt_version,
        "plugin": {"name": op_schema.PLUGIN_NAME, "namespace": op_schema.PLUGIN_NAMESPACE,
                   "version": op_schema.PLUGIN_VERSION, "library": plugin_file},
        "strongly_typed": True,
        "profiles": {**old.get("profiles", {}),
                     **{m: {n: [list(s) for s in shapes] for n, shapes in p.items()} for m, p in profs.items()
                        if m in plans}},
        "build_seconds": {**old.get("build_seconds", {}), **{m: round(s, 1) for m, s in seconds.items()}},
        "timing_cache": timing_cache,
    }
    return {**manifest, "backends": backends, "tensorrt": section}


# --------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------

def _plugin_graph(onnx_path: Path) -> Path | None:
    """A copy of the graph without the op's ONNX function body, beside the original (so external
    data still resolves), or None when there is none. ONNX Runtime needs the body; TensorRT's
    parser would inline it instead of binding the plugin."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    keep = [f for f in model.functions if (f.domain, f.name) != (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)]
    if len(keep) == len(model.functions):
        return None
    del model.functions[:]
    model.functions.extend(keep)
    out = onnx_path.with_name(f".{onnx_path.stem}.tensorrt.onnx")
    onnx.save(model, str(out))
    return out


def _check_timing_cache(art, timing_cache, plugin) -> None:
    """--timing-cache is written: refuse a folder, or a file of the artifact (or the plugin) it would overwrite."""
    if timing_cache is None:
        return
    cache = Path(timing_cache).expanduser().resolve()
    if cache.is_dir():
        raise EngineError(f"--timing-cache {timing_cache} is a folder; name a file")
    own = (art.root / ENGINE_DIR / TIMING_CACHE).resolve()
    inputs = {(art.root / rel).resolve() for rel in art.manifest.get("files", {})} | {(art.root / MANIFEST).resolve()}
    if plugin is not None:
        inputs.add(Path(plugin).expanduser().resolve())
    if cache != own and cache in inputs:
        raise EngineError(f"--timing-cache {timing_cache} is a file of the artifact or the plugin; writing the "
                          f"cache there would destroy it (default: ARTIFACT/{ENGINE_DIR}/{TIMING_CACHE})")


def build_engines(artifact_dir: str | Path, *, plugin: str | Path | None = None, min_size: str | None = None,
                  opt_size: str | None = None, max_size: str | None = None, max_batch: int | None = None,
                  models=MODELS, timing_cache: str | Path | None = None, workspace_gb: float | None = None) -> Path:
    """Build the plans of `models` into ARTIFACT/tensorrt/ and record them in the manifest."""
    from .manifest import write_manifest

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise EngineError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    art = load_artifact(artifact_dir)
    manifest = art.manifest
    profs = profiles(manifest, size_bounds(manifest, min_size, opt_size, max_size), batch_bounds(manifest, max_batch))
    for m in models:
        art.path("onnxruntime", m)  # the ONNX file must be there (one-line error otherwise)
    _check_timing_cache(art, timing_cache, plugin)
    trt = trtb.import_tensorrt("building TensorRT engines")
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    lib = None
    if "transformer" in models:
        lib = trtb.load_plugin(trt, trtb.find_plugin_library(plugin, art.root))
    out_dir = art.root / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    cache = Path(timing_cache) if timing_cache is not None else out_dir / TIMING_CACHE
    plans, seconds = {}, {}
    for i, m in enumerate(models, 1):
        onnx_path = art.path("onnxruntime", m)
        profile = Profile()
        for name, (lo, opt, hi) in profs[m].items():
            profile.add(name, lo, opt, hi)
        log.info("[%d/%d] building the %s engine from %s (this can take many minutes)", i, len(models), m,
                 onnx_path.name)
        t0 = time.perf_counter()
        pools = {trt.MemoryPoolType.WORKSPACE: int(workspace_gb * 2**30)} if workspace_gb else None
        config = CreateConfig(profiles=[profile], load_timing_cache=str(cache) if cache.exists() else None,
                              memory_pool_limits=pools)
        stripped = _plugin_graph(onnx_path) if m == "transformer" else None
        try:
            network = network_from_onnx_path(str(stripped or onnx_path), strongly_typed=True)
            plan = engine_bytes_from_network(network, config=config, save_timing_cache=str(cache))
        finally:
            if stripped is not None:
                stripped.unlink(missing_ok=True)
        if plan is None:
            raise EngineError(f"TensorRT could not build the {m} engine (see its log above)")
        rel = f"{ENGINE_DIR}/{m}.plan"
        tmp = art.root / (rel + ".tmp")
        try:
            tmp.write_bytes(bytes(plan))
            tmp.replace(art.root / rel)  # a plan file is either complete or absent
        finally:
            tmp.unlink(missing_ok=True)
        plans[m], seconds[m] = rel, time.perf_counter() - t0
        log.info("[%d/%d] %s: %s (%.1f MB) in %.0fs", i, len(models), m, rel, len(plan) / 2**20, seconds[m])
    plugin_file = (manifest.get("tensorrt") or {}).get("plugin", {}).get("library")
    if lib is not None:
        plugin_file = f"{ENGINE_DIR}/{trtb.PLUGIN_LIBRARY}"
        if lib.resolve() != (art.root / plugin_file).resolve():
            shutil.copy2(lib, art.root / plugin_file)  # the plans need this exact library to run
    cache_rel = cache.relative_to(art.root).as_posix() if cache.is_relative_to(art.root) else None
    new = manifest_with_engines(manifest, plans, profs, trt_version=trt.__version__, plugin_file=plugin_file,
                                timing_cache=cache_rel, seconds=seconds)
    write_manifest(art.root, new)
    log.info("recorded %d engine(s) in %s", len(plans), art.root / MANIFEST)
    return art.root


# --------------------------------------------------------------------------------------------
# Command line (hooked into `deleaker-export` by export/cli.py)
# --------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    e = subparsers.add_parser("engine", formatter_class=DefaultsHelpFormatter, help="build TensorRT engines for an artifact (needs TensorRT and a GPU)")
    e.add_argument("artifact", help="artifact folder written by `deleaker-export onnx`")
    e.add_argument("--plugin", help=f"the plugin library ({trtb.PLUGIN_LIBRARY}) or its folder "
                                    "(default: $DELEAKER_PLUGIN_DIR, then build/)")
    e.add_argument("--min", dest="min_size", help="smallest image, SIDE or WIDTHxHEIGHT pixels (default: the artifact's)")
    e.add_argument("--opt", dest="opt_size", help="image size TensorRT optimises for (default: the export size)")
    e.add_argument("--max", dest="max_size", help="largest image (default: the artifact's)")
    e.add_argument("--max-batch", type=int, help="largest batch (default: the artifact's profile)")
    e.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS))
    e.add_argument("--timing-cache", help=f"timing cache file (default: ARTIFACT/{ENGINE_DIR}/{TIMING_CACHE})")
    e.add_argument("--workspace-gb", type=float, help="cap on TensorRT's build workspace (GiB)")
    e.add_argument("--quiet", action="store_true", help="only errors")
    e.add_argument("--debug", action="store_true", help="full tracebacks on errors")
    return e


def run(args) -> int:
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    t0 = time.perf_counter()
    out = build_engines(args.artifact, plugin=args.plugin, min_size=args.min_size, opt_size=args.opt_size,
                        max_size=args.max_size, max_batch=args.max_batch, models=models,
                        timing_cache=args.timing_cache, workspace_gb=args.workspace_gb)
    built = json.loads((out / MANIFEST).read_text())["backends"][ENGINE_DIR]
    print(f"built {', '.join(m for m in models if m in built)} engines in {out / ENGINE_DIR} "
          f"in {time.perf_counter() - t0:.0f}s")
    return 0
