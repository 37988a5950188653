"""Layouts of the joint sequence (op_schema.LAYOUTS): the op computes the same DeLeaker attention
whatever order a model family puts its text, image and excluded tokens in.

Inputs are made in the canonical order (text, image, excluded) with structured entity attention
(each entity owns a rectangle of image rows, so the masks fire with wide margins), then reordered
into each layout. The op on the reordered inputs, with that layout, must give the canonical
result reordered the same way: the reference op (float32, the only difference is the order of
summation inside the softmax: atol 2e-5, ~100x that noise, while the edit itself moves outputs by
more than 1e-2, asserted) and the ONNX function body in ONNX Runtime, at the same tolerance as
tests/test_onnx_op.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deleaker.modeling.reference_op import deleaker_attention_ref, settings_tensors
from deleaker.runtime import op_schema
from deleaker.runtime.config import DeLeakerConfig

ATOL, RTOL = 2e-5, 1e-5
H_GRID, W_GRID, T, X = 4, 5, 6, 3
TOKENS = [(1, 3), (4, 5)]
REGIONS = [(0, 2, 0, 3), (2, 4, 2, 5)]
CFG = DeLeakerConfig(start_aggregating_from=0, stop_aggregating_at=50, start_intervention_from=0,
                     stop_intervention_at=50, do_smoothing=False, num_steps=5).resolved(blocks_per_step=1)


def canonical_inputs(excluded: int, seed: int = 0, H: int = 2, D: int = 16):
    """q, k, v [1, H, T+I+X, D] in canonical order, entity_tokens [1, 2, T]."""
    g = torch.Generator().manual_seed(seed)
    I = H_GRID * W_GRID
    N = T + I + excluded
    q, k = (torch.randn(1, H, N, D, generator=g) * 0.5 for _ in range(2))
    v = torch.randn(1, H, N, D, generator=g)
    ent = torch.zeros(1, 2, T)
    for e, ((t0, t1), (r0, r1, c0, c1)) in enumerate(zip(TOKENS, REGIONS)):
        ent[0, e, t0:t1] = 1
        img = torch.zeros(H_GRID, W_GRID, dtype=torch.bool)
        img[r0:r1, c0:c1] = True
        u = torch.zeros(D)
        u[e] = 2.0 * D ** 0.25
        q[0, :, T + img.flatten().nonzero().flatten()] += u
        k[0, :, t0:t1] += u
    return q, k, v, ent


def to_model_order(x: torch.Tensor, layout: int) -> torch.Tensor:
    """x [B, H, N, D] canonical -> the layout's order (model position order[j] holds canonical j)."""
    order = op_schema.canonical_order(layout, T, H_GRID * W_GRID, x.shape[2])
    out = torch.empty_like(x)
    out[:, :, order] = x
    return out


def ref(q, k, v, ent, layout: int, step: int = 1, hist=None):
    hist = torch.zeros(1, 2, H_GRID * W_GRID) if hist is None else hist
    return deleaker_attention_ref(q, k, v, ent, hist, torch.tensor(step), torch.tensor([H_GRID, W_GRID]),
                                  *settings_tensors([CFG]), **op_schema.node_attributes(0, 1, layout))


def plain(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


def excluded_of(layout: int) -> int:
    return X if "excluded" in op_schema.LAYOUTS[layout] else 0


def test_layout_table():
    assert op_schema.LAYOUT_NAMES[op_schema.DEFAULT_LAYOUT] == "text_image"
    assert op_schema.layout_code("image_text") == 1
    assert len(set(op_schema.LAYOUTS)) == len(op_schema.LAYOUTS) == 8
    assert op_schema.canonical_order(0, 2, 3, 5) == [0, 1, 2, 3, 4]  # FLUX.1: the identity
    assert op_schema.canonical_order(1, 2, 3, 5) == [3, 4, 0, 1, 2]  # SD3: image first
    assert op_schema.segment_starts(op_schema.layout_code("text_excluded_image"), 2, 3, 7) == \
        {"text": 0, "image": 4, "excluded": 2}
    with pytest.raises(ValueError, match="unknown layout 'text_first'"):
        op_schema.layout_code("text_first")
    with pytest.raises(ValueError, match="do not make a sequence of 9"):
        op_schema.segment_lengths(1, 2, 3, 9)  # a two-segment layout has no room for extra tokens


@pytest.mark.parametrize("name", op_schema.LAYOUT_NAMES)
def test_reference_is_the_canonical_result_reordered(name):
    layout = op_schema.layout_code(name)
    nx = excluded_of(layout)
    q, k, v, ent = canonical_inputs(nx, seed=layout)
    base = op_schema.layout_code("text_image_excluded" if nx else "text_image")
    want, want_h = ref(q, k, v, ent, base)
    assert (want - plain(q, k, v)).abs().max() > 1e-2  # the edit fired
    got, got_h = ref(*(to_model_order(x, layout) for x in (q, k, v)), ent, layout)
    torch.testing.assert_close(got, to_model_order(want, layout), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)
    assert got_h.abs().sum() > 0


def test_excluded_tokens_are_never_edited():
    layout = op_schema.layout_code("text_excluded_image")
    q, k, v, ent = canonical_inputs(X)
    qm, km, vm = (to_model_order(x, layout) for x in (q, k, v))
    out, _ = ref(qm, km, vm, ent, layout)
    rows = slice(T, T + X)  # the excluded rows in this layout
    torch.testing.assert_close(out[:, :, rows], plain(qm, km, vm)[:, :, rows], atol=ATOL, rtol=RTOL)
    assert (out - plain(qm, km, vm)).abs().max() > 1e-2


def test_bad_lengths_are_one_line_errors():
    q, k, v, ent = canonical_inputs(X)
    with pytest.raises(ValueError, match="does not match the 23 image tokens"):
        ref(q, k, v, ent, 0)  # text_image: three tokens too many is a wrong grid, not excluded tokens
    with pytest.raises(ValueError, match="layout must be 0..7"):
        ref(q, k, v, ent, 8)


ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name", ["text_image", "image_text", "text_image_excluded", "text_excluded_image",
                                  "excluded_image_text"])
def test_onnx_body_matches_reference(name):
    from deleaker.export import onnx_op

    layout = op_schema.layout_code(name)
    q, k, v, ent = canonical_inputs(excluded_of(layout), seed=10 + layout)
    qm, km, vm = (to_model_order(x, layout) for x in (q, k, v))
    model = onnx_op.make_single_op_model(2, op_schema.node_attributes(0, 1, layout))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    hist = torch.zeros(1, 2, H_GRID * W_GRID)
    windows, knobs, rules = settings_tensors([CFG])
    feeds = dict(q=qm.numpy(), k=km.numpy(), v=vm.numpy(), entity_tokens=ent.numpy(), history=hist.numpy(),
                 step=np.array(1, np.int64), grid=np.array([H_GRID, W_GRID], np.int64), windows=windows.numpy(),
                 knobs=knobs.numpy(), rules=rules.numpy())
    got, got_h = (torch.from_numpy(x) for x in sess.run(None, feeds))
    want, want_h = ref(qm, km, vm, ent, layout)
    assert (want - plain(qm, km, vm)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got_h, want_h, atol=1e-6, rtol=1e-5)


def reorder_nodes(graph) -> int:
    """Nodes of the body's reorder: the gathers of q, k, v and the scatter back (graph inputs q, k, v)."""
    qkv = {"q", "k", "v"}
    return sum((n.op_type == "Gather" and n.input[0] in qkv) or n.op_type == "ScatterElements" for n in graph.node)


@pytest.mark.parametrize("name", op_schema.LAYOUT_NAMES)
def test_portable_body_per_layout(name):
    """The portable form inlines a body made for the node's layout: an identity layout (text_image,
    text_image_excluded) has no reorder at all, as the reference op; every layout computes what the
    general function does (the gather is exact, so within float noise of it)."""
    from deleaker.export import onnx_op, onnx_portable

    layout = op_schema.layout_code(name)
    q, k, v, ent = canonical_inputs(excluded_of(layout), seed=20 + layout)
    qm, km, vm = (to_model_order(x, layout) for x in (q, k, v))
    model = onnx_op.make_single_op_model(2, op_schema.node_attributes(0, 1, layout))
    general, specialised = onnx_portable.inline_op(model), onnx_portable.inline_op(model, num_slots=2)
    assert reorder_nodes(general.graph) == 4  # 3 gathers + 1 scatter
    if op_schema.is_identity_layout(layout):
        assert reorder_nodes(specialised.graph) == 0
        assert len(specialised.graph.node) < len(general.graph.node) - 40  # the order's computation went too
    else:
        assert reorder_nodes(specialised.graph) == 4
    windows, knobs, rules = settings_tensors([CFG])
    feeds = dict(q=qm.numpy(), k=km.numpy(), v=vm.numpy(), entity_tokens=ent.numpy(),
                 history=np.zeros((1, 2, H_GRID * W_GRID), np.float32), step=np.array(1, np.int64),
                 grid=np.array([H_GRID, W_GRID], np.int64), windows=windows.numpy(), knobs=knobs.numpy(),
                 rules=rules.numpy())
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            for m in (general, specialised)]
    want, want_h = ref(qm, km, vm, ent, layout)
    assert (want - plain(qm, km, vm)).abs().max() > 1e-2  # the op edits here
    for got, got_h in runs:
        torch.testing.assert_close(torch.from_numpy(got), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(torch.from_numpy(got_h), want_h, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(runs[1][0], runs[0][0], atol=1e-6, rtol=0)


def test_node_without_layout_means_text_image():
    """An artifact exported before layouts has nodes without the attribute: the body reads 0."""
    from deleaker.export import onnx_op

    q, k, v, ent = canonical_inputs(0)
    model = onnx_op.make_single_op_model(2, op_schema.node_attributes(0, 1))
    node = model.graph.node[0]
    kept = [a for a in node.attribute if a.name != "layout"]
    del node.attribute[:]
    node.attribute.extend(kept)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    windows, knobs, rules = settings_tensors([CFG])
    feeds = dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), entity_tokens=ent.numpy(),
                 history=np.zeros((1, 2, H_GRID * W_GRID), np.float32), step=np.array(1, np.int64),
                 grid=np.array([H_GRID, W_GRID], np.int64), windows=windows.numpy(), knobs=knobs.numpy(),
                 rules=rules.numpy())
    got = torch.from_numpy(sess.run(None, feeds)[0])
    torch.testing.assert_close(got, ref(q, k, v, ent, 0)[0], atol=ATOL, rtol=RTOL)


# --------------------------------------------------------------------------------------------
# Windows in normalised time
# --------------------------------------------------------------------------------------------

def test_normalised_windows_round_trip_and_carry_over():
    from deleaker.runtime.config import PRESETS, carried_over, normalised_windows

    flux = PRESETS["flux-dev"]
    frac = normalised_windows(flux.resolved(57))
    assert (frac.start_aggregating_from, frac.start_intervention_from) == (12 / 1140, 18 / 1140)
    assert (frac.stop_aggregating_at, frac.stop_intervention_at) == (0.6, 1.0)
    assert frac.block_steps(20, 57) == {"start_aggregating_from": 12, "stop_aggregating_at": 684,
                                        "start_intervention_from": 18, "stop_intervention_at": 1140}
    assert carried_over(flux, 20, 57) == flux  # FLUX.1 to FLUX.1: unchanged
    sd3 = carried_over(flux, 28, 38)  # SD3.5 Large
    assert (sd3.start_aggregating_from, sd3.start_intervention_from) == (11, 17) == \
        (PRESETS["sd3.5-large"].start_aggregating_from, PRESETS["sd3.5-large"].start_intervention_from)
    r = sd3.resolved(38)
    assert (r.stop_aggregating_at, r.stop_intervention_at) == (17 * 38, 28 * 38)  # derived: 12/20 and all of the run
    assert normalised_windows(r).start_intervention_from == pytest.approx(18 / 1140, abs=0.5 / (28 * 38))


def test_normalised_window_out_of_range_is_refused():
    from deleaker.runtime.config import ConfigError, NormalisedWindows

    with pytest.raises(ConfigError, match="start_aggregating_from must be a fraction of the run in"):
        NormalisedWindows(1.5, 1.0, 0.2, 1.0).block_steps(20, 57)
