"""Hand-computed cases for every rule of deleaker-semantics.md, checked on the reference op.

Expected values are built independently of modeling/reference_op.py: small numpy float64
computations that apply each rule literally to known masks. Inputs are structured so that
the masks are known: entity e's tokens get key direction u_e, and the image rows meant to
belong to entity e get query direction u_e, so those rows attend strongly to their entity.
The op runs in float32; 2e-5 absolute on outputs of size ~1 is float32 rounding of a few
hundred-term softmax/matmul sums.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deleaker.modeling import reference_op as ref
from deleaker.runtime.config import ConfigError, DeLeakerConfig, preset

ATOL = 2e-5


def attrs_for(**over):
    """Attributes with windows wide open at tau = step (blocks_per_step=1, block_offset=0)."""
    base = dict(block_offset=0, blocks_per_step=1, layout=0, std_mul_text=1.0, std_mul_image_image=1.0,
                k_strength=1.2, start_aggregating_from=0, stop_aggregating_at=100,
                start_intervention_from=0, stop_intervention_at=100, use_history=0, do_smoothing=0,
                do_image_text_weakening=0, do_image_text_strengthening=0, do_image_image=0,
                do_text_text_weakening=0)
    base.update(over)
    return base


def structured(T=6, h=4, w=4, D=8, H=2, tokens=((1,), (3, 4)), rows=((0, 1, 4, 5), (10, 11, 14, 15)),
               strength=4.0, seed=0, B=1):
    g = torch.Generator().manual_seed(seed)
    N = T + h * w
    q = 0.3 * torch.randn(B, H, N, D, generator=g)  # [B, H, N, D]
    k = 0.3 * torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, D, generator=g)
    ent = torch.zeros(B, len(tokens), T)  # [B, E, T]
    for e, (toks, rws) in enumerate(zip(tokens, rows)):
        for t in toks:
            k[:, :, t, e] += strength
            ent[:, e, t] = 1.0
        for i in rws:
            q[:, :, T + i, e] += strength
    hist = torch.zeros(B, len(tokens), h * w)
    return q, k, v, ent, hist


def split(a: dict, batch: int = 1):
    """A flat attribute dict -> ((windows, knobs, rules) for `batch` samples, structural attributes)."""
    settings = ref.settings_tensors([{n: a[n] for n in ref.op_schema.SETTING_NAMES}] * batch)
    return settings, {n: a[n] for n in ref.op_schema.ATTRIBUTE_NAMES if n in a}


def call(q, k, v, ent, hist, step, grid, a: dict):
    settings, attrs = split(a, q.shape[0])
    return ref.call_op(q, k, v, ent, hist, torch.tensor(step), torch.tensor(grid), *settings, attrs)


def run(q, k, v, ent, hist, step, h, w, **over):
    return call(q, k, v, ent, hist, step, [h, w], attrs_for(**over))


# ---------------- numpy float64 helpers: the rules written out literally ----------------

def np_logits(q, k):
    q, k = q.double().numpy(), k.double().numpy()
    return q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1])  # [H, N, N]


def np_softmax(L):
    m = np.max(L, axis=-1, keepdims=True)
    e = np.exp(L - m)
    return e / e.sum(-1, keepdims=True)


def np_p(P, T, toks):
    return P[:, T:, list(toks)].mean(-1).mean(0)  # [I]


def np_mask(a, beta1=1.0):
    return a > a.mean() + beta1 * a.std(ddof=1)


def np_out(L, v):
    return np_softmax(L) @ v.double().numpy()


def rows_mask(rows, I):
    m = np.zeros(I, bool)
    m[list(rows)] = True
    return m


# ---------------- 4.1 masks ----------------

def test_mask_threshold_uses_unbiased_std_and_strict_greater():
    a = torch.tensor([[0.0, 0.0, 1.0, 3.0]])
    # mean 1, unbiased std sqrt(2): theta = 1 + 1.5*1.414 = 3.12 > 3 (biased std would give 2.84 < 3)
    assert not ref.entity_masks(a, 1.5).any()
    # beta1 = 1: theta = 2.414 < 3, only the last element
    assert ref.entity_masks(a, 1.0).tolist() == [[False, False, False, True]]
    # constant input: std 0, theta = value, strict > selects nothing
    assert not ref.entity_masks(torch.ones(1, 5), 1.0).any()


def grid_mask(h, w, cells):
    m = torch.zeros(1, h, w, dtype=torch.bool)
    for r, c in cells:
        m[0, r, c] = True
    return m


def block(r0, r1, c0, c1):
    return [(r, c) for r in range(r0, r1) for c in range(c0, c1)]


def test_morphology_borders_square():
    corner = grid_mask(5, 5, block(0, 3, 0, 3))
    # erosion: outside counts as 1, so the corner block only loses its inner edge
    assert torch.equal(ref._morph(corner, grow=False), grid_mask(5, 5, block(0, 2, 0, 2)))
    # dilation: outside counts as 0, so it grows inward only
    assert torch.equal(ref._morph(grid_mask(5, 5, [(0, 0)]), grow=True), grid_mask(5, 5, block(0, 2, 0, 2)))
    # open keeps the 3x3 block; close grows it to the full grid, which erosion cannot eat from the border
    assert torch.equal(ref.smooth_masks(corner.reshape(1, 25), 5, 5), torch.ones(1, 25, dtype=torch.bool))
    # a lone pixel is removed by the opening
    assert not ref.smooth_masks(grid_mask(5, 5, [(2, 2)]).reshape(1, 25), 5, 5).any()
    # two 3x3 blocks with a one-column gap: the closing fills the gap, and because its two
    # dilations reach the left and right borders, the erosions cannot take those columns back
    two = grid_mask(9, 9, block(3, 6, 1, 4) + block(3, 6, 5, 8))
    assert torch.equal(ref.smooth_masks(two.reshape(1, 81), 9, 9).reshape(1, 9, 9),
                       grid_mask(9, 9, block(3, 6, 0, 9)))
    # the same pair on a wider grid, away from the borders: gap filled, outer edges restored
    wide = grid_mask(9, 13, block(3, 6, 3, 6) + block(3, 6, 7, 10))
    assert torch.equal(ref.smooth_masks(wide.reshape(1, 117), 9, 13).reshape(1, 9, 13),
                       grid_mask(9, 13, block(3, 6, 3, 10)))


def test_morphology_non_square_grid():
    h, w = 3, 6
    # dilation of the top-right corner pixel stays inside the grid
    assert torch.equal(ref._morph(grid_mask(h, w, [(0, 5)]), grow=True), grid_mask(h, w, block(0, 2, 4, 6)))
    left = grid_mask(h, w, block(0, 3, 0, 3))
    # full-height block: erosion eats only the inner column (top/bottom borders count as 1)
    assert torch.equal(ref._morph(left, grow=False), grid_mask(h, w, block(0, 3, 0, 2)))
    assert torch.equal(ref.smooth_masks(left.reshape(1, h * w), h, w).reshape(1, h, w), left)
    # a 2x2 block in a 3-row grid: rows 1-2 touch the bottom border
    sq = grid_mask(h, w, block(1, 3, 2, 4))
    assert torch.equal(ref._morph(sq, grow=False), grid_mask(h, w, []))  # every pixel sees a 0 neighbour
    bottom = grid_mask(h, w, block(1, 3, 0, 6))  # two full bottom rows: erosion keeps the bottom row
    assert torch.equal(ref._morph(bottom, grow=False), grid_mask(h, w, block(2, 3, 0, 6)))


# ---------------- section 3: history ----------------

def test_history_update_rule():
    p = [torch.full((1, 3), float(x)) for x in (2.0, 4.0, 9.0, 100.0)]
    h = torch.zeros(1, 3)
    a0, a1 = 5, 8
    assert torch.equal(ref.update_history(h, p[0], 4, a0, a1), h)  # before a0
    h = ref.update_history(h, p[0], 5, a0, a1)  # at a0: hist = p
    assert torch.allclose(h, p[0])
    h = ref.update_history(h, p[1], 6, a0, a1)
    assert torch.allclose(h, torch.full((1, 3), 3.0))  # mean(2, 4)
    h = ref.update_history(h, p[2], 7, a0, a1)
    assert torch.allclose(h, torch.full((1, 3), 5.0))  # mean(2, 4, 9)
    assert torch.equal(ref.update_history(h, p[3], 8, a0, a1), h)  # frozen at a1


def test_history_through_the_op_and_mask_source():
    T, h, w = 6, 4, 4
    q, k, v, ent, hist = structured(T=T, h=h, w=w)
    a0, a1 = 2, 5
    running = []
    for step in range(7):
        # vary q per step so p changes block to block
        qs = q * (1 + 0.1 * step)
        P = np_softmax(np_logits(qs[0], k[0]))
        p = np.stack([np_p(P, T, (1,)), np_p(P, T, (3, 4))])
        out, hist_new = run(qs, k, v, ent, hist, step, h, w, use_history=1,
                            start_aggregating_from=a0, stop_aggregating_at=a1, start_intervention_from=a0)
        if a0 <= step < a1:
            running.append(p)
        expect = np.mean(running, axis=0) if running else np.zeros((2, h * w))
        np.testing.assert_allclose(hist_new[0].numpy(), expect, atol=1e-6)
        if step < a0:  # before a0: plain attention
            np.testing.assert_allclose(out[0].numpy(), np_out(np_logits(qs[0], k[0]), v[0]), atol=ATOL)
        hist = hist_new


def test_use_history_off_passes_history_through():
    q, k, v, ent, hist = structured()
    hist = torch.rand_like(hist)
    _, hout = run(q, k, v, ent, hist, 3, 4, 4, use_history=0)
    assert torch.equal(hout, hist)


# ---------------- 4.2 rules, each on its own ----------------

T0, H0, W0 = 6, 4, 4
ROWS1, ROWS2 = (0, 1, 4, 5), (10, 11, 14, 15)
TOK1, TOK2 = (1,), (3, 4)


def _known_masks(q, k):
    """Premise of the rule tests: the structured input gives exactly the planted masks."""
    P = np_softmax(np_logits(q[0], k[0]))
    m1, m2 = np_mask(np_p(P, T0, TOK1)), np_mask(np_p(P, T0, TOK2))
    assert m1.tolist() == rows_mask(ROWS1, 16).tolist()
    assert m2.tolist() == rows_mask(ROWS2, 16).tolist()
    return m1, m2


def test_rule_W_weakening():
    q, k, v, ent, hist = structured()
    m1, m2 = _known_masks(q, k)
    L = np_logits(q[0], k[0])
    img = L[:, T0:, :]
    for i in np.nonzero(m1)[0]:
        img[:, i, list(TOK2)] = -np.inf
    for i in np.nonzero(m2)[0]:
        img[:, i, list(TOK1)] = -np.inf
    out, _ = run(q, k, v, ent, hist, 3, H0, W0, do_image_text_weakening=1)
    np.testing.assert_allclose(out[0].numpy(), np_out(L, v[0]), atol=ATOL)
    plain = np_out(np_logits(q[0], k[0]), v[0])
    assert np.abs(out[0].numpy() - plain).max() > 1e-3  # the rule did something


def test_rule_S_strengthening_multiplies_logits_whatever_their_sign():
    q, k, v, ent, hist = structured()
    m1, m2 = _known_masks(q, k)
    L = np_logits(q[0], k[0])
    img = L[:, T0:, :]
    for m, toks in ((m1, TOK1), (m2, TOK2)):
        for i in np.nonzero(m)[0]:
            img[:, i, list(toks)] *= 1.7
    out, _ = run(q, k, v, ent, hist, 3, H0, W0, do_image_text_strengthening=1, k_strength=1.7)
    np.testing.assert_allclose(out[0].numpy(), np_out(L, v[0]), atol=ATOL)
    # text rows and unmasked image rows are untouched
    plain = np_out(np_logits(q[0], k[0]), v[0])
    untouched = np.r_[np.arange(T0), T0 + np.nonzero(~(m1 | m2))[0]]
    np.testing.assert_allclose(out[0].numpy()[:, untouched], plain[:, untouched], atol=ATOL)


def test_rule_TT_text_text():
    q, k, v, ent, hist = structured()
    _known_masks(q, k)
    L = np_logits(q[0], k[0])
    L[:, TOK1[0], TOK2[0]] = -np.inf
    L[:, TOK2[0], TOK1[0]] = -np.inf
    out, _ = run(q, k, v, ent, hist, 3, H0, W0, do_text_text_weakening=1)
    np.testing.assert_allclose(out[0].numpy(), np_out(L, v[0]), atol=ATOL)


def _np_cut(L, P, rows, cols, beta2):
    """Rule X on one ordered region, literally."""
    G = P[:, T0:, T0:].mean(0)
    region = rows[:, None] & cols[None, :]
    vals = G[region]
    vals = vals[vals != 0]
    if vals.size == 0:
        return 0
    thr = vals.mean() + beta2 * (vals.std(ddof=1) if vals.size > 1 else np.nan)
    cut = region & (G > thr)
    L[:, T0:, T0:][:, cut] = -np.inf
    return int(cut.sum())


def test_rule_X_image_image_cut():
    q, k, v, ent, hist = structured()
    m1, m2 = _known_masks(q, k)
    L = np_logits(q[0], k[0])
    P = np_softmax(L)
    n12 = _np_cut(L, P, m1, m2, 0.5)
    n21 = _np_cut(L, P, m2, m1, 0.5)  # same G: P is not recomputed between the two regions
    assert 0 < n12 < 16 and 0 < n21 < 16
    out, _ = run(q, k, v, ent, hist, 3, H0, W0, do_image_image=1, std_mul_image_image=0.5)
    np.testing.assert_allclose(out[0].numpy(), np_out(L, v[0]), atol=ATOL)


def test_rule_X_single_value_cuts_nothing():
    L = torch.zeros(1, T0 + 16, T0 + 16)
    G = torch.zeros(16, 16)
    G[0, 10] = 0.5  # the only non-zero value in the region: std is NaN, nothing cut
    rows, cols = torch.tensor(rows_mask(ROWS1, 16)), torch.tensor(rows_mask(ROWS2, 16))
    ref._cut_image_image(L, G, rows, cols, 1.0, T0)
    assert torch.isfinite(L).all()


# ---------------- three entities ----------------

ROWS3, TOK3 = (2, 3, 6, 7), (5,)


def _three():
    # strength 3 (not 4): image-image attention still matters enough for the X cuts to move outputs
    return structured(tokens=(TOK1, TOK2, TOK3), rows=(ROWS1, ROWS2, ROWS3), strength=3.0, seed=1)


def _np_three(q, k, v, alpha, beta2, sequential=True):
    """W, S, X over pairs (1,2), (1,3), (2,3); `sequential=False` is the wrong variant whose G
    always comes from the unedited probabilities (to show the test can tell them apart)."""
    L = np_logits(q[0], k[0])
    P = P0 = np_softmax(L)
    ms = [np_mask(np_p(P, T0, t)) for t in (TOK1, TOK2, TOK3)]
    for m, r in zip(ms, (ROWS1, ROWS2, ROWS3)):
        assert m.tolist() == rows_mask(r, 16).tolist()
    toks = (TOK1, TOK2, TOK3)
    cuts = []
    for e1, e2 in ((0, 1), (0, 2), (1, 2)):
        img = L[:, T0:, :]
        for i in np.nonzero(ms[e1])[0]:
            img[:, i, list(toks[e2])] = -np.inf
        for i in np.nonzero(ms[e2])[0]:
            img[:, i, list(toks[e1])] = -np.inf
        for e in (e1, e2):
            for i in np.nonzero(ms[e])[0]:
                img[:, i, list(toks[e])] *= alpha
        G = P if sequential else P0
        cuts.append(_np_cut(L, G, ms[e1], ms[e2], beta2) + _np_cut(L, G, ms[e2], ms[e1], beta2))
        P = np_softmax(L)  # later pairs see these probabilities
    return L, cuts


def test_three_entities_alpha_compounds_and_pairs_see_edits():
    q, k, v, ent, hist = _three()
    alpha, beta2 = 1.3, 0.5
    L, cuts = _np_three(q, k, v, alpha, beta2)
    assert all(c > 0 for c in cuts)
    out, _ = run(q, k, v, ent, hist, 3, H0, W0, do_image_text_weakening=1, do_image_text_strengthening=1,
                 do_image_image=1, k_strength=alpha, std_mul_image_image=beta2)
    np.testing.assert_allclose(out[0].numpy(), np_out(L, v[0]), atol=ATOL)
    # the variant with an unedited G for every pair is far from the op's output
    L_wrong, _ = _np_three(q, k, v, alpha, beta2, sequential=False)
    assert np.abs(out[0].numpy() - np_out(L_wrong, v[0])).max() > 1e-3
    # alpha^2 on the own block of entity 1 (pairs (1,2) and (1,3)), a row of M1 only
    L0 = np_logits(q[0], k[0])
    i = ROWS1[0]
    assert np.allclose(L[:, T0 + i, TOK1[0]], L0[:, T0 + i, TOK1[0]] * alpha ** 2)


# ---------------- windows, E = 1, no entity, batch ----------------

def test_intervention_window_edges():
    q, k, v, ent, hist = structured()
    plain = np_out(np_logits(q[0], k[0]), v[0])
    kw = dict(do_image_text_weakening=1, start_aggregating_from=2, start_intervention_from=4,
              stop_intervention_at=6)
    edited = {}
    for step in (3, 4, 6, 7):
        out, _ = run(q, k, v, ent, hist, step, H0, W0, **kw)
        edited[step] = np.abs(out[0].numpy() - plain).max() > 1e-3
    assert edited == {3: False, 4: True, 6: True, 7: False}


def test_block_clock_uses_offset_and_blocks_per_step():
    q, k, v, ent, hist = structured()
    plain = np_out(np_logits(q[0], k[0]), v[0])
    kw = dict(do_image_text_weakening=1, start_aggregating_from=0, start_intervention_from=12,
              stop_intervention_at=100, blocks_per_step=5)
    out, _ = run(q, k, v, ent, hist, 2, H0, W0, block_offset=1, **kw)  # tau = 11
    assert np.abs(out[0].numpy() - plain).max() < ATOL
    out, _ = run(q, k, v, ent, hist, 2, H0, W0, block_offset=2, **kw)  # tau = 12
    assert np.abs(out[0].numpy() - plain).max() > 1e-3


def test_single_entity_and_no_entity_are_plain_attention():
    q, k, v, ent, hist = structured()
    plain = np_out(np_logits(q[0], k[0]), v[0])
    everything = dict(do_image_text_weakening=1, do_image_text_strengthening=1, do_image_image=1,
                      do_text_text_weakening=1, use_history=1, do_smoothing=1)
    one = ent.clone()
    one[:, 1] = 0  # slot 2 inactive
    out, hout = run(q, k, v, one, hist, 3, H0, W0, **everything)
    np.testing.assert_allclose(out[0].numpy(), plain, atol=ATOL)
    assert hout[0, 0].abs().sum() > 0 and hout[0, 1].abs().sum() == 0  # history still updates slot 1
    out, hout = run(q, k, v, torch.zeros_like(ent), hist, 3, H0, W0, **everything)
    np.testing.assert_allclose(out[0].numpy(), plain, atol=ATOL)
    assert torch.equal(hout, hist)


def test_batch_of_two_gives_each_its_single_sample_result():
    a = structured(seed=1)
    b = structured(seed=2, rows=((8, 9, 12, 13), (2, 3, 6, 7)), tokens=((0,), (2,)))
    batch = [torch.cat([x, y]) for x, y in zip(a, b)]
    kw = dict(do_image_text_weakening=1, do_image_text_strengthening=1, do_image_image=1, use_history=1,
              do_smoothing=1, start_aggregating_from=1)
    hist = torch.rand_like(batch[4])
    out, hout = run(*batch[:4], hist, 3, H0, W0, **kw)
    for i, single in enumerate((a, b)):
        o, ho = run(*single[:4], hist[i:i + 1], 3, H0, W0, **kw)
        torch.testing.assert_close(out[i:i + 1], o, rtol=0, atol=1e-6)
        torch.testing.assert_close(hout[i:i + 1], ho, rtol=0, atol=1e-7)
    assert not torch.allclose(out[0], out[1])


def test_defaults_with_smoothing_edit_on_a_larger_grid():
    """Full default pipeline (history, smoothing, W, S, X) on a 8x8 grid with blob-shaped entities."""
    r1 = [r * 8 + c for r in range(0, 4) for c in range(0, 4)]
    r2 = [r * 8 + c for r in range(4, 8) for c in range(4, 8)]
    q, k, v, ent, hist = structured(h=8, w=8, rows=(r1, r2))
    cfg = dict(preset("flux-dev").resolved(57).settings(), block_offset=0)
    cfg.update(start_aggregating_from=0, start_intervention_from=0, blocks_per_step=1)
    out, hout = call(q, k, v, ent, hist, 0, [8, 8], cfg)
    plain = np_out(np_logits(q[0], k[0]), v[0])
    assert np.abs(out[0].numpy() - plain).max() > 1e-3
    assert torch.isfinite(out).all() and torch.isfinite(hout).all()


def test_dtype_and_fake_impl():
    q, k, v, ent, hist = structured()
    out, hout = run(q.bfloat16(), k.bfloat16(), v.bfloat16(), ent, hist, 3, H0, W0)
    assert out.dtype == torch.bfloat16 and hout.dtype == torch.float32
    settings, attrs = split(attrs_for(do_image_text_weakening=1))
    args = (q, k, v, ent, hist, torch.tensor(3), torch.tensor([H0, W0]), *settings,
            *(attrs[n] for n in ref.op_schema.ATTRIBUTE_NAMES))
    torch.library.opcheck(torch.ops.deleaker.attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_inputs_are_clear():
    q, k, v, ent, hist = structured()
    with pytest.raises(ValueError, match="grid 3x5"):
        run(q, k, v, ent, hist, 0, 3, 5)
    with pytest.raises(ValueError, match="history must be"):
        run(q, k, v, ent, hist[:, :1], 0, 4, 4)
    (w, kn, ru), attrs = split(attrs_for())
    with pytest.raises(ValueError, match=r"knobs must be \[B, 3\]"):
        ref.call_op(q, k, v, ent, hist, torch.tensor(0), torch.tensor([4, 4]), w, kn[:, :2], ru, attrs)


def test_per_sample_settings_equal_each_sample_alone():
    """Contract v2: one batch mixes windows, knobs and rule switches; each sample gets its own result."""
    q, k, v, ent, hist = structured(B=3, seed=4)
    ent[2] = 0  # the third sample has no active slot: plain attention
    per = [attrs_for(do_image_text_weakening=1, do_image_text_strengthening=1, do_image_image=1),
           attrs_for(do_image_text_strengthening=1, k_strength=2.0, start_intervention_from=5),  # not yet at tau 3
           attrs_for(do_image_text_weakening=1)]
    windows, knobs, rules = ref.settings_tensors([{n: a[n] for n in ref.op_schema.SETTING_NAMES} for a in per])
    attrs = {n: per[0][n] for n in ref.op_schema.ATTRIBUTE_NAMES}
    out, hout = ref.call_op(q, k, v, ent, hist, torch.tensor(3), torch.tensor([H0, W0]), windows, knobs, rules, attrs)
    for b, a in enumerate(per):
        o, ho = run(q[b:b + 1], k[b:b + 1], v[b:b + 1], ent[b:b + 1], hist[b:b + 1], 3, H0, W0,
                    **{n: a[n] for n in a if n not in ("block_offset", "blocks_per_step")})
        torch.testing.assert_close(out[b:b + 1], o, rtol=0, atol=0)
        torch.testing.assert_close(hout[b:b + 1], ho, rtol=0, atol=0)
    plain = [torch.from_numpy(np_out(np_logits(q[b], k[b]), v[b])).float() for b in (1, 2)]
    torch.testing.assert_close(out[1], plain[0], rtol=0, atol=ATOL)  # outside its window: plain
    torch.testing.assert_close(out[2], plain[1], rtol=0, atol=ATOL)  # no entity: plain
    assert (out[0] - torch.from_numpy(np_out(np_logits(q[0], k[0]), v[0])).float()).abs().max() > 1e-2


# ---------------- config ----------------

def test_config_presets_and_derived_windows():
    dev = preset("flux-dev").resolved(57)
    assert (dev.stop_aggregating_at, dev.stop_intervention_at) == (12 * 57, 20 * 57)
    schnell = preset("flux-schnell").resolved(57)
    assert schnell.stop_intervention_at == 4 * 57 and schnell.stop_aggregating_at == 2 * 57
    explicit = DeLeakerConfig(stop_aggregating_at=100, stop_intervention_at=200).resolved(57)
    assert (explicit.stop_aggregating_at, explicit.stop_intervention_at) == (100, 200)
    assert dev.settings()["stop_intervention_at"] == 20 * 57
    # short runs on small models: derived stops are clamped to their starts, never an error
    short = preset("flux-dev", num_steps=2).resolved(4)
    assert short.stop_aggregating_at == 13 and short.stop_intervention_at == 18
    assert not short.intervenes_within(2) and preset("flux-dev").resolved(4).intervenes_within(20)


@pytest.mark.parametrize("over, msg", [
    (dict(k_strength=0.0), "k_strength"),
    (dict(k_strength=-1.0), "k_strength"),
    (dict(std_mul_text=-0.5), "std_mul_text"),
    (dict(std_mul_image_image=-1.0), "std_mul_image_image"),
    (dict(start_intervention_from=5), "start_intervention_from"),
    (dict(stop_intervention_at=10), "stop_intervention_at"),
    (dict(stop_aggregating_at=12), "stop_aggregating_at"),
    (dict(num_steps=0), "num_steps"),
])
def test_config_validation(over, msg):
    with pytest.raises(ConfigError, match=msg):
        DeLeakerConfig(**over).resolved(57)


def test_unknown_preset_and_setting():
    with pytest.raises(ConfigError, match="unknown DeLeaker preset 'nope'"):
        preset("nope")
    with pytest.raises(ConfigError, match="unknown DeLeaker setting"):
        preset("flux-dev", alpha=2)


def test_configs_are_built_from_the_op_schema():
    """Both configs carry exactly op_schema.SETTINGS (names, order, schema defaults), plus their own
    non-op fields; a setting added to the schema appears in both."""
    import dataclasses

    from deleaker.runtime import op_schema
    from deleaker.runtime.config import ResolvedConfig

    fields = dataclasses.fields(DeLeakerConfig)
    assert tuple(f.name for f in fields) == op_schema.SETTING_NAMES + ("num_steps",)
    assert {f.name: f.default for f in fields[:-1]} == {s.name: s.default for s in op_schema.SETTINGS}
    assert tuple(f.name for f in dataclasses.fields(ResolvedConfig)) == \
        op_schema.SETTING_NAMES + ("num_steps", "blocks_per_step")
    r = preset("flux-dev").resolved(57)
    assert r.settings() == {s.name: getattr(r, s.name) for s in op_schema.SETTINGS}
    assert type(r.k_strength) is float and type(r.stop_intervention_at) is int
