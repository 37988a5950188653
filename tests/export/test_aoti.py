"""AOTInductor: `deleaker-export aoti` on the tiny model, the `aoti` backend, `deleaker-export verify --backend aoti`.

One artifact is compiled per module (64..128 px, dynamic batch and image tokens): AOTInductor's
C++ compilation is the slow part (minutes on two cores), so every test shares it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deleaker.export import aoti  # noqa: E402
from deleaker.runtime.artifact import ArtifactError, load_artifact  # noqa: E402
from support.editing import editing_settings  # noqa: E402

PROMPT, ENTITIES = "a cat and a cheetah in a field", ("cat", "cheetah")
# (height, width, deleaker): two sizes through one package (dynamic image tokens), DeLeaker on and off
CASES = ((64, 64, True), (64, 64, False), (96, 64, True))
STEPS = 4
# windows that open early, so DeLeaker edits within 4 steps (the tiny model has random weights)
EARLY = editing_settings(num_steps=STEPS)
# Both sides compute in float32; AOTInductor fuses and reorders reductions (norms, matmuls,
# softmax), ~1e-7 relative per op. Over 4 steps of 4 blocks that measured 3e-6 on latents of
# magnitude ~4. DeLeaker on vs off moves the latents by ~1e-3 on this model, and a misread op
# output by ~1e-1: 5e-5 separates them.
ATOL = 5e-5
# the artifact's sizes (tests/support/golden.py compiles the same one to record the golden images)
AOTI_ARGS = ("--height", "64", "--width", "64", "--min-size", "64", "--max-size", "128")


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    """The tiny model compiled through the command-line entry (`deleaker-export aoti`)."""
    from deleaker.export import cli as export_cli

    out = tmp_path_factory.mktemp("aoti") / "artifact"
    t0 = time.perf_counter()
    assert export_cli.main(["aoti", "--model", str(tiny_model_dir), "--out", str(out), *AOTI_ARGS]) == 0
    print(f"\naoti export of the tiny model: {time.perf_counter() - t0:.1f}s")
    return out


def test_manifest_lists_the_packages(artifact):
    art = load_artifact(artifact)
    assert art.backend_files("aoti") == aoti.FILES
    for name in aoti.MODELS:
        assert art.path("aoti", name).stat().st_size > 0
        assert art.manifest["models"][name]["device"] == "cpu"
    step = art.manifest["models"]["transformer"]
    assert step["dynamic"] == ["batch", "image_tokens"]
    assert set(step["inputs"]) >= {"hidden_states", "history", "step", "windows", "knobs", "rules"}
    assert step["inputs"]["hidden_states"]["shape"][-1] == art.model["in_channels"]
    assert art.size_range == (64, 128)
    assert art.manifest["models"]["vae_decoder"]["max_batch"] == aoti.VAE_MAX_BATCH
    for name in ("tokenizer", "tokenizer_2"):
        assert (artifact / name / "tokenizer.json").is_file()


BLOCKER = """
import importlib.abc, importlib.machinery, sys
BLOCKED = {'diffusers', 'transformers', 'onnx', 'onnxscript', 'onnxruntime', 'polygraphy'}
class Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError('blocked in this test: ' + spec.name)
    def exec_module(self, module):
        pass
class Block(importlib.abc.MetaPathFinder):
    # a spec with no origin: torch's find_spec probes (dynamo's skip list) see no files, an import fails
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, Block())
for mod in ('diffusers', 'transformers', 'onnx'):
    try:  # the blocker must work, or the test proves nothing
        __import__(mod)
        raise SystemExit('blocker failed for ' + mod)
    except ImportError:
        pass
"""


def _requests(cases):
    from deleaker.runtime.config import DeLeakerConfig
    from deleaker.runtime.pipeline import GenerateRequest

    return [GenerateRequest(prompt=PROMPT, entities=ENTITIES, seed=7, steps=STEPS, height=h, width=w, deleaker=d,
                            config=DeLeakerConfig(**EARLY)) for h, w, d in cases]


def test_generate_without_diffusers_matches_torch_backend(artifact, tiny_model_dir, tmp_path):
    """Pipeline on the aoti backend in a process where diffusers/transformers/onnx cannot be
    imported, against the torch backend on the checkpoint: same latents and history."""
    out = tmp_path / "aoti.npz"
    code = BLOCKER + f"""
import numpy as np
from deleaker.modeling.aoti_backend import AotiBackend
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.pipeline import GenerateRequest, Pipeline
pipe = Pipeline(AotiBackend.load({str(artifact)!r}, device='cpu'), max_batch=2)
reqs = [GenerateRequest(prompt={PROMPT!r}, entities={ENTITIES!r}, seed=7, steps={STEPS}, height=h, width=w,
                        deleaker=d, config=DeLeakerConfig(**{EARLY!r})) for h, w, d in {CASES!r}]
res = pipe.generate(reqs)
arrays = {{}}
for i, r in enumerate(res):
    arrays.update({{f'latents{{i}}': r.latents, f'history{{i}}': r.history, f'image{{i}}': r.image}})
np.savez({str(out)!r}, **arrays)
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & {{'diffusers', 'transformers', 'onnx', 'onnxruntime'}})
assert not heavy, heavy
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)

    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import Pipeline

    m = load_artifact(artifact).model
    ref = Pipeline(load_backend("torch", str(tiny_model_dir), device="cpu", entity_slots=int(m["entity_slots"]),
                                max_text_tokens=int(m["max_text_tokens"])), max_batch=2).generate(_requests(CASES))
    for i, (h, w, d) in enumerate(CASES):
        assert got[f"latents{i}"].shape == ref[i].latents.shape == ((h // 16) * (w // 16), m["in_channels"])
        np.testing.assert_allclose(got[f"latents{i}"], ref[i].latents, atol=ATOL, rtol=0, err_msg=f"case {i}")
        np.testing.assert_allclose(got[f"history{i}"], ref[i].history, atol=ATOL, rtol=0, err_msg=f"case {i}")
        assert np.abs(got[f"image{i}"].astype(int) - ref[i].image.astype(int)).max() <= 1  # uint8 rounding
    # the tolerance is far tighter than what DeLeaker changes, and DeLeaker did act
    assert np.abs(got["latents0"] - got["latents1"]).max() > 10 * ATOL
    assert np.abs(got["history0"]).max() > 0 and np.abs(got["history1"]).max() == 0


def test_verify_aoti_passes(artifact, tiny_model_dir):
    lines = []
    from deleaker.export.verify import verify

    rows = verify(artifact, tiny_model_dir, backend="aoti", steps=STEPS, report=lines.append)
    assert {r.check for r in rows} == {"step", "loop"}
    assert all(r.passed for r in rows), "\n".join(lines)
    assert len(lines) == len(rows)


@pytest.fixture(scope="module")
def golden_run(artifact):
    from support import golden

    from deleaker.modeling.aoti_backend import AotiBackend
    from deleaker.runtime.pipeline import Pipeline

    return golden.generate(Pipeline(AotiBackend.load(str(artifact), device="cpu"), max_batch=2))


def test_golden_within_bound(golden_run):
    """The aoti backend's output on the golden requests (tests/support/golden.py) within the bound of the recorded one."""
    from support import golden

    golden.check_bound("aoti", golden_run)


def test_golden_digest(golden_run):
    """... and bit for bit, where the environment is the recorded one."""
    from support import golden

    golden.check_digest("aoti", golden_run)


def test_decoder_serves_more_images_than_one_package_call(artifact, tiny_model_dir):
    from deleaker.runtime.backends import load_backend
    from deleaker.modeling.aoti_backend import AotiBackend

    z = np.random.default_rng(0).standard_normal((aoti.VAE_MAX_BATCH + 1, 16, 8, 12)).astype(np.float32)
    got = AotiBackend.load(str(artifact)).decode(z)
    ref = load_backend("torch", str(tiny_model_dir)).decode(z)
    assert got.shape == ref.shape == (aoti.VAE_MAX_BATCH + 1, 3, 64, 96)
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_backend_is_registered():
    from deleaker.runtime.backends import available_backends, backend_class
    from deleaker.modeling.aoti_backend import AotiBackend

    assert "aoti" in available_backends() and backend_class("aoti") is AotiBackend


def test_device_the_artifact_was_not_compiled_for_is_a_clear_error(artifact):
    from deleaker.modeling.aoti_backend import AotiBackend, AotiError

    with pytest.raises(AotiError, match="compiled for cpu, not cuda.*--device cpu"):
        AotiBackend.load(str(artifact), device="cuda")
    with pytest.raises(AotiError, match="pass --artifact DIR"):
        AotiBackend.load(None)


def test_artifact_without_packages_is_a_clear_error(artifact, tmp_path):
    from deleaker.modeling.aoti_backend import AotiBackend

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    p = copy / "manifest.json"
    m = json.loads(p.read_text())
    m["backends"] = {"onnxruntime": {"transformer": "transformer.onnx"}}
    p.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="no files for backend 'aoti'.*onnxruntime"):
        AotiBackend.load(str(copy))


def test_export_rejects_an_unknown_device(tiny_model_dir, tmp_path):
    from deleaker.export.onnx_export import ExportError

    with pytest.raises(ExportError, match="--device must be cpu or cuda"):
        aoti.export_aoti(tiny_model_dir, tmp_path / "x", device="tpu")


@pytest.mark.gpu
def test_cuda_package_with_the_fused_op_matches_torch(tmp_path_factory, tiny_h64_model_dir, fused_op):
    """bf16 transformer compiled for CUDA, the fused op one opaque call in it, vs the torch backend."""
    from deleaker.export.onnx_export import ExportSpec
    from deleaker.runtime.backends import load_backend
    from deleaker.modeling.aoti_backend import AotiBackend
    from deleaker.runtime.pipeline import Pipeline

    model = tiny_h64_model_dir
    out = tmp_path_factory.mktemp("aoti-cuda") / "artifact"
    aoti.export_aoti(model, out, ExportSpec(height=64, width=64, min_size=64, max_size=128, max_text_tokens=512,
                                            dtype="bf16"), device="cuda")
    be = AotiBackend.load(str(out), device="cuda", op="cuda")
    assert be.op == "cuda"
    got = Pipeline(be).generate(_requests(CASES[:2]))
    ref = Pipeline(load_backend("torch", str(model), device="cuda", dtype="bf16", op="cuda")).generate(
        _requests(CASES[:2]))
    for g, r in zip(got, ref):
        # bf16 activations: one rounding is ~8e-3 relative, compounded over 4 steps (export/verify.py's bf16 loop bound)
        np.testing.assert_allclose(g.latents, r.latents, atol=2e-1, rtol=1e-1)
