"""One denoising step of each family's tiny transformer with DeLeaker attention, exported to ONNX
(export/family_onnx.py) and run in ONNX Runtime (CPU) against torch.

The same tolerance as FLUX.1's step parity today (tests/test_onnx_export.py): atol = rtol = 1e-4
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
    for planted in (True, False):
        x = {**example, "entity_tokens": example["entity_tokens"] * float(planted)}
        got, got_h = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})
        with torch.no_grad():
            want, want_h = step(**x)
        np.testing.assert_allclose(got, want.numpy(), atol=ATOL, rtol=ATOL)
        np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-5)
        if planted:
            edited, hist = want, want_h
    # inactive slots: the stock transformer (for Qwen-Image through the real-valued RoPE the export takes)
    torch.testing.assert_close(want, stock, atol=1e-5, rtol=1e-5)
    assert (edited - want).abs().max() > 1e-3 and hist.abs().sum() > 0
