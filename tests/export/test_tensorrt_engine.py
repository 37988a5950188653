"""TensorRT engine builds and the tensorrt backend.

CPU CI: profile derivation from runtime/step_io.py and the manifest, manifest updates (read back
by the runtime's artifact loader), the plugin's attribute fields, argument errors, and the
one-line errors where tensorrt does not import. Tests marked `tensorrt` need TensorRT 10+ and a
GPU with the plugin built (DELEAKER_PLUGIN_DIR or build/); they skip with the reason elsewhere.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from deleaker.export import tensorrt_engine as te
from deleaker.export.manifest import write_manifest
from deleaker.runtime import op_schema, step_io
from deleaker.runtime.artifact import FORMAT, FORMAT_VERSION, MANIFEST, load_artifact
from deleaker.runtime.backends import tensorrt_backend as trtb


def _manifest(guidance: bool = True) -> dict:
    """A FLUX.1-dev-shaped manifest (1024 px export, sides 512..1024, batch up to 4)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "model": {"in_channels": 64, "latent_channels": 16, "vae_scale_factor": 8, "vae_scaling_factor": 0.3611,
                  "vae_shift_factor": 0.1159, "max_text_tokens": 512, "clip_max_length": 77, "entity_slots": 4,
                  "guidance_embeds": guidance, "blocks_per_step": 57, "scheduler_config": {},
                  "transformer_config": {"joint_attention_dim": 4096, "pooled_projection_dim": 768}},
        "models": {}, "backends": {"onnxruntime": {}}, "files": {},
        "tokenizers": {"tokenizer": "tokenizer", "tokenizer_2": "tokenizer_2"},
        "profiles": {"batch": [1, 1, 4], "image_side": [512, 1024], "height": [512, 1024, 1024],
                     "width": [512, 1024, 1024], "image_tokens": [1024, 4096, 4096], "text_tokens": 512,
                     "entity_slots": 4},
        "deleaker": {"config": {}, "op_version": op_schema.ONNX_OPSET_VERSION},
    }


# -- profiles ------------------------------------------------------------------------------------

def test_transformer_profile_follows_step_io_and_manifest():
    m = _manifest()
    profs = te.profiles(m, te.size_bounds(m), te.batch_bounds(m))
    tp = profs["transformer"]
    assert tuple(tp) == step_io.input_names(True)  # every step input, in step_io order
    assert tp["hidden_states"] == ((1, 1024, 64), (1, 4096, 64), (4, 4096, 64))
    assert tp["history"] == ((1, 4, 1024), (1, 4, 4096), (4, 4, 4096))
    assert tp["img_ids"] == ((1024, 3), (4096, 3), (4096, 3))
    assert tp["encoder_hidden_states"] == ((1, 512, 4096), (1, 512, 4096), (4, 512, 4096))
    assert tp["step"] == ((), (), ()) and tp["grid"] == ((2,), (2,), (2,))
    for name in op_schema.SETTINGS_TENSORS:
        w = op_schema.settings_width(name)
        assert tp[name] == ((1, w), (1, w), (4, w))
    assert profs["text_encoder"]["input_ids"] == ((1, 77), (1, 77), (4, 77))
    assert profs["text_encoder_2"]["input_ids"] == ((1, 512), (1, 512), (4, 512))
    assert profs["vae_decoder"]["latents"] == ((1, 16, 64, 64), (1, 16, 128, 128), (4, 16, 128, 128))


def test_profile_options_move_sizes_and_batch():
    m = _manifest(guidance=False)
    sizes = te.size_bounds(m, min_size="768", opt_size="768x1024", max_size="1024")  # WIDTHxHEIGHT
    profs = te.profiles(m, sizes, te.batch_bounds(m, max_batch=8))
    tp = profs["transformer"]
    assert "guidance" not in tp
    assert tp["hidden_states"] == ((1, 48 * 48, 64), (1, 64 * 48, 64), (8, 4096, 64))
    assert profs["vae_decoder"]["latents"] == ((1, 16, 96, 96), (1, 16, 128, 96), (8, 16, 128, 128))
    for shapes in tp.values():  # min <= opt <= max on every axis
        lo, opt, hi = shapes
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


@pytest.mark.parametrize("kw, match", [
    (dict(max_size="2048"), r"outside the artifact's image sides \[512, 1024\]"),
    (dict(min_size="520"), "multiples of 16"),
    (dict(min_size="1024", opt_size="768"), "--min <= --opt <= --max in height"),
    (dict(opt_size="big"), "SIDE or WIDTHxHEIGHT"),
    (dict(max_size="0x0"), "SIDE or WIDTHxHEIGHT"),
])
def test_size_errors_are_one_line(kw, match):
    with pytest.raises(te.EngineError, match=match) as e:
        te.size_bounds(_manifest(), **kw)
    assert "\n" not in str(e.value)


def test_batch_bound_errors_and_opt_clamp():
    m = _manifest()
    with pytest.raises(te.EngineError, match="--max-batch must be >= 1"):
        te.batch_bounds(m, 0)
    m["profiles"]["batch"] = [1, 2, 4]
    assert te.batch_bounds(m, 1) == (1, 1, 1)


# -- plugin fields -------------------------------------------------------------------------------

def test_plugin_fields_round_trip_in_schema_order():
    attrs = op_schema.node_attributes(block_offset=18, blocks_per_step=57)
    fields = te.plugin_fields(attrs)
    assert [n for n, _ in fields] == list(op_schema.ATTRIBUTE_NAMES)
    assert all(v.dtype == np.int64 and v.shape == (1,) for _, v in fields)
    assert te.attributes_from_fields(fields) == attrs
    with pytest.raises(te.EngineError, match="missing"):
        te.plugin_fields({"block_offset": 0})
    with pytest.raises(te.EngineError, match=r"unknown \['k_strength'\]"):
        te.plugin_fields({**attrs, "k_strength": 1})
    with pytest.raises(te.EngineError, match="one integer"):
        te.attributes_from_fields([("block_offset", np.array([1, 2])), ("blocks_per_step", np.array([3]))])


# -- manifest ------------------------------------------------------------------------------------

def test_manifest_records_plans_and_is_read_back(tmp_path):
    root = tmp_path / "artifact"
    (root / "tensorrt").mkdir(parents=True)
    (root / "transformer.onnx").write_bytes(b"x" * 10)
    base = _manifest()
    base["backends"]["onnxruntime"] = {"transformer": "transformer.onnx"}
    write_manifest(root, base)
    (root / "tensorrt" / "transformer.plan").write_bytes(b"p" * 123)
    (root / "tensorrt" / "vae_decoder.plan").write_bytes(b"v" * 45)
    profs = te.profiles(base, te.size_bounds(base), te.batch_bounds(base))
    new = te.manifest_with_engines(base, {"transformer": "tensorrt/transformer.plan"}, profs, trt_version="10.9.0",
                                   plugin_file="tensorrt/" + trtb.PLUGIN_LIBRARY, timing_cache=None,
                                   seconds={"transformer": 61.23})
    # a second build of another model keeps the first one's record
    new = te.manifest_with_engines(new, {"vae_decoder": "tensorrt/vae_decoder.plan"}, profs, trt_version="10.9.0",
                                   plugin_file="tensorrt/" + trtb.PLUGIN_LIBRARY, timing_cache="tensorrt/timing.cache",
                                   seconds={"vae_decoder": 5.0})
    write_manifest(root, new)
    art = load_artifact(root)
    assert art.path("tensorrt", "transformer") == root.resolve() / "tensorrt" / "transformer.plan"
    assert art.manifest["backends"]["onnxruntime"] == {"transformer": "transformer.onnx"}
    assert art.manifest["files"]["tensorrt/transformer.plan"] == 123
    assert art.manifest["files"]["tensorrt/vae_decoder.plan"] == 45
    sec = art.manifest["tensorrt"]
    assert sec["plugin"]["version"] == op_schema.PLUGIN_VERSION and sec["strongly_typed"] is True
    assert sec["build_seconds"] == {"transformer": 61.2, "vae_decoder": 5.0}
    assert sec["profiles"]["transformer"]["hidden_states"] == [[1, 1024, 64], [1, 4096, 64], [4, 4096, 64]]
    assert set(sec["profiles"]) == {"transformer", "vae_decoder"}
    # a truncated plan is caught by the loader (sizes recorded)
    (root / "tensorrt" / "transformer.plan").write_bytes(b"p")
    with pytest.raises(ValueError, match="truncated"):
        load_artifact(root)


# -- command line and missing TensorRT -----------------------------------------------------------

def _args(argv):
    p = argparse.ArgumentParser()
    te.add_parser(p.add_subparsers(dest="command"))
    return p.parse_args(argv)


def test_cli_errors_before_any_tensorrt_work(tmp_path):
    with pytest.raises(ValueError, match="artifact folder not found"):
        te.run(_args(["engine", str(tmp_path / "nope")]))
    with pytest.raises(te.EngineError, match="unknown model"):
        te.run(_args(["engine", str(tmp_path), "--models", "transformer,unet"]))


def test_missing_tensorrt_is_one_line(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt imports here")
    except ImportError:
        pass
    root = tmp_path / "artifact"
    root.mkdir()
    (root / "transformer.onnx").write_bytes(b"x")
    m = _manifest()
    m["backends"]["onnxruntime"] = {"transformer": "transformer.onnx"}
    write_manifest(root, m)
    with pytest.raises(trtb.TensorRTError, match="needs TensorRT's Python package") as e:
        te.run(_args(["engine", str(root), "--models", "transformer", "--opt", "768", "--max", "768"]))
    assert "\n" not in str(e.value)
    with pytest.raises(trtb.TensorRTError, match="tensorrt backend needs TensorRT"):
        trtb.TensorRTBackend.load(str(root))


@pytest.mark.parametrize("target", ["transformer.onnx", "manifest.json", "folder"])
def test_timing_cache_that_would_overwrite_the_artifact_is_refused(tmp_path, target):
    """--timing-cache is written by the build: naming an artifact file (or a folder) fails before TensorRT."""
    root = tmp_path / "artifact"
    root.mkdir()
    (root / "transformer.onnx").write_bytes(b"x" * 7)
    m = _manifest()
    m["backends"]["onnxruntime"] = {"transformer": "transformer.onnx"}
    write_manifest(root, m)
    cache = root if target == "folder" else root / target
    before = {p.name: p.read_bytes() for p in root.iterdir()}
    with pytest.raises(te.EngineError, match="is a folder" if target == "folder" else "would destroy it"):
        te.run(_args(["engine", str(root), "--models", "transformer", "--timing-cache", str(cache)]))
    assert {p.name: p.read_bytes() for p in root.iterdir()} == before


def test_backend_argument_errors():
    with pytest.raises(trtb.TensorRTError, match="pass --artifact"):
        trtb.TensorRTBackend.load(None)
    with pytest.raises(trtb.TensorRTError, match="CUDA GPU only"):
        trtb.TensorRTBackend.load("/x", device="cpu")


def test_plugin_library_lookup(tmp_path, monkeypatch):
    with pytest.raises(trtb.TensorRTError, match="plugin library not found"):
        trtb.find_plugin_library(tmp_path / "missing.so")
    monkeypatch.setenv("DELEAKER_PLUGIN_DIR", str(tmp_path / "env"))
    art = tmp_path / "art"
    (art / "tensorrt").mkdir(parents=True)
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / trtb.PLUGIN_LIBRARY).write_bytes(b"")
    assert trtb.find_plugin_library(None, art) == tmp_path / "env" / trtb.PLUGIN_LIBRARY
    (art / "tensorrt" / trtb.PLUGIN_LIBRARY).write_bytes(b"")  # the artifact's own copy wins
    assert trtb.find_plugin_library(None, art) == art / "tensorrt" / trtb.PLUGIN_LIBRARY
    assert trtb.find_plugin_library(tmp_path / "env") == tmp_path / "env" / trtb.PLUGIN_LIBRARY


# -- on a GPU with TensorRT ----------------------------------------------------------------------

def _trt_or_skip():
    try:
        trt = trtb.import_tensorrt("this test")
        lib = trtb.find_plugin_library()
    except trtb.TensorRTError as e:
        pytest.skip(str(e))
    trtb.load_plugin(trt, lib)  # the tensorrt marker's hook (conftest.py) checked CUDA
    return trt


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_one_node_network_matches_the_reference_op():
    """q, k, v, ... -> DeLeakerAttention plugin -> out, history_out vs modeling/reference_op.py."""
    trt = _trt_or_skip()
    import torch
    from polygraphy import cuda
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network

    from deleaker.modeling import reference_op
    from deleaker.runtime.config import DeLeakerConfig

    B, H, T, h, w, D, E, bps = 2, 2, 8, 8, 8, 64, 2, 3
    I = h * w
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, T + I, D, generator=g).half() for _ in range(3))
    ent = torch.zeros(B, E, T)
    ent[:, 0, 1], ent[:, 1, 3:5] = 1, 1
    hist = torch.rand(B, E, I, generator=g)
    cfgs = [DeLeakerConfig(num_steps=4).resolved(bps), DeLeakerConfig(num_steps=6, k_strength=2.0).resolved(bps)]
    windows, knobs, rules = reference_op.settings_tensors(cfgs)
    step, grid = torch.tensor(1), torch.tensor([h, w])
    attrs = op_schema.node_attributes(block_offset=1, blocks_per_step=bps)
    ref_out, ref_hist = reference_op.call_op(q.float(), k.float(), v.float(), ent, hist, step, grid, windows, knobs,
                                             rules, attrs)
    feeds = {"q": q, "k": k, "v": v, "entity_tokens": ent, "history": hist, "step": step, "grid": grid,
             "windows": windows, "knobs": knobs, "rules": rules}
    np_types = {torch.float16: trt.float16, torch.float32: trt.float32, torch.int64: trt.int64}

    builder = trt.Builder(trtb.trt_logger(trt))
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    tensors = [network.add_input(n, np_types[feeds[n].dtype], tuple(feeds[n].shape)) for n in op_schema.INPUT_NAMES]
    creator = trt.get_plugin_registry().get_creator(op_schema.PLUGIN_NAME, op_schema.PLUGIN_VERSION,
                                                    op_schema.PLUGIN_NAMESPACE)
    plugin = creator.create_plugin("deleaker", te.trt_plugin_fields(trt, attrs), trt.TensorRTPhase.BUILD)
    layer = network.add_plugin_v3(tensors, [], plugin)
    for i, t in enumerate(op_schema.OUTPUTS):
        layer.get_output(i).name = t.name
        network.mark_output(layer.get_output(i))
    plan = engine_bytes_from_network((builder, network), config=CreateConfig(profiles=[Profile()]))
    engine = trtb._Engine(trt, cuda, trt.Runtime(trtb.trt_logger(trt)).deserialize_cuda_engine(plan), "one-node")
    stream = cuda.Stream()
    outs = engine.run({n: t.numpy() for n, t in feeds.items()}, stream)
    got_out = torch.from_numpy(outs["out"]).float()
    assert outs["out"].dtype == np.float16
    assert torch.allclose(got_out, ref_out.float(), atol=2e-2, rtol=2e-2), (got_out - ref_out).abs().max()
    assert torch.allclose(torch.from_numpy(outs["history_out"]), ref_hist, atol=1e-3, rtol=1e-3)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.slow
def test_tiny_model_engines_match_onnxruntime(tmp_path):
    """The tiny model (head dim 64, fp16 transformer): built engines vs ONNX Runtime, one step."""
    _trt_or_skip()
    from deleaker.export.onnx_export import ExportSpec, export_artifact
    from deleaker.modeling.tiny_model import ensure_tiny_model
    from deleaker.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    spec = ExportSpec(height=64, width=64, min_size=32, max_size=64, max_text_tokens=16, entity_slots=2,
                      dtype="fp16", max_batch=2)
    art = export_artifact(ensure_tiny_model("tiny-h64"), tmp_path / "art", spec)
    te.build_engines(art)
    manifest = json.loads((art / MANIFEST).read_text())
    assert set(manifest["backends"]["tensorrt"]) == set(te.MODELS)
    trt_backend = trtb.TensorRTBackend.load(str(art))
    ort = OnnxRuntimeBackend.load(str(art), device="cpu")
    rng = np.random.default_rng(0)
    info = trt_backend.info
    B, T = 2, info.max_text_tokens
    clip = rng.integers(0, 50, (B, info.clip_max_length)).astype(np.int64)
    t5 = rng.integers(0, 50, (B, T)).astype(np.int64)
    e_trt, p_trt = trt_backend.encode_prompt(clip, t5)
    e_ort, p_ort = ort.encode_prompt(clip, t5)
    np.testing.assert_allclose(e_trt, e_ort, atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(p_trt, p_ort, atol=2e-3, rtol=2e-3)
    h = w = 4
    I = h * w
    ent = np.zeros((B, info.entity_slots, T), np.float32)
    ent[:, 0, 1], ent[:, 1, 2] = 1, 1
    from deleaker.runtime.config import DeLeakerConfig

    settings = op_schema.pack_settings([DeLeakerConfig(num_steps=4).resolved(info.blocks_per_step)] * B)
    img_ids = np.stack(np.meshgrid(np.zeros(1), np.arange(h), np.arange(w), indexing="ij"), -1).reshape(I, 3)
    feeds = {"hidden_states": rng.standard_normal((B, I, info.in_channels)).astype(np.float32),
             "encoder_hidden_states": e_ort, "pooled_projections": p_ort, "timestep": np.full(B, 0.5, np.float32),
             "img_ids": img_ids.astype(np.float32), "txt_ids": np.zeros((T, 3), np.float32),
             "guidance": np.full(B, 3.5, np.float32), "entity_tokens": ent,
             "history": rng.random((B, info.entity_slots, I)).astype(np.float32),
             "step": np.asarray(1, np.int64), "grid": np.array([h, w], np.int64), **settings}
    got = trt_backend.run_step({k: v for k, v in feeds.items() if k in trt_backend.engines["transformer"].inputs})
    want = ort.models["transformer"].run({k: v for k, v in feeds.items() if k in ort.models["transformer"].input_names},
                                         out_shapes={"noise_pred": feeds["hidden_states"].shape,
                                                     "history_out": feeds["history"].shape})
    np.testing.assert_allclose(got["noise_pred"], want["noise_pred"], atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(got["history_out"], want["history_out"], atol=2e-3, rtol=2e-3)
