"""FLUX.1-dev widths (hidden 3072, 24 heads of 128, text dim 4096) with 2 double + 2 single blocks:
~1.03 B parameters, 3.8 GB of float32 weights, so the export must use external data; one step
in ONNX Runtime must match the PyTorch step.

Measured on the 2-core CPU machine (2026-11-27, standalone): model build 8 s, export 35 s (peak
RSS 4.3 GiB), ORT session 15 s, one step at 256x256 with 512 text tokens 10 s; process peak RSS
8.6 GiB. This test uses a 128x128 image (about 85 s in all, peak RSS 8.7 GiB).

Tolerance: float32 on both sides, 4 blocks of width 3072; summation-order differences are ~1e-6
relative per matmul and stay ~1e-5 relative at the output, so rtol 1e-3 of the output's scale
leaves a wide margin while any real mismatch (a wrong setting, a missing edit) is O(1e-1).
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.slow


def test_flux_dev_width_exports_with_external_data_and_runs(tmp_path):
    import onnx
    from diffusers import FluxTransformer2DModel

    from deleaker.export import onnx_op
    from deleaker.modeling.flux import DeLeakerFlux
    from deleaker.export.onnx_export import ExportSpec, export_transformer, transformer_example
    from deleaker.runtime.config import DeLeakerConfig

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert weight_bytes > 2 ** 31  # over protobuf's limit: external data is required

    config = DeLeakerConfig()  # flux-dev windows for 4 blocks per step: a0 12, i0 18
    spec = ExportSpec(height=128, width=128, max_text_tokens=512, entity_slots=4, deleaker=config)
    x = transformer_example(transformer, spec, batch=1)
    x["step"] = torch.tensor(4)  # tau 16..19: history running, intervention from 18
    with torch.no_grad():
        want, want_h = DeLeakerFlux(transformer)(**x)  # settings: x's windows/knobs/rules

    t0 = time.perf_counter()
    ex = export_transformer(transformer, tmp_path / "transformer.onnx", spec)
    export_s = time.perf_counter() - t0
    del transformer
    gc.collect()
    assert ex.external_data == "transformer.onnx.data"
    assert (tmp_path / ex.external_data).stat().st_size > 2 ** 31
    assert (tmp_path / "transformer.onnx").stat().st_size < 50 * 2 ** 20  # the graph only

    model = onnx.load(str(tmp_path / "transformer.onnx"), load_external_data=False)
    assert sum(onnx_op.is_op_node(n) for n in model.graph.node) == 4
    del model
    onnx.checker.check_model(str(tmp_path / "transformer.onnx"), full_check=True)

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(tmp_path / "transformer.onnx"), opts, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    got, got_h = sess.run(None, {k: v.numpy() for k, v in x.items()})
    step_s = time.perf_counter() - t0
    scale = float(want.abs().max())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-3 * scale, rtol=1e-3)
    np.testing.assert_allclose(got_h, want_h.numpy(), atol=1e-6, rtol=1e-4)
    print(f"\nFLUX.1-dev width, 2+2 blocks: export {export_s:.0f}s, one ORT step {step_s:.1f}s")
