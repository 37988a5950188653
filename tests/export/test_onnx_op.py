"""The DeLeakerAttention ONNX function body vs the PyTorch reference op, in ONNX Runtime (CPU).

One-node models (make_single_op_model) on small random inputs with *structured* entity
attention: each entity slot owns a rectangle of image rows, and a direction added to q on those
rows and to k on the entity's tokens makes those rows attend strongly to the entity. The masks
then come out as those rectangles with wide margins, so a threshold comparison flipping between
the two implementations (both float32, different reduction orders, differences ~1e-7 relative)
is very unlikely, and the tests assert the intervention actually changes the output.

Op contract v2: the DeLeaker settings are per-sample inputs (windows, knobs, rules), so one
session per node serves every setting, and a batch may mix settings.

Tolerance: both sides compute in float32 from the same float32 inputs; the only differences are
summation orders in matmuls/softmax/means (~1e-7 relative per value, a few ulps after
softmax and P@V). Outputs are O(1), so atol 2e-5 is ~100x that noise and far below any rule's
effect (which the tests check is > 1e-2). fp16 inputs: both sides round the same float32 result
to fp16 once, so they differ by at most one fp16 ulp (~1e-3 at |x| ~ 1).
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from deleaker.export import onnx_op  # noqa: E402
from deleaker.modeling.reference_op import deleaker_attention_ref, settings_tensors  # noqa: E402
from deleaker.runtime import op_schema  # noqa: E402
from deleaker.runtime.config import DeLeakerConfig  # noqa: E402

ATOL = 2e-5
RTOL = 1e-5

# Small windows so every regime is reachable in a few steps: blocks_per_step 3,
# history a0=2 .. a1=7 (frozen from 7), intervention i0=4 .. i1=10 (inclusive).
BPS = 3
WINDOWS = dict(start_aggregating_from=2, stop_aggregating_at=7, start_intervention_from=4, stop_intervention_at=10,
               num_steps=5)
CFG = DeLeakerConfig(**WINDOWS).resolved(blocks_per_step=BPS)


def attrs_at(offset: int) -> dict:
    return op_schema.node_attributes(offset, BPS)

# Per entity slot: a rectangle (row0, row1, col0, col1) of the h x w grid and its token run.
# Rectangles are >= 3x3 so the opening keeps them.
H_GRID, W_GRID, T_TEXT = 6, 8, 10
REGIONS = [(0, 3, 0, 4), (3, 6, 4, 8), (0, 3, 5, 8)]
TOKENS = [(1, 3), (4, 5), (6, 9)]


def structured_inputs(B: int, E: int, active: list[list[int]], seed: int = 0, H: int = 2, D: int = 16,
                      h: int = H_GRID, w: int = W_GRID, T: int = T_TEXT, dtype=torch.float32,
                      regions=REGIONS):
    """q, k, v [B, H, T+I, D], entity_tokens [B, E, T]; active[b] lists the slots live in sample b."""
    g = torch.Generator().manual_seed(seed)
    I = h * w
    N = T + I
    q = torch.randn(B, H, N, D, generator=g) * 0.5
    k = torch.randn(B, H, N, D, generator=g) * 0.5
    v = torch.randn(B, H, N, D, generator=g)
    ent = torch.zeros(B, E, T)
    strength = 2.0 * D ** 0.25  # logit boost strength^2 / sqrt(D) = 4 on own-entity pairs
    for b in range(B):
        for e in active[b]:
            r0, r1, c0, c1 = regions[e]
            t0, t1 = TOKENS[e]
            ent[b, e, t0:t1] = 1.0
            u = torch.zeros(D)
            u[e] = strength  # orthogonal directions per slot
            img = torch.zeros(h, w, dtype=torch.bool)
            img[r0:r1, c0:c1] = True  # same layout per sample; samples differ by noise
            rows = T + img.flatten().nonzero().flatten()
            q[b, :, rows, :] += u
            k[b, :, t0:t1, :] += u
    return q.to(dtype), k.to(dtype), v.to(dtype), ent


def run_ort(sess, q, k, v, ent, hist, step, grid, configs):
    """One op call in ONNX Runtime; configs: one ResolvedConfig per sample (the settings inputs)."""
    windows, knobs, rules = settings_tensors(configs)
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), entity_tokens=ent.numpy(), history=hist.numpy(),
                 step=np.array(step, dtype=np.int64), grid=np.array(grid, dtype=np.int64), windows=windows.numpy(),
                 knobs=knobs.numpy(), rules=rules.numpy())
    out, hist_out = sess.run(None, feeds)
    return torch.from_numpy(out), torch.from_numpy(hist_out)


def run_ref(q, k, v, ent, hist, step, grid, configs, offset):
    return deleaker_attention_ref(q, k, v, ent, hist, step, grid, *settings_tensors(configs), **attrs_at(offset))


def session(model: onnx.ModelProto):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def plain(q, k, v):
    qf, kf, vf = q.float(), k.float(), v.float()
    return torch.softmax(qf @ kf.transpose(-1, -2) / qf.shape[-1] ** 0.5, dim=-1) @ vf


_SESSIONS: dict = {}


def cached_session(E: int, offset: int):
    """One session per (E, node): the settings are inputs, so every config shares it."""
    if (E, offset) not in _SESSIONS:
        _SESSIONS[E, offset] = session(onnx_op.make_single_op_model(E, attrs_at(offset)))
    return _SESSIONS[E, offset]


# --------------------------------------------------------------------------------------------
# Structure of the function and the node
# --------------------------------------------------------------------------------------------

def test_model_checks_and_body_is_standard_ops():
    model = onnx_op.make_single_op_model(3, attrs_at(1))
    onnx.checker.check_model(model, full_check=True)
    (fn,) = model.functions
    assert (fn.domain, fn.name) == (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)
    assert tuple(fn.input) == op_schema.INPUT_NAMES
    assert tuple(fn.input)[-3:] == ("windows", "knobs", "rules")
    assert list(fn.output) == [t.name for t in op_schema.OUTPUTS]
    # layout is declared with its default (text_image), so nodes exported before layouts still mean FLUX.1's order
    declared = tuple(fn.attribute) + tuple(a.name for a in fn.attribute_proto if a.name in op_schema.ATTRIBUTE_NAMES)
    assert declared == op_schema.ATTRIBUTE_NAMES == ("block_offset", "blocks_per_step", "layout")
    body_domains = {d for d, _ in onnx_op.function_body_op_types(fn)}
    assert body_domains <= {"", "ai.onnx"}, body_domains
    assert {(o.domain, o.version) for o in model.opset_import} >= {(op_schema.ONNX_DOMAIN, 2)}
    (node,) = model.graph.node
    got = {a.name: helper_value(a) for a in node.attribute}
    # only structural attributes on the node: no DeLeaker setting is baked in
    assert got == {"block_offset": 1, "blocks_per_step": BPS, "layout": 0, "plugin_namespace": op_schema.PLUGIN_NAMESPACE,
                   "plugin_version": op_schema.PLUGIN_VERSION}
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert shapes["windows"] == ["B", 4] and shapes["knobs"] == ["B", 3] and shapes["rules"] == ["B", 6]


def helper_value(a):
    return onnx.helper.get_attribute_value(a).decode() if a.type == onnx.AttributeProto.STRING \
        else onnx.helper.get_attribute_value(a)


def test_node_rejects_bad_attributes_and_inputs():
    names = list(op_schema.INPUT_NAMES)
    with pytest.raises(ValueError, match=r"missing \['blocks_per_step'\]"):
        onnx_op.make_node(names, ["o", "h"], {"block_offset": 0})
    with pytest.raises(ValueError, match=r"unknown \['k_strength'\].*windows/knobs/rules inputs"):
        onnx_op.make_node(names, ["o", "h"], {**attrs_at(0), "k_strength": 1.2})
    with pytest.raises(ValueError, match="takes 10 inputs"):
        onnx_op.make_node(names[:7], ["o", "h"], attrs_at(0))  # a v1 node (no settings inputs)
    with pytest.raises(ValueError, match="num_slots"):
        onnx_op.make_function(0)


def test_one_function_serves_nodes_with_different_offsets():
    """Two nodes, one FunctionProto: attribute references give each node its own tau."""
    E = 2
    model = onnx_op.make_single_op_model(E, attrs_at(0))
    g = model.graph
    # second node at block_offset 2, fed from the first node's history_out
    node2 = onnx_op.make_node(["q", "k", "v", "entity_tokens", "history_out", "step", "grid", "windows", "knobs",
                               "rules"], ["out2", "history_out2"], attrs_at(2), name="deleaker_attention_1")
    g.node.append(node2)
    g.output.extend([onnx.helper.make_tensor_value_info("out2", onnx.TensorProto.FLOAT, ["B", "H", "N", "D"]),
                     onnx.helper.make_tensor_value_info("history_out2", onnx.TensorProto.FLOAT, ["B", E, "I"])])
    onnx.checker.check_model(model, full_check=True)
    sess = session(model)
    q, k, v, ent = structured_inputs(1, E, [[0, 1]])
    hist = torch.zeros(1, E, H_GRID * W_GRID)
    step = 1  # node 1: tau 3 (history only); node 2: tau 5 (intervenes)
    windows, knobs, rules = settings_tensors([CFG])
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), entity_tokens=ent.numpy(), history=hist.numpy(),
                 step=np.array(step, dtype=np.int64), grid=np.array([H_GRID, W_GRID], dtype=np.int64),
                 windows=windows.numpy(), knobs=knobs.numpy(), rules=rules.numpy())
    out1, h1, out2, h2 = (torch.from_numpy(x) for x in sess.run(None, feeds))
    r1, rh1 = run_ref(q, k, v, ent, hist, step, [H_GRID, W_GRID], [CFG], 0)
    r2, rh2 = run_ref(q, k, v, ent, rh1, step, [H_GRID, W_GRID], [CFG], 2)
    for got, want in ((out1, r1), (h1, rh1), (out2, r2), (h2, rh2)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert (r2 - plain(q, k, v)).abs().max() > 1e-2  # node 2 intervened, node 1 did not
    torch.testing.assert_close(r1, plain(q, k, v), atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# Parity with the reference, along a trajectory of steps (history in and out)
# --------------------------------------------------------------------------------------------

TRAJECTORY_CASES = {
    # name: (E, active slots per sample, config overrides, grid)
    "E1": (1, [[0]], {}, (H_GRID, W_GRID)),
    "E2": (2, [[0, 1]], {}, (H_GRID, W_GRID)),
    "E3_batch2_per_sample_slots": (3, [[0, 1, 2], [0, 2]], {}, (H_GRID, W_GRID)),
    "E3_text_text_on": (3, [[0, 1, 2], [1, 2]], {"do_text_text_weakening": True}, (H_GRID, W_GRID)),
    "E2_no_history_no_smoothing": (2, [[0, 1], [0, 1]], {"use_history": False, "do_smoothing": False},
                                   (H_GRID, W_GRID)),
    "E3_only_image_image": (3, [[0, 1, 2]], {"do_image_text_weakening": False,
                                              "do_image_text_strengthening": False}, (H_GRID, W_GRID)),
    "E2_transposed_grid": (2, [[0, 1]], {}, (W_GRID, H_GRID)),
}


@pytest.mark.parametrize("name", list(TRAJECTORY_CASES))
def test_trajectory_matches_reference(name):
    E, active, overrides, (h, w) = TRAJECTORY_CASES[name]
    B = len(active)
    cfg = DeLeakerConfig(**{**WINDOWS, **overrides}).resolved(BPS)
    regions = REGIONS if (h, w) == (H_GRID, W_GRID) else [(c0, c1, r0, r1) for r0, r1, c0, c1 in REGIONS]
    q, k, v, ent = structured_inputs(B, E, active, seed=zlib.crc32(name.encode()) % 1000, h=h, w=w,
                                     regions=regions)
    grid = (h, w)
    I = h * w
    hist_ref = torch.zeros(B, E, I)
    fired = 0
    for step in range(5):
        for offset in (1, 2):  # tau = 3*step + offset: 1,2 | 4,5 | 7,8 | 10,11 | 13,14
            tau = 3 * step + offset
            # vary q/k per block so the history accumulates different p's
            qs, ks = q * (1 + 0.05 * tau), k * (1 - 0.02 * tau)
            want, want_h = run_ref(qs, ks, v, ent, hist_ref, step, grid, [cfg] * B, offset)
            got, got_h = run_ort(cached_session(E, offset), qs, ks, v, ent, hist_ref, step, grid, [cfg] * B)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} tau={tau}: {m}")
            torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5,
                                       msg=lambda m: f"{name} tau={tau} history: {m}")
            base = plain(qs, ks, v)
            diff = (want - base).abs().amax(dim=(1, 2, 3))  # per sample
            inside = cfg.start_intervention_from <= tau <= cfg.stop_intervention_at
            for b in range(B):
                if inside and E > 1 and len(active[b]) > 1:
                    assert diff[b] > 1e-2, f"{name} tau={tau} sample {b}: masks did not fire"
                    fired += 1
                else:  # outside the window, or fewer than two live slots: plain attention
                    assert diff[b] < 1e-5, f"{name} tau={tau} sample {b}: should be plain attention"
            hist_ref = want_h
    if E > 1:
        assert fired >= 4
        assert (hist_ref.abs().sum() > 0) == cfg.use_history  # history accumulated iff used


def test_history_regimes():
    """Before a0 untouched, == a0 set to p, inside a running mean, from a1 on frozen; inactive slots kept."""
    E = 3
    q, k, v, ent = structured_inputs(1, E, [[0, 1]])  # slot 2 inactive
    hist = torch.rand(1, E, H_GRID * W_GRID, generator=torch.Generator().manual_seed(3))
    grid = (H_GRID, W_GRID)
    seen = set()
    for step, offset in ((0, 1), (0, 2), (1, 0), (2, 1), (3, 0)):  # tau 1, 2(=a0), 3, 7(=a1), 9
        tau = 3 * step + offset
        want, want_h = run_ref(q, k, v, ent, hist, step, grid, [CFG], offset)
        got, got_h = run_ort(cached_session(E, offset), q, k, v, ent, hist, step, grid, [CFG])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)
        assert torch.equal(got_h[:, 2], hist[:, 2])  # inactive slot: history passes through
        changed = not torch.allclose(got_h, hist)
        seen.add((tau < 2 or tau >= 7, changed))
    assert seen == {(True, False), (False, True)}


def test_no_active_slot_is_plain_attention():
    E = 2
    q, k, v, ent = structured_inputs(2, E, [[], []])
    hist = torch.rand(2, E, H_GRID * W_GRID)
    got, got_h = run_ort(cached_session(E, 2), q, k, v, ent, hist, 2, (H_GRID, W_GRID), [CFG] * 2)  # tau 8
    torch.testing.assert_close(got, plain(q, k, v), atol=ATOL, rtol=RTOL)
    assert torch.equal(got_h, hist)


def test_fp16_inputs():
    E = 2
    q, k, v, ent = structured_inputs(1, E, [[0, 1]], dtype=torch.float16)
    hist = torch.zeros(1, E, H_GRID * W_GRID)
    sess = session(onnx_op.make_single_op_model(E, attrs_at(1), dtype="float16"))
    for step in (1, 2):  # tau 4 (a0 < tau, first intervention), 7
        want, want_h = run_ref(q, k, v, ent, hist, step, (H_GRID, W_GRID), [CFG], 1)
        got, got_h = run_ort(sess, q, k, v, ent, hist, step, (H_GRID, W_GRID), [CFG])
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)
        hist = want_h


# --------------------------------------------------------------------------------------------
# One batch, different settings per sample
# --------------------------------------------------------------------------------------------

# Three samples with different windows, thresholds, alpha and rules; sample 2 has no active slot.
MIXED = [
    DeLeakerConfig(**WINDOWS).resolved(BPS),
    DeLeakerConfig(start_aggregating_from=0, stop_aggregating_at=4, start_intervention_from=1, stop_intervention_at=6,
                   std_mul_text=0.5, std_mul_image_image=0.5, k_strength=2.0, do_smoothing=False,
                   do_text_text_weakening=True).resolved(BPS),
    DeLeakerConfig(start_aggregating_from=5, stop_aggregating_at=12, start_intervention_from=7,
                   stop_intervention_at=14, use_history=False, do_image_image=False, k_strength=1.5).resolved(BPS),
]
MIXED_ACTIVE = [[0, 1, 2], [0, 2], []]


def test_batch_with_different_settings_equals_each_sample_alone():
    """Each sample of a mixed batch gets what it gets alone (ORT and the reference), along a
    trajectory that crosses every sample's windows; and the settings really are per sample."""
    E, B = 3, 3
    q, k, v, ent = structured_inputs(B, E, MIXED_ACTIVE, seed=11)
    grid = (H_GRID, W_GRID)
    hist = torch.rand(B, E, H_GRID * W_GRID, generator=torch.Generator().manual_seed(5)) * 0.05
    hist_alone = [hist[b:b + 1] for b in range(B)]
    fired = [0] * B
    setting_mattered = 0
    for step in range(5):
        for offset in (0, 2):  # tau 0,2 | 3,5 | 6,8 | 9,11 | 12,14
            tau = BPS * step + offset
            qs, ks = q * (1 + 0.05 * tau), k * (1 - 0.02 * tau)
            got, got_h = run_ort(cached_session(E, offset), qs, ks, v, ent, hist, step, grid, MIXED)
            want, want_h = run_ref(qs, ks, v, ent, hist, step, grid, MIXED, offset)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"tau={tau}: {m}")
            torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5, msg=lambda m: f"tau={tau} history: {m}")
            base = plain(qs, ks, v)
            for b in range(B):
                sl = slice(b, b + 1)
                alone, alone_h = run_ort(cached_session(E, offset), qs[sl], ks[sl], v[sl], ent[sl], hist_alone[b],
                                         step, grid, [MIXED[b]])
                torch.testing.assert_close(got[sl], alone, atol=ATOL, rtol=RTOL,
                                           msg=lambda m: f"tau={tau} sample {b} batched vs alone: {m}")
                torch.testing.assert_close(got_h[sl], alone_h, atol=1e-6, rtol=1e-5)
                hist_alone[b] = alone_h
                cfg = MIXED[b]
                inside = cfg.start_intervention_from <= tau <= cfg.stop_intervention_at
                edited = float((want[b] - base[b]).abs().max())
                if inside and len(MIXED_ACTIVE[b]) > 1:
                    assert edited > 1e-2, f"tau={tau} sample {b}: masks did not fire"
                    fired[b] += 1
                    # the same sample under another sample's settings comes out different
                    other = MIXED[(b + 1) % 2] if b < 2 else MIXED[0]
                    o, _ = run_ref(qs[sl], ks[sl], v[sl], ent[sl], hist[sl], step, grid, [other], offset)
                    setting_mattered += float((o - want[sl]).abs().max()) > 1e-2
                else:
                    assert edited < 1e-5, f"tau={tau} sample {b}: should be plain attention"
            assert torch.equal(got_h[2], hist[2])  # no active slot: history passes through
            hist = want_h
    assert fired[0] >= 2 and fired[1] >= 2 and fired[2] == 0, fired
    assert setting_mattered >= 3
