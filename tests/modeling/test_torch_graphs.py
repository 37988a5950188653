"""The torch backend's fast paths: CUDA-graph steps and torch.compile.

On a CPU: the options are validated, CUDA graphs fall back to eager steps with one log line,
and the compiled step matches the eager one. On a GPU (marked `gpu`): replaying the captured
step equals the eager step bit for bit, with the fused op inside the graph, and one graph per
(batch, size) serves later sessions.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from deleaker.runtime.backends import load_backend  # noqa: E402
from deleaker.runtime.pipeline import GenerateRequest, Pipeline  # noqa: E402

from support.editing import editing_config  # noqa: E402

PROMPT, ENTITIES = "a cat and a cheetah in a field", ("cat", "cheetah")


def _reqs(steps=3, size=64, seeds=(0,), deleaker=(True, False)):
    # windows that open early, so DeLeaker edits within a few steps
    cfg = editing_config(num_steps=steps)
    return [GenerateRequest(prompt=PROMPT, entities=ENTITIES, seed=s, steps=steps, height=size, width=size,
                            deleaker=d, config=cfg) for s in seeds for d in deleaker]


def test_op_kernel_and_fake_agree_on_layout():
    # compiled code reads the op's output with the fake's strides: a mismatch is silent garbage
    from deleaker.modeling.torch_backend import check_op_layout

    check_op_layout("cpu")


def test_bad_options_are_one_line_errors(tiny_model_dir):
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or None"):
        load_backend("torch", str(tiny_model_dir), cuda_graphs="yes")
    with pytest.raises(ValueError, match="compile must be True or False"):
        load_backend("torch", str(tiny_model_dir), compile="max")


def test_cuda_graphs_asked_for_on_cpu_run_eagerly(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="deleaker"):
        be = load_backend("torch", str(tiny_model_dir), device="cpu", cuda_graphs=True)
    assert not be.cuda_graphs
    assert "CUDA graphs off: the device is cpu, not CUDA; the step runs eagerly" in caplog.text
    got = Pipeline(be).generate(_reqs(steps=2))
    ref = Pipeline(load_backend("torch", str(tiny_model_dir), device="cpu", cuda_graphs=False)).generate(
        _reqs(steps=2))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.latents, r.latents)
    assert not be._graphs  # nothing was captured


def test_compiled_step_matches_eager_on_cpu(tiny_model_dir):
    """torch.compile (inductor, C++ on a CPU) around the step with the reference op opaque in it."""
    compiled = load_backend("torch", str(tiny_model_dir), device="cpu", compile=True)
    eager = load_backend("torch", str(tiny_model_dir), device="cpu")
    got = Pipeline(compiled).generate(_reqs())
    ref = Pipeline(eager).generate(_reqs())
    atol = 5e-5
    for g, r in zip(got, ref):
        # float32 on both sides, reductions fused/reordered by inductor (~1e-7 relative per op, a few
        # 1e-6 after 3 steps): 5e-5 is well below DeLeaker's effect (checked below) and a misread
        # op output (~1e-1)
        np.testing.assert_allclose(g.latents, r.latents, atol=atol, rtol=0)
        np.testing.assert_allclose(g.history, r.history, atol=atol, rtol=0)
    assert np.abs(ref[0].latents - ref[1].latents).max() > 10 * atol  # DeLeaker on vs off


# ------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_graph_replay_equals_eager_bit_for_bit(tiny_h64_model_dir, fused_op):
    """The fused op inside the captured step; two sessions of one shape reuse one graph."""
    graphs = load_backend("torch", str(tiny_h64_model_dir), device="cuda", dtype="bf16", op="cuda", cuda_graphs=True)
    eager = load_backend("torch", str(tiny_h64_model_dir), device="cuda", dtype="bf16", op="cuda", cuda_graphs=False)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    pg, pe = Pipeline(graphs, max_batch=2), Pipeline(eager, max_batch=2)
    for seeds in ((0,), (1,)):  # second round: same (batch, size), a different request
        got, ref = pg.generate(_reqs(steps=4, seeds=seeds)), pe.generate(_reqs(steps=4, seeds=seeds))
        for g, r in zip(got, ref):
            np.testing.assert_array_equal(g.latents, r.latents)
            np.testing.assert_array_equal(g.history, r.history)
    assert list(graphs._graphs) == [(2, 4, 4)] and graphs._graphs[(2, 4, 4)] is not None
    # fewer steps through the same graph (its schedule holds up to 64), and a new size gets its own
    got, ref = pg.generate(_reqs(steps=2, size=96)), pe.generate(_reqs(steps=2, size=96))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g.latents, r.latents)
    assert set(graphs._graphs) == {(2, 4, 4), (2, 6, 6)}


@pytest.mark.gpu
def test_reference_op_on_cuda_runs_eagerly(tiny_h64_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="deleaker"):
        be = load_backend("torch", str(tiny_h64_model_dir), device="cuda", op="reference", cuda_graphs=True)
    assert not be.cuda_graphs and "reads the step and grid on the host" in caplog.text


@pytest.mark.gpu
def test_compiled_graph_step_matches_eager_in_bf16(tiny_h64_model_dir, fused_op):
    fast = load_backend("torch", str(tiny_h64_model_dir), device="cuda", dtype="bf16", op="cuda", compile=True)
    eager = load_backend("torch", str(tiny_h64_model_dir), device="cuda", dtype="bf16", op="cuda", cuda_graphs=False)
    assert fast.cuda_graphs  # default on CUDA with the fused op: the compiled step is captured
    got, ref = Pipeline(fast).generate(_reqs(steps=4)), Pipeline(eager).generate(_reqs(steps=4))
    for g, r in zip(got, ref):
        # bf16 activations, ~8e-3 relative per rounding, compounded over 4 steps (export/verify.py's bf16 loop bound)
        np.testing.assert_allclose(g.latents, r.latents, atol=2e-1, rtol=1e-1)
