"""`deleaker-export onnx --portable`: transformer.onnx in standard ops only, run by OpenVINO.

OpenVINO is an ONNX consumer independent of ONNX Runtime (its own importer and CPU kernels) that
does not expand model-local functions, so it is the test of "any ONNX runtime". Tolerance: both
runtimes compute the same float32 graph in different orders; on the tiny model a whole 8-step
generation differs by ~5e-7, and 1e-5 is far below what DeLeaker changes (> 1e-3, asserted).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")
ov = pytest.importorskip("openvino")

from deleaker.benchmarks.portable_check import openvino_pipeline  # noqa: E402
from deleaker.export import onnx_op, onnx_portable  # noqa: E402
from deleaker.export.cli import main as export_main  # noqa: E402
from deleaker.runtime import op_schema  # noqa: E402
from deleaker.runtime.artifact import ArtifactError, load_artifact  # noqa: E402
from deleaker.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from deleaker.runtime.config import DeLeakerConfig  # noqa: E402
from deleaker.runtime.pipeline import GenerateRequest, Pipeline  # noqa: E402

BPS = 4  # the tiny model: 2 double + 2 single blocks
# windows open early and no smoothing: on the tiny model the masks fire (DeLeaker changes the image)
FIRING = DeLeakerConfig(num_steps=8, start_aggregating_from=2, start_intervention_from=3, do_smoothing=False)


def _ov_compile(path):
    core = ov.Core()
    # f32 throughout: some CPUs would otherwise run bf16
    return core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


@pytest.fixture(scope="module")
def portable_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("portable") / "artifact"
    rc = export_main(["onnx", "--model", str(tiny_model_dir), "--out", str(out), "--height", "64", "--width", "64",
                      "--min-size", "32", "--max-size", "128", "--entity-slots", "3", "--portable", "--quiet"])
    assert rc == 0
    return out


def test_single_node_needs_inlining_for_openvino(tmp_path):
    """OpenVINO rejects the function form; the inlined node runs and matches ONNX Runtime."""
    from deleaker.export.verify import structured_op_inputs

    attrs = op_schema.node_attributes(1, BPS)
    model = onnx_op.make_single_op_model(3, attrs)
    onnx.save(model, tmp_path / "function.onnx")
    with pytest.raises(Exception, match=op_schema.OP_NAME):
        _ov_compile(str(tmp_path / "function.onnx"))
    inlined = onnx_portable.inline_op(model)
    onnx.save(inlined, tmp_path / "portable.onnx")
    onnx.checker.check_model(inlined, full_check=True)
    assert onnx_portable.graph_form(model) == onnx_portable.FUNCTION
    assert onnx_portable.graph_form(inlined) == onnx_portable.PORTABLE
    assert {n.domain for n in inlined.graph.node} <= {""} and not inlined.functions
    x = structured_op_inputs(2, 2, 16, 8, 6, 8, 3, active=2)
    feed = {k: v.numpy() for k, v in x.items()}
    feed.update(step=np.array(1, np.int64), grid=np.array([6, 8], np.int64))
    feed.update(op_schema.pack_settings([FIRING.resolved(BPS), FIRING.replace(k_strength=2.0).resolved(BPS)]))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = dict(zip(["out", "history_out"], sess.run(None, feed)))
    got = _ov_compile(str(tmp_path / "portable.onnx"))(feed)
    for i, name in enumerate(want):
        np.testing.assert_allclose(got[i], want[name], rtol=0, atol=1e-5)
    assert np.abs(want["history_out"]).max() > 1e-3  # the history is really written


def test_manifest_records_the_portable_form(portable_dir):
    art = load_artifact(portable_dir)
    t = art.tensors("transformer")
    assert t["form"] == onnx_portable.PORTABLE and t["runs_on"] == "any ONNX runtime"
    assert t["op_nodes"] == 0 and t["blocks_per_step"] == BPS
    model = onnx.load(str(art.path("onnxruntime", "transformer")), load_external_data=False)
    assert t["nodes"] == len(model.graph.node) > BPS
    assert not model.functions and not any(n.domain for n in model.graph.node)
    # FLUX.1's text_image is the op's canonical order: the export inlines a body with no reorder
    assert not any(o.startswith(("dl_to_canonical", "dl_to_model_order", "dl_layouts"))
                   for n in model.graph.node for o in n.output)
    assert op_schema.ONNX_DOMAIN not in {o.domain for o in model.opset_import}
    onnx.checker.check_model(str(art.path("onnxruntime", "transformer")))


def test_openvino_matches_onnxruntime_on_a_whole_generation(portable_dir):
    """Every step, history included: the OpenVINO-compiled transformer in the same loop."""
    ort_pipe = Pipeline(OnnxRuntimeBackend.load(str(portable_dir), threads=1))
    ov_pipe = openvino_pipeline(str(portable_dir), threads=1)
    reqs = [GenerateRequest("a cat and a cheetah in a field", entities=("cat", "cheetah"), steps=8, height=64,
                            width=64, config=FIRING),
            GenerateRequest("a dog and a bird", entities=("dog", "bird"), seed=3, steps=8, height=64, width=64,
                            config=FIRING, deleaker=False)]
    want, got = ort_pipe.generate(reqs), ov_pipe.generate(reqs)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g.latents, w.latents, rtol=0, atol=1e-5)
        np.testing.assert_allclose(g.history, w.history, rtol=0, atol=1e-5)
    assert np.abs(want[0].history).max() > 1e-3
    off = ort_pipe.generate(dataclasses.replace(reqs[0], deleaker=False))
    assert np.abs(off.latents - want[0].latents).max() > 1e-3  # DeLeaker fired in the compared run


def test_verify_checks_the_portable_artifact(portable_dir, tiny_model_dir, capsys):
    assert export_main(["verify", str(portable_dir), "--model", str(tiny_model_dir), "--checks", "op,step",
                        "--steps", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "form  portable:" in out and "any ONNX runtime" in out
    lines = out.splitlines()
    assert {line.split()[0] for line in lines[1:-1]} == {"op", "step"}
    assert all(line.endswith("PASS") for line in lines[1:-1]) and "FAIL" not in lines[-1]


def test_verify_rejects_a_form_the_graph_does_not_have(portable_dir, tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "artifact"
    shutil.copytree(portable_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["models"]["transformer"]["form"] = onnx_portable.FUNCTION
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert export_main(["verify", str(bad), "--model", str(tiny_model_dir), "--checks", "op"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "function form but the graph is portable" in err[0]
    with pytest.raises(ArtifactError, match="portable"):
        from deleaker.export.verify import transformer_form

        transformer_form(load_artifact(bad), BPS)
