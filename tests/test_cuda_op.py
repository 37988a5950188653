"""Fused CUDA DeLeaker op (plugins/, via export/cuda_op.py) vs the reference op, on a GPU.

Inputs are structured (entities planted by adding a direction to q of some image rows and to k
of the entity's tokens) so the masks are clear-cut and rounding cannot flip them; the masks and
the history are compared first (exactly / at float32 tolerance), then the output, whose error
against the float32 reference must stay within 2x of the error of the same reference code run
in the inputs' precision (a materialised bf16/fp16 implementation). The full matrix of sizes,
windows and timings is scripts/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch

def _require_op():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torch sees none)")
    from deleaker.export import cuda_op

    try:
        cuda_op.load()
    except cuda_op.CudaOpUnavailable as e:
        pytest.skip(str(e))
    return cuda_op


def _attrs(**over):
    from deleaker.runtime.config import DeLeakerConfig

    a = DeLeakerConfig().resolved(57).op_attributes(3)
    a.update(over)
    return a


def _inputs(T=128, h=16, w=24, H=4, D=128, E=2, seed=0, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    I, N = h * w, T + h * w
    q, k, v = (torch.randn(1, H, N, D, generator=g, device="cuda") for _ in range(3))
    dirs = torch.linalg.qr(torch.randn(D, 4, generator=g, device="cuda"))[0].T
    ent = torch.zeros(1, E, T, device="cuda")
    hist = 0.001 * torch.rand(1, E, I, generator=g, device="cuda")
    yy, xx = torch.meshgrid(torch.arange(h, device="cuda"), torch.arange(w, device="cuda"), indexing="ij")
    boxes = [(1, 8, 1, 10), (7, 15, 12, 23), (0, 6, 14, 22)]
    for e in range(E):
        toks = [3 + 7 * e, 4 + 7 * e]
        ent[0, e, toks] = 1
        k[0, :, toks] += 8.0 * dirs[e]
        y0, y1, x0, x1 = boxes[e]
        reg = ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).flatten()
        q[0, :, T + reg.nonzero().flatten()] += 8.0 * dirs[e]
        hist[0, e] += 0.05 * reg.float()
    return q.to(dtype), k.to(dtype), v.to(dtype), ent, hist


@pytest.mark.gpu
@pytest.mark.parametrize("E", [1, 2, 3])
@pytest.mark.parametrize("use_history", [0, 1])
@pytest.mark.parametrize("step", [0, 5, 20])  # before, inside, after the windows (block offset 3)
def test_fused_matches_reference(E, use_history, step):
    cuda_op = _require_op()
    from deleaker.export.reference_op import deleaker_attention_ref

    q, k, v, ent, hist = _inputs(E=E, seed=E * 10 + step)
    attrs = _attrs(use_history=use_history)
    grid = torch.tensor([16, 24])  # non-square
    ref, ref_hist = deleaker_attention_ref(q.float(), k.float(), v.float(), ent, hist, step, grid, **attrs)
    naive_err = None
    for plain, edit in [("auto", "delta"), ("own", "delta"), ("own", "full")]:
        d = cuda_op.debug_run(q, k, v, ent, hist, torch.tensor(step, device="cuda"), grid.cuda(), plain=plain,
                              edit=edit, **attrs)
        out, hout = d["out"], d["history_out"]
        assert not torch.isnan(out).any() and not torch.isnan(hout).any(), "unwritten (NaN-poisoned) outputs"
        torch.testing.assert_close(hout, ref_hist, rtol=1e-4, atol=1e-7)
        if naive_err is None:
            from deleaker.export import reference_op as R

            naive = R._one_sample(q[0], k[0], v[0], ent[0], hist[0], step, 16, 24, attrs)[0]
            naive_err = (naive.float() - ref[0]).norm() / ref[0].norm()
        fused_err = (out[0].float() - ref[0]).norm() / ref[0].norm()
        assert fused_err <= 2 * naive_err, f"{plain}/{edit}: fused error {fused_err:.2e} > 2x naive {naive_err:.2e}"


def test_missing_library_message(monkeypatch, tmp_path):
    from deleaker.export import cuda_op

    monkeypatch.setattr(cuda_op, "_loaded", None)
    monkeypatch.setattr(cuda_op, "library_path", lambda: None)
    with pytest.raises(cuda_op.CudaOpUnavailable, match="cmake"):
        cuda_op.load()


def test_impl_switch_bits():
    from deleaker.export import cuda_op

    assert cuda_op.impl_bits(None) == -1  # library defaults (all on)
    assert cuda_op.impl_bits({}) == 0b1111
    assert cuda_op.impl_bits({"x_split": False, "fixed_gather": False}) == 0b0011
    assert cuda_op.impl_bits({n: False for n in cuda_op.IMPL_SWITCHES}) == 0
    with pytest.raises(ValueError, match="unknown switches"):
        cuda_op.impl_bits({"row_ordr": False})


@pytest.mark.gpu
@pytest.mark.parametrize("E", [2, 3])
def test_impl_switches_same_result(E):
    """Every implementation switch off (the v4 paths) and on give the same masks and history and
    outputs equal to rounding (only summation orders differ)."""
    cuda_op = _require_op()
    q, k, v, ent, hist = _inputs(E=E, seed=40 + E)
    attrs = _attrs()
    step, grid = torch.tensor(5, device="cuda"), torch.tensor([16, 24], device="cuda")
    on = cuda_op.debug_run(q, k, v, ent, hist, step, grid, **attrs)
    for off in ({"x_split": False, "fixed_gather": False}, {n: False for n in cuda_op.IMPL_SWITCHES}):
        d = cuda_op.debug_run(q, k, v, ent, hist, step, grid, impl=off, **attrs)
        assert torch.equal(d["masks"], on["masks"]) and torch.equal(d["history_out"], on["history_out"])
        torch.testing.assert_close(d["out"].float(), on["out"].float(), rtol=2e-2, atol=2e-2)
