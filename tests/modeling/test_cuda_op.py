"""Fused CUDA DeLeaker op (plugins/; the CUDA kernel of torch.ops.deleaker.attention) vs the reference.

GPU cases (`pytest -m gpu tests/modeling/test_cuda_op.py`, after building the library: plugins/README.md)
run on structured inputs (benchmarks/op_bench.make_inputs: planted entities, clear-cut masks;
some with planted leakage and text pull so rules W and TT have work). Per case and plain/edit
variant, tests/verdict.py decides: no NaN in the outputs, history equal to the float32
reference, (a) the window decision and final masks equal to the reference's exactly, (b) rule-X
cut sets within a few pairs, (c) the output error against the float32 reference within 4x the
output-rounding floor, a bound below the effect of every rule the case is counted for. Each
case's verdict line (error, bound, the rules it demonstrates and those it does not) is printed
and, with DELEAKER_VERDICT_REPORT=path, written to that file; the matrix as a whole must
demonstrate every edit rule.
The CPU tests cover the inputs, the reference counters and the error paths (the verdict
itself: tests/modeling/test_verdict.py).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from deleaker.benchmarks import op_bench as ob
from support import verdict as V
from deleaker.benchmarks.op_bench import Case


def _cuda_op():
    from deleaker.modeling import cuda_op

    return cuda_op


# ------------------------------------------------------------------------------------------
# CPU
# ------------------------------------------------------------------------------------------

def test_missing_library_message(monkeypatch):
    from deleaker.modeling import cuda_op

    monkeypatch.setattr(cuda_op, "_loaded", None)
    monkeypatch.setattr(cuda_op, "library_path", lambda: None)
    with pytest.raises(cuda_op.CudaOpUnavailable, match="cmake"):
        cuda_op.load()


def test_impl_switch_bits():
    from deleaker.modeling import cuda_op

    assert cuda_op.impl_bits(None) == -1  # library defaults (all on)
    assert cuda_op.impl_bits({}) == 0b1111
    assert cuda_op.impl_bits({"x_split": False, "fixed_gather": False}) == 0b0011
    assert cuda_op.impl_bits({n: False for n in cuda_op.IMPL_SWITCHES}) == 0
    with pytest.raises(ValueError, match="unknown switches"):
        cuda_op.impl_bits({"row_ordr": False})


SMALL = Case(H=2, D=64, T=64, h=32, w=32, E=3, spec=(((0, 0), (2, 1)),), dtype="fp32")


def test_planted_entities_give_their_regions_as_masks():
    """The inputs the GPU cases rely on: the reference's final masks are the planted regions
    (salt rows removed by the opening), and the counters reflect them."""
    q, k, v, ent, hist = ob.make_inputs(SMALL, seed=3)
    grid = (SMALL.h, SMALL.w)
    windows, knobs, rules = ob.settings_for([dict(use_history=False)])
    _, _, recs = ob.reference_run(q, k, v, ent, hist, 5, grid, windows, knobs, rules, ob.attrs_for(3))
    counters = ob.reference_counters(ent, recs)[0]
    assert counters["edited"]
    for slot, kind in SMALL.spec[0]:
        planted = ob.region(SMALL.h, SMALL.w, kind).flatten()
        mask = recs[0]["masks"][[0, 2].index(slot)]
        iou = float((mask & planted).sum() / (mask | planted).sum())
        assert iou >= 0.8, f"slot {slot}: mask IoU with the planted region {iou:.2f}"
        assert counters["mask_rows"][slot] == int(mask.sum())
    assert set(counters["mask_rows"]) == {0, 2}  # slot 1 is empty: no mask
    union = recs[0]["masks"].any(0)
    assert counters["masked_rows"] == int(union.sum())
    assert counters["cut_pairs"] == int(recs[0]["cut"].sum()) > 0  # rule X cut something among the masked rows
    assert not (recs[0]["cut"] & ~(union[:, None] & union[None, :])).any()


def test_counters_are_zero_outside_the_window():
    q, k, v, ent, hist = ob.make_inputs(SMALL, seed=3)
    windows, knobs, rules = ob.settings_for([{}])
    _, _, recs = ob.reference_run(q, k, v, ent, hist, 0, (SMALL.h, SMALL.w), windows, knobs, rules,
                                  ob.attrs_for(15))  # tau 15: history only (a0 12 <= tau < i0 18)
    assert ob.reference_counters(ent, recs) == [dict(edited=False, mask_rows={}, masked_rows=0, cut_pairs=0)]


def test_op_bench_cli_says_why_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the message is for machines without one")
    r = subprocess.run([sys.executable, "-m", "deleaker.benchmarks.op_bench"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "op_bench: needs a CUDA GPU (torch sees none)"


# ------------------------------------------------------------------------------------------
# GPU: the correctness matrix
# ------------------------------------------------------------------------------------------

TWO = (((0, 0), (1, 1)),)
THREE = (((0, 0), (1, 1), (2, 2)),)
A1536 = dict(T=512, h=32, w=32)
A4608 = dict(T=512, h=64, w=64)
INSIDE = dict(step=5, block_offset=3)  # tau 288: history updating, intervening (masks from the history)

# name -> (case, settings overrides, step, block_offset)
CASES = {
    "1536 E2 hist-off inside": (Case(**A1536, spec=TWO), dict(use_history=False), *INSIDE.values()),
    "1536 E2 hist-on inside": (Case(**A1536, spec=TWO), {}, *INSIDE.values()),
    "1536 E2 tau==a0==i0 (masks from p)": (Case(**A1536, spec=TWO), dict(start_intervention_from=12), 0, 12),
    "1536 E1 inside (plain + history)": (Case(**A1536, E=1, spec=(((0, 0),),)), {}, *INSIDE.values()),
    "1536 E3 hist-off inside": (Case(**A1536, E=3, spec=THREE), dict(use_history=False), *INSIDE.values()),
    "1536 E2 before (tau<a0)": (Case(**A1536, spec=TWO), {}, 0, 5),
    "1536 E2 history only (a0<=tau<i0)": (Case(**A1536, spec=TWO), {}, 0, 15),
    "1536 E2 after (tau>i1, frozen)": (Case(**A1536, spec=TWO), {}, 20, 10),
    "1536 E2 TT on, no smoothing": (Case(**A1536, spec=TWO), dict(do_text_text_weakening=True, do_smoothing=False),
                                    *INSIDE.values()),
    "1536 E2 leak (W has work)": (Case(**A1536, spec=TWO, leak=0.5), dict(use_history=False), *INSIDE.values()),
    "1536 E3 TT large (leak + text pull)": (Case(**A1536, E=3, spec=THREE, leak=0.5, text_pull=1.0),
                                            dict(use_history=False, do_text_text_weakening=True), *INSIDE.values()),
    "1536 E4 all rules, hist-on": (Case(**A1536, E=4, spec=(((0, 0), (1, 1), (2, 2), (3, 3)),), leak=0.5,
                                        text_pull=1.0), dict(do_text_text_weakening=True), *INSIDE.values()),
    "1536 E2 fp16": (Case(**A1536, spec=TWO, dtype="fp16"), dict(use_history=False), *INSIDE.values()),
    "1536 E2 FLUX layout [B,N,H,D]": (Case(**A1536, spec=TWO, layout="bnhd"), {}, *INSIDE.values()),
    "1536 E2 D=64 H=8": (Case(**A1536, H=8, D=64, spec=TWO), dict(use_history=False), *INSIDE.values()),
    "4608 E2 hist-on inside": (Case(**A4608, spec=TWO), {}, *INSIDE.values()),
    "4608 E3 hist-off inside (overlapping masks)": (Case(**A4608, E=3, spec=THREE), dict(use_history=False),
                                                    *INSIDE.values()),
    "4608 E3 TT large (leak + text pull)": (Case(**A4608, E=3, spec=THREE, leak=0.5, text_pull=1.0),
                                            dict(use_history=False, do_text_text_weakening=True), *INSIDE.values()),
    "3584 non-square 48x64 E2 hist-on": (Case(T=512, h=48, w=64, spec=TWO), {}, *INSIDE.values()),
    "B=2 E4 slots (one empty) mixed": (Case(**A1536, B=2, E=4, spec=(((0, 0), (2, 1), (3, 3)), ((1, 1), (3, 0)))),
                                       dict(use_history=False), *INSIDE.values()),
}
VARIANTS = [("cudnn", "delta"), ("own", "delta"), ("own", "full")]
REPORT: list[str] = []  # verdict lines of this run


@pytest.fixture(scope="module", autouse=True)
def _verdict_report():
    yield
    if REPORT:
        text = "\n".join(REPORT) + "\n"
        print("\nverdicts:\n" + text)
        path = os.environ.get("DELEAKER_VERDICT_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(text)


def _case_inputs(case, overrides_per_sample, step, block_offset, seed):
    q, k, v, ent, hist = ob.make_inputs(case, seed=seed, device="cuda")
    windows, knobs, rules = ob.settings_for(overrides_per_sample, device="cuda")
    return (q, k, v, ent, hist, step, (case.h, case.w), windows, knobs, rules, ob.attrs_for(block_offset))


def _seed(name):
    return sum(map(ord, name)) % 10000


@functools.lru_cache(maxsize=None)
def _expected_case(name):
    """The reference side of a CASES entry (inputs and verdict.Expected), computed once."""
    case, overrides, step, block_offset = CASES[name]
    args = _case_inputs(case, [overrides] * case.B, step, block_offset, _seed(name))
    return args, V.expected(*args)


def _check_against_reference(cuda_op, name, args, exp, variants=VARIANTS):
    q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs = args
    for plain, edit in variants:
        d = cuda_op.debug_run(q, k, v, ent, hist, torch.tensor(step, device="cuda"), torch.tensor(grid, device="cuda"),
                              windows, knobs, rules, plain=plain, edit=edit, **attrs)
        tag = f"{name} [{plain}/{edit}]"
        assert not torch.isnan(d["out"]).any() and not torch.isnan(d["history_out"]).any(), f"{tag}: NaN in outputs"
        verdict = V.judge(tag, exp, V.observed_from_debug(d))
        print(verdict.line())
        REPORT.append(verdict.line())
        assert verdict.passed, verdict.line()
    return ob.reference_counters(ent, exp.records)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CASES))
def test_fused_matches_reference(name, fused_op):
    cuda_op = _cuda_op()  # loaded by the fused_op fixture
    args, exp = _expected_case(name)
    _check_against_reference(cuda_op, name, args, exp)


@pytest.mark.gpu
def test_matrix_demonstrates_every_rule():
    """Over the case matrix each edit rule (and rule X's G after earlier pairs) has an effect
    above margin x bound somewhere: the verdicts are evidence for all of them."""
    shown = {}
    for name in CASES:
        for r in _expected_case(name)[1].demonstrated:
            shown.setdefault(r, []).append(name)
    REPORT.append("rules demonstrated by the matrix: " + "; ".join(f"{r}: {len(n)} cases" for r, n in shown.items()))
    assert set(shown) == set(V.ALL_RULES), f"not demonstrated by any case: {set(V.ALL_RULES) - set(shown)}"
    assert "TT" in _expected_case("1536 E3 TT large (leak + text pull)")[1].demonstrated


@pytest.mark.gpu
def test_mixed_settings_batch_matches_each_sample_alone(fused_op):
    """One batch whose samples differ in windows, alpha, thresholds and rules, one with no entity:
    each sample's output, history and masks as the reference gives for that sample alone."""
    cuda_op = _cuda_op()  # loaded by the fused_op fixture
    case = Case(B=4, H=8, T=512, h=24, w=32, E=3,
                spec=(((0, 0), (1, 1), (2, 2)), ((0, 1), (1, 3)), ((0, 3), (2, 0)), ()))
    overrides = [
        {},  # defaults: history on, W S X
        dict(start_intervention_from=300, k_strength=1.5),  # tau 288: history only
        dict(use_history=False, do_image_image=False, do_text_text_weakening=True, do_smoothing=False,
             k_strength=2.0, std_mul_text=0.8),
        dict(start_aggregating_from=400, start_intervention_from=400),  # no entity, window not reached
    ]
    args = _case_inputs(case, overrides, 5, 3, seed=11)
    want = _check_against_reference(cuda_op, "mixed settings B=4", args, V.expected(*args))
    assert [w["edited"] for w in want] == [True, False, True, False]  # the batch really mixes
    got = ob.op_counters(*ob.make_inputs(case, seed=11, device="cuda"), torch.tensor(5), torch.tensor([case.h, case.w]),
                         *ob.settings_for(overrides, device="cuda"), ob.attrs_for(3))
    for b in range(case.B):
        assert got[b]["edited"] == want[b]["edited"] and got[b]["mask_rows"] == want[b]["mask_rows"]
    assert got[2]["cut_pairs"] == 0  # rule X off for that sample only
    assert got[0]["cut_pairs"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("E", [2, 3])
def test_impl_switches_same_result(E, fused_op):
    """Every implementation switch off (the v4 paths) and on give the same masks and history and
    outputs equal to rounding (only summation orders differ)."""
    cuda_op = _cuda_op()  # loaded by the fused_op fixture
    case = Case(T=128, H=4, h=16, w=24, E=E, spec=(tuple((s, s) for s in range(E)),))
    q, k, v, ent, hist = ob.make_inputs(case, seed=40 + E, device="cuda")
    settings = ob.settings_for([{}], device="cuda")
    step, grid = torch.tensor(5, device="cuda"), torch.tensor([16, 24], device="cuda")
    on = cuda_op.debug_run(q, k, v, ent, hist, step, grid, *settings, **ob.attrs_for(3))
    for off in ({"x_split": False, "fixed_gather": False}, {n: False for n in cuda_op.IMPL_SWITCHES}):
        d = cuda_op.debug_run(q, k, v, ent, hist, step, grid, *settings, impl=off, **ob.attrs_for(3))
        assert torch.equal(d["masks"], on["masks"]) and torch.equal(d["history_out"], on["history_out"])
        torch.testing.assert_close(d["out"].float(), on["out"].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_cuda_graph_reads_settings_on_the_device(fused_op):
    """The op captured once in a CUDA graph follows settings changed in place on the device."""
    case = Case(**A1536, spec=TWO)
    q, k, v, ent, hist = ob.make_inputs(case, seed=5, device="cuda")
    windows, knobs, rules = ob.settings_for([{}], device="cuda")
    step, grid = torch.tensor(5, device="cuda"), torch.tensor([case.h, case.w], device="cuda")

    def op():
        return torch.ops.deleaker.attention(q, k, v, ent, hist, step, grid, windows, knobs, rules, 3, 57)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            eager = op()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = op()
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(gout[0].float(), eager[0].float(), rtol=2e-2, atol=2e-2)
    edited = gout[0].clone()
    windows[0, 2] = 10_000  # i0 past tau: plain attention, history still updated
    windows[0, 3] = 20_000
    g.replay()
    torch.cuda.synchronize()
    plain = op()
    assert torch.equal(gout[0], plain[0]) and torch.equal(gout[1], plain[1])
    assert not torch.equal(gout[0], edited)


@pytest.mark.gpu
def test_cpu_calls_still_run_the_reference(fused_op):
    """With the fused library loaded, the op's CPU kernel is still the reference."""
    from deleaker.modeling.reference_op import deleaker_attention_ref

    q, k, v, ent, hist = ob.make_inputs(SMALL, seed=2)
    settings = ob.settings_for([{}])
    grid = torch.tensor([SMALL.h, SMALL.w])
    out, h = torch.ops.deleaker.attention(q, k, v, ent, hist, torch.tensor(5), grid, *settings, 3, 57)
    ref, rh = deleaker_attention_ref(q, k, v, ent, hist, torch.tensor(5), grid, *settings, block_offset=3,
                                     blocks_per_step=57)
    assert torch.equal(out, ref) and torch.equal(h, rh)
