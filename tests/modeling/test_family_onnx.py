"""One denoising step of each family's tiny transformer with DeLeaker attention, exported to ONNX
(export/family_onnx.py) and run in ONNX Runtime (CPU) against torch.

The same tolerance as FLUX.1's step parity today (tests/export/test_onnx_export.py): atol = rtol = 1e-4
on the transformer output (both sides float32; the differences are reduction orders, ~1e-6
here), 1e-6 / 1e-5 on the history. The planted entities make the op edit (the output moves by
more than 1e-3 against inactive slots, asserted), so the parity covers edited attention; every
joint attention is one DeLeakerAttention node carrying the family's layout, and the exported step
with inactive slots is the stock transformer (Qwen-Image's complex RoPE is precomputed as real
tensors for the export: that path too is checked against the stock model, within 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from test_families import BUILDERS, _call

from deleaker.export.family_onnx import FamilyStep, export_step
from deleaker.modeling.families import FAMILIES
from deleaker.runtime import op_schema

ort = pytest.importorskip("onnxruntime")
ATOL = 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "qwenimage", "flux2", "flux1"])
def test_step_in_onnx_runtime_matches_torch(name, tmp_path):
    torch.manual_seed(0)
    family = FAMILIES[name]
    transformer, inputs, I = BUILDERS[name]()
    transformer.eval()
    static = {k: inputs.pop(k) for k in list(inputs) if not torch.is_tensor(inputs[k])}  # Qwen's img_shapes
    with torch.no_grad():
        stock = transformer(**inputs, **static, return_dict=False)[0]
    step = FamilyStep(transformer, family, static)
    on = _call(family, transformer, I, planted=True)
    example = dict(entity_tokens=on.entity_tokens, history=on.history, step=on.step, grid=on.grid,
                   windows=on.windows, knobs=on.knobs, rules=on.rules, **inputs)
    path = export_step(step, example, tmp_path / f"{name}.onnx")

    model = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in model.graph.node if (n.domain, n.op_type) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)]
    assert len(nodes) == family.blocks_per_step(transformer)
    assert {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "layout"} == \
        {family.layout_code}

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for planted in (True, False):
        x = {**example, "entity_tokens": example["entity_tokens"] * float(planted)}
        got, got_h = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})
        with torch.no_grad():
            want, want_h = step(**x)
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-5)
        worst = max(worst, float(np.abs(got - want.numpy()).max()))
        if planted:
            edited, hist = want, want_h
    print(f"{name} step: ONNX Runtime vs torch {worst:.2e}, edit {(edited - want).abs().max():.2e}")
    # inactive slots: the stock transformer (for Qwen-Image through the real-valued RoPE the export takes)
    torch.testing.assert_close(want, stock, atol=1e-5, rtol=1e-5)
    assert (edited - want).abs().max() > 1e-3 and hist.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "qwenimage", "flux2"])
def test_pipeline_generates_with_the_exported_step(name, tmp_path, tmp_path_factory):
    """The family's own diffusers pipeline with DeLeaker, its transformer steps run by ONNX Runtime on
    the exported step (OnnxStepRunner), gives torch's image within atol 1e-4 (FLUX.1's end-to-end
    tolerance on latents; here on [0, 1] pixels, measured ~1e-6), every DeLeaker step in the session."""
    import copy

    from test_family_dropin import EARLY, STEPS, _pipe, _run

    from deleaker.export.family_onnx import OnnxStepRunner
    from deleaker.modeling import diffusers_integration as di

    pipe = _pipe(name, tmp_path_factory)
    request = di.DeLeaker(("cat", "cheetah"))
    example = {}

    def grab(module, args, kwargs):  # the first DeLeaker call's inputs: the export's example and static args
        call = (kwargs.get(FAMILIES[name].kwargs_name) or {}).get("deleaker")
        if call is not None and not example:
            example.update({k: v for k, v in kwargs.items() if torch.is_tensor(v)},
                           **{k: getattr(call, k).clone() for k in ("entity_tokens", "history", "step", "grid",
                                                                    "windows", "knobs", "rules")})
            example["_static"] = {k: v for k, v in kwargs.items() if k == "img_shapes"}

    stock = _run(pipe, name=name)
    di.install(pipe, config=EARLY)
    hook = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        want = _run(pipe, request, name)
    finally:
        hook.remove()
        di.remove(pipe)
    static = example.pop("_static")
    step = FamilyStep(copy.deepcopy(pipe.transformer), FAMILIES[name], static)
    path = export_step(step, example, tmp_path / "step.onnx")
    di.install(pipe, config=EARLY)
    runner = OnnxStepRunner(pipe, path)
    try:
        got = _run(pipe, request, name)
    finally:
        runner.remove()
        di.remove(pipe)
    assert runner.calls == STEPS
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # the session's steps edited, by more than the tolerance (tiny FLUX.2's edit is the smallest: ~7e-4)
    assert np.abs(got - stock).max() > 5 * ATOL
    print(f"{name}: ONNX Runtime vs torch {np.abs(got - want).max():.2e}, edit {np.abs(got - stock).max():.2e}")
