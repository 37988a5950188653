"""deleaker-export onnx on the tiny model: the artifact, its graph, and ONNX Runtime vs PyTorch.

One artifact is exported per test session (about half a minute) and shared. It is exported
with external data for every model, so the external-data paths (checker by path, ORT loading,
re-parameterising the DeLeaker nodes) are what the tests exercise.

Tolerances: the ONNX graph and PyTorch compute the same float32 math in different orders;
one op differs by ~1e-7, one transformer step by ~1e-5 (measured ~5e-6), a whole loop of
8 steps by ~1e-5 (the scheduler is linear in the model output). atol 1e-4 is ~10x that and far
below the DeLeaker effect the tests require (> 1e-3).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from deleaker.export import onnx_op  # noqa: E402
from deleaker.export.checkpoint import open_checkpoint  # noqa: E402
from deleaker.export.flux import DeLeakerFlux  # noqa: E402
from deleaker.export.onnx_export import ExportSpec, export_artifact, transformer_example  # noqa: E402
from deleaker.runtime import op_schema  # noqa: E402
from deleaker.runtime.artifact import FORMAT_VERSION, load_artifact  # noqa: E402
from deleaker.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend, _patched_transformer  # noqa: E402
from deleaker.runtime.config import DeLeakerConfig  # noqa: E402

ATOL = 1e-4
SPEC = ExportSpec(height=64, width=96, min_size=32, max_size=128, max_text_tokens=64, entity_slots=3,
                  external_data=True)  # DeLeaker settings: the flux-dev preset, 20 steps
# Windows open early and no smoothing: on the tiny model's small grids (and random weights) the
# masks then fire, so "DeLeaker on" really differs from "off". Exercises re-parameterisation.
FIRING = DeLeakerConfig(num_steps=8, start_aggregating_from=2, start_intervention_from=3, do_smoothing=False)


@pytest.fixture(scope="session")
def artifact_dir(tiny_model_dir, tmp_path_factory):
    return export_artifact(tiny_model_dir, tmp_path_factory.mktemp("onnx") / "artifact", SPEC)


def session(model):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# The artifact and the graph
# --------------------------------------------------------------------------------------------

def test_artifact_layout_and_manifest(artifact_dir, tiny_model_dir):
    art = load_artifact(artifact_dir)
    m = art.manifest
    assert m["format_version"] == FORMAT_VERSION
    ckpt = open_checkpoint(tiny_model_dir)
    assert m["model"]["blocks_per_step"] == ckpt.blocks_per_step
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae_decoder"):
        path = art.path("onnxruntime", name)
        assert path.is_file()
        assert m["models"][name]["external_data"] == path.name + ".data"
        assert (path.parent / (path.name + ".data")).is_file()
    assert (artifact_dir / "tokenizer" / "tokenizer.json").is_file()
    assert (artifact_dir / "tokenizer_2" / "tokenizer.json").is_file()
    # every file is listed with its size (what the loader checks for truncation)
    listed = set(m["files"])
    on_disk = {p.relative_to(artifact_dir).as_posix() for p in artifact_dir.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    t = m["models"]["transformer"]
    assert list(t["inputs"]) == ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep",
                                 "img_ids", "txt_ids", "guidance", "entity_tokens", "history", "step", "grid"]
    assert t["inputs"]["hidden_states"]["shape"] == ["batch", "image_tokens", 64]  # dynamic batch and size
    assert t["inputs"]["entity_tokens"]["shape"] == ["batch", 3, 64]
    assert t["outputs"]["history_out"] == {"dtype": "float32", "shape": ["batch", 3, "image_tokens"]}
    info = art.model_info()
    assert (info.entity_slots, info.max_text_tokens, info.size_range) == (3, 64, (32, 128))
    assert m["deleaker"]["num_steps"] == 20 and m["deleaker"]["attributes"]["stop_intervention_at"] == 20 * 4


def test_transformer_graph_has_one_op_node_per_block(artifact_dir):
    path = load_artifact(artifact_dir).path("onnxruntime", "transformer")
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if onnx_op.is_op_node(n)]
    bps = 4
    assert len(nodes) == bps
    cfg = SPEC.deleaker.resolved(bps)
    offsets = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.pop("plugin_namespace") == op_schema.PLUGIN_NAMESPACE.encode()
        assert attrs.pop("plugin_version") == op_schema.PLUGIN_VERSION.encode()
        want = cfg.op_attributes(attrs["block_offset"])
        assert attrs == pytest.approx(want)
        assert list(node.input)[3:] == ["entity_tokens", node.input[4], "step", "grid"]
        offsets.append(attrs["block_offset"])
    assert sorted(offsets) == list(range(bps))
    # no attention left outside the op: the graph has no Softmax of its own
    assert not [n for n in model.graph.node if n.op_type == "Softmax"]
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)
    assert {d for d, _ in onnx_op.function_body_op_types(fn)} <= {""}
    assert {o.domain: o.version for o in model.opset_import}[op_schema.ONNX_DOMAIN] == op_schema.ONNX_OPSET_VERSION


# --------------------------------------------------------------------------------------------
# One step: transformer.onnx vs DeLeakerFlux
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_transformer(tiny_model_dir):
    return open_checkpoint(tiny_model_dir).load_transformer("float32")


def _step_inputs(transformer, B, height, width, step, seed=0):
    torch.manual_seed(seed)
    x = transformer_example(transformer, ExportSpec(height=height, width=width, max_text_tokens=64,
                                                    entity_slots=3, min_size=16, max_size=4096), batch=B)
    x["entity_tokens"][:, 2, 10:12] = 1  # three active slots (E=3 pairs)
    x["history"] = torch.rand(x["history"].shape) * 0.05
    x["step"] = torch.tensor(step)
    return x


@pytest.mark.parametrize("config_name", ["exported", "firing"])
def test_one_step_matches_torch(artifact_dir, tiny_transformer, config_name):
    art = load_artifact(artifact_dir)
    path = art.path("onnxruntime", "transformer")
    if config_name == "exported":
        cfg, sess = SPEC.deleaker, session(str(path))
        steps = (2, 4, 25)  # tau 8..11 (history only), 16..19 (crosses i0 = 18), 100.. (after i1 = 80)
    else:
        cfg = FIRING
        attrs = {k: v for k, v in cfg.resolved(4).op_attributes(0).items() if k != "block_offset"}
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        sess = ort.InferenceSession(_patched_transformer(path, attrs), opts, providers=["CPUExecutionProvider"])
        steps = (1, 3)
    flux = DeLeakerFlux(copy.deepcopy(tiny_transformer), cfg)
    fired = 0
    for B, (height, width) in ((2, (64, 96)), (1, (128, 48))):  # dynamic batch and non-square sizes
        for step in steps:
            x = _step_inputs(tiny_transformer, B, height, width, step)
            with torch.no_grad():
                want, want_h = flux(**x)
                plain, _ = flux(**{**x, "entity_tokens": torch.zeros_like(x["entity_tokens"])})
            got, got_h = sess.run(None, {k: v.numpy() for k, v in x.items()})
            np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)
            np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-5)
            fired += float((want - plain).abs().max()) > 1e-3
    if config_name == "firing":
        assert fired == 4, "the DeLeaker edits never changed the output: the test would not catch errors"


# --------------------------------------------------------------------------------------------
# The whole loop: runtime pipeline on onnxruntime vs torch
# --------------------------------------------------------------------------------------------

def test_generation_matches_torch_backend(artifact_dir, tiny_model_dir):
    from deleaker.export.torch_backend import TorchBackend
    from deleaker.runtime.pipeline import GenerateRequest, Pipeline

    ort_be = OnnxRuntimeBackend.load(str(artifact_dir), deleaker_config=FIRING)
    torch_be = TorchBackend.load(str(tiny_model_dir), deleaker_config=FIRING, entity_slots=3, max_text_tokens=64)
    latents = {}
    for name, be in (("onnxruntime", ort_be), ("torch", torch_be)):
        pipe = Pipeline(be)
        for on in (True, False):
            req = GenerateRequest(prompt="a cat and a cheetah in a field", entities=("cat", "cheetah"), seed=3,
                                  steps=8, height=64, width=96, deleaker=on)
            r = pipe.generate(req, progress=False)
            latents[name, on] = r.latents
            latents[name, on, "history"] = r.history
            latents[name, on, "image"] = r.images
    for on in (True, False):
        np.testing.assert_allclose(latents["onnxruntime", on], latents["torch", on], atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(latents["onnxruntime", on, "history"], latents["torch", on, "history"],
                                   atol=1e-6, rtol=1e-5)
        # uint8 images: an error of ~1e-5 can flip a rounding by one level, never more
        assert np.abs(latents["onnxruntime", on, "image"].astype(int) - latents["torch", on, "image"]).max() <= 1
    assert np.abs(latents["torch", True] - latents["torch", False]).max() > 1e-3  # DeLeaker did something
    assert np.abs(latents["onnxruntime", False, "history"]).max() == 0


def test_backend_reuses_buffers_and_returns_copies(artifact_dir):
    be = OnnxRuntimeBackend.load(str(artifact_dir))
    model = be.models["transformer"]
    x = {k: v.numpy() for k, v in _step_inputs(open_checkpoint_transformer(artifact_dir), 1, 64, 96, 5).items()}
    n1, h1 = be.step(x)
    bufs = dict(model._out_bufs)
    n2, h2 = be.step({**x, "history": h1})
    assert all(model._out_bufs[k] is bufs[k] for k in bufs)  # same output buffers, step after step
    assert not np.shares_memory(n1, n2) and not np.shares_memory(h1, h2)  # caller's arrays are its own
    n3, _ = be.step(x)
    np.testing.assert_array_equal(n1, n3)  # deterministic, and the reuse leaks nothing between calls


def open_checkpoint_transformer(artifact_dir):
    """Only the config is needed for example inputs: a stand-in with the artifact's dims."""
    m = load_artifact(artifact_dir).model

    class Cfg:
        config = type("C", (), {k: m["transformer_config"][k] for k in
                                ("in_channels", "joint_attention_dim", "pooled_projection_dim")})

    return Cfg()


# --------------------------------------------------------------------------------------------
# The runtime from the artifact alone, and bad input
# --------------------------------------------------------------------------------------------

BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'torch', 'diffusers', 'transformers', 'onnx', 'onnxscript', 'polygraphy'}:
            raise ImportError('blocked in this test: ' + name)
sys.meta_path.insert(0, Block())
"""


def _run(code: str, timeout: int = 300):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_generate_from_artifact_without_torch(artifact_dir, tmp_path):
    """`deleaker generate --artifact` in a process where importing torch, diffusers or onnx raises."""
    out = tmp_path / "cat.png"
    code = BLOCKER + f"""
try:  # the blocker must work, or the test proves nothing
    import torch
    raise SystemExit('blocker failed')
except ImportError:
    pass
from deleaker.runtime.cli import main
rc = main(['generate', '--artifact', {str(artifact_dir)!r}, '--prompt', 'a cat and a cheetah in a field',
           '--entities', 'cat,cheetah', '--height', '64', '--width', '96', '--compare', '--quiet',
           '--out', {str(out)!r}])
assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'onnx')], 'heavy import'
raise SystemExit(rc)
"""
    r = _run(code)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    img = Image.open(out)
    assert img.height >= 64 and img.width >= 2 * 96  # vanilla | DeLeaker side by side


def _copy(artifact_dir, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(artifact_dir, dst)
    return dst


def _generate(artifact, tmp_path, *extra, prompt="a cat and a cheetah in a field", entities="cat,cheetah"):
    from deleaker.runtime.cli import main

    out = tmp_path / "x.png"
    args = ["generate", "--artifact", str(artifact), "--prompt", prompt, "--entities", entities, "--height", "64",
            "--width", "96", "--quiet", "--out", str(out), *extra]
    return main(args), out


def _edit_manifest(root, fn):
    p = root / "manifest.json"
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("problem", ["format_version", "missing_file", "truncated_file", "no_manifest"])
def test_bad_artifact_is_a_clear_error(artifact_dir, tmp_path, capsys, problem):
    art = _copy(artifact_dir, tmp_path)
    if problem == "format_version":
        _edit_manifest(art, lambda m: m.update(format_version=99))
        expect = ["format version 99", "reads version 1", "re-export"]
    elif problem == "missing_file":
        (art / "vae_decoder.onnx").unlink()
        expect = ["missing vae_decoder.onnx", "copy it again or re-export"]
    elif problem == "truncated_file":
        data = art / "transformer.onnx.data"
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
        expect = ["transformer.onnx.data", "truncated"]
    else:
        (art / "manifest.json").unlink()
        expect = ["not a deleaker artifact", "deleaker-export onnx"]
    rc, out = _generate(art, tmp_path)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("deleaker: error:"), err
    for word in expect:
        assert word in err, (word, err)


@pytest.mark.parametrize("problem", ["too_many_entities", "size_outside_range", "prompt_too_long"])
def test_bad_request_is_a_clear_error(artifact_dir, tmp_path, capsys, problem):
    kw, extra = {}, []
    if problem == "too_many_entities":
        kw = dict(prompt="a cat, a dog, a fox and a cow", entities="cat,dog,fox,cow")
        expect = ["4 entities", "3 entity slots"]
    elif problem == "size_outside_range":
        extra = ["--height", "256"]
        expect = ["height 256", "outside the exported range [32, 128]", "re-export"]
    else:
        kw = dict(prompt="a cat and a cheetah in a field " + "with a red ball " * 30)
        expect = ["64", "tokens"]
    rc, out = _generate(artifact_dir, tmp_path, *extra, **kw)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists(), err
    for word in expect:
        assert word in err, (word, err)


# --------------------------------------------------------------------------------------------
# deleaker-export verify
# --------------------------------------------------------------------------------------------

def test_verify_passes_and_reports_errors(artifact_dir, tiny_model_dir, capsys):
    from deleaker.export.cli import main

    rc = main(["verify", str(artifact_dir), "--model", str(tiny_model_dir), "--height", "64", "--width", "96",
               "--steps", "8", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for check, output in (("op", "out"), ("op", "history_out"), ("step", "noise_pred"), ("step", "history_out"),
                          ("loop", "latents"), ("loop", "history")):
        line = next(ln for ln in out.splitlines() if ln.startswith(check) and f" {output} " in ln)
        assert "max_abs" in line and "mean_abs" in line and line.endswith("PASS")
    n = sum(1 for ln in out.splitlines() if ln.endswith("PASS"))
    assert n >= 16 and f"verify: {n}/{n} outputs within tolerance" in out


def test_verify_fails_past_tolerance(artifact_dir, tiny_model_dir, capsys):
    from deleaker.export.cli import main

    rc = main(["verify", str(artifact_dir), "--model", str(tiny_model_dir), "--checks", "op", "--atol", "0",
               "--rtol", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 1 and out.splitlines()[-1].startswith("verify: ") and "FAILED:" in out and "op/out" in out


# --------------------------------------------------------------------------------------------
# Other transformer variants: no guidance input (FLUX.1-schnell), half-precision weights
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,guidance", [("fp32", False), ("fp16", True), ("bf16", True)])
def test_transformer_variants(tmp_path, dtype, guidance):
    from diffusers import FluxTransformer2DModel

    from deleaker.export.onnx_export import _DTYPES, TransformerStep, export_transformer

    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                                guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()
    cfg = DeLeakerConfig(start_aggregating_from=0, start_intervention_from=1, stop_aggregating_at=7,
                         stop_intervention_at=100, do_smoothing=False)
    spec = ExportSpec(height=64, width=96, min_size=32, max_size=128, max_text_tokens=7, entity_slots=2, dtype=dtype)
    ref = TransformerStep(DeLeakerFlux(copy.deepcopy(tr).to(_DTYPES[dtype]), cfg), _DTYPES[dtype], guidance)
    ex = export_transformer(tr, tmp_path / "t.onnx", spec, cfg)
    onnx.checker.check_model(str(tmp_path / "t.onnx"), full_check=True)
    assert ("guidance" in ex.inputs) == guidance
    # float32 I/O whatever the weights: the casts are inside the graph
    assert {v["dtype"] for v in ex.inputs.values()} == {"float32", "int64"}
    assert ex.outputs["noise_pred"]["dtype"] == "float32"
    assert ex.inputs["hidden_states"]["shape"] == ["batch", "image_tokens", 16]
    if dtype == "bf16":
        return  # ONNX Runtime's CPU provider has no bfloat16 MatMul: a GPU/TensorRT artifact
    x = transformer_example(tr, spec, batch=2)
    x["step"] = torch.tensor(1)
    if not guidance:
        del x["guidance"]
    with torch.no_grad():
        want, want_h = ref(**x)
    got, got_h = session(str(tmp_path / "t.onnx")).run(None, {k: v.numpy() for k, v in x.items()})
    # fp16: both sides round activations to fp16 at different points: ~1e-3 relative
    tol = ATOL if dtype == "fp32" else 5e-3
    np.testing.assert_allclose(got, want.numpy(), atol=tol * float(want.abs().max()), rtol=tol)
    np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-3 if dtype == "fp16" else 1e-6, rtol=1e-3)


def test_runtime_side_imports_nothing_heavy():
    """The artifact reader and the backend module import with torch, onnx and onnxruntime blocked."""
    code = BLOCKER.replace("'onnx', 'onnxscript', 'polygraphy'", "'onnx', 'onnxscript', 'polygraphy', 'onnxruntime'")
    r = _run(code + "import deleaker.runtime.artifact, deleaker.runtime.backends.onnxruntime_backend\n"
                    "try:\n    import onnxruntime\nexcept ImportError:\n    print('ok')\n")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
