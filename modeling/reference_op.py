"""The PyTorch reference DeLeakerAttention op: the oracle every other implementation is tested on.

Plain, materialised, readable: it builds the full (T+I) x (T+I) logits per head in float32 and
follows docs/semantics.md line by line, one sample at a time (every
statistic is per sample, section 7). Speed is not a goal here; exactness is.

Registered as torch.ops.deleaker.attention (schema in deleaker.runtime.op_schema) with a fake
implementation, so it traces into torch.export / ONNX as one node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deleaker.runtime import op_schema

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# Small pieces, each one rule of the semantics doc
# --------------------------------------------------------------------------------------------

def tau_of(step: int, block_offset: int, blocks_per_step: int) -> int:
    """Block-step clock (section 1)."""
    return step * blocks_per_step + block_offset


def update_history(hist: torch.Tensor, p: torch.Tensor, tau: int, a0: int, a1: int) -> torch.Tensor:
    """Section 3: equal-weight cumulative mean over tau = a0..a1-1, frozen outside. hist, p: [E, I]."""
    if tau < a0 or tau >= a1:
        return hist.clone()
    if tau == a0:
        return p.clone()
    n = tau - a0
    return hist * (n / (n + 1)) + p / (n + 1)


def entity_masks(a: torch.Tensor, beta1: float) -> torch.Tensor:
    """Section 4.1: a [E, I] -> boolean masks [E, I], threshold mean + beta1 * unbiased std."""
    if a.shape[-1] < 2:  # one image token: the unbiased std is NaN and nothing compares greater
        return torch.zeros_like(a, dtype=torch.bool)
    theta = a.mean(dim=-1, keepdim=True) + beta1 * a.std(dim=-1, unbiased=True, keepdim=True)
    return a > theta


def _morph(m: torch.Tensor, grow: bool) -> torch.Tensor:
    """One 3x3 dilation (grow) or erosion on [E, h, w] booleans.

    Border rule: outside the grid counts as 0 for a dilation and 1 for an erosion.
    """
    pad_value = 0.0 if grow else 1.0
    x = F.pad(m.float(), (1, 1, 1, 1), value=pad_value)  # [E, h+2, w+2]
    h, w = m.shape[-2:]
    windows = torch.stack([x[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])  # [9, E, h, w]
    out = windows.amax(dim=0) if grow else windows.amin(dim=0)
    return out > 0.5


def smooth_masks(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Open once (erode, dilate), then close with two iterations (dilate x2, erode x2)."""
    m = masks.reshape(-1, h, w)
    m = _morph(m, grow=False)
    m = _morph(m, grow=True)
    m = _morph(_morph(m, grow=True), grow=True)
    m = _morph(_morph(m, grow=False), grow=False)
    return m.reshape(masks.shape)


def _cut_image_image(L: torch.Tensor, G: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                     beta2: float, T: int) -> None:
    """Rule X for one ordered region rows x cols, in place on logits L [H, N, N]; G [I, I]."""
    I = G.shape[0]
    region = rows[:, None] & cols[None, :]  # [I, I]
    vals = G[region]
    vals = vals[vals != 0]
    if vals.numel() < 2:
        # None: skip. One value: its unbiased std is NaN, so nothing would compare greater.
        return
    thr = vals.mean() + beta2 * vals.std(unbiased=True)
    cut = region & (G > thr)  # [I, I]
    L[:, T:T + I, T:T + I].masked_fill_(cut, _NEG_INF)


def _intervene(L: torch.Tensor, P: torch.Tensor, masks: torch.Tensor, first_tokens: list[int],
               token_sets: list[torch.Tensor], T: int, settings: dict) -> torch.Tensor:
    """Section 4.2: the pair loop on one sample, canonical order. L, P [H, N, N]; masks [E_active, I].
    Returns final P."""
    alpha = settings["k_strength"]
    E, I = masks.shape
    for e1 in range(E):
        for e2 in range(e1 + 1, E):
            r1, r2 = masks[e1], masks[e2]  # image rows in each mask, [I]
            img = L[:, T:T + I, :]  # view of image-query rows, [H, I, N]
            t1, t2 = token_sets[e1], token_sets[e2]
            if settings["do_image_text_weakening"]:
                img[:, r1[:, None] & t2[None, :]] = _NEG_INF
                img[:, r2[:, None] & t1[None, :]] = _NEG_INF
            if settings["do_image_text_strengthening"]:
                sel1 = r1[:, None] & t1[None, :]
                img[:, sel1] = img[:, sel1] * alpha
                sel2 = r2[:, None] & t2[None, :]
                img[:, sel2] = img[:, sel2] * alpha
            if settings["do_text_text_weakening"]:
                f1, f2 = first_tokens[e1], first_tokens[e2]
                L[:, f1, f2] = _NEG_INF
                L[:, f2, f1] = _NEG_INF
            if settings["do_image_image"]:
                G = P[:, T:T + I, T:T + I].mean(dim=0)  # head-mean of the current probabilities, [I, I]
                _cut_image_image(L, G, r1, r2, settings["std_mul_image_image"], T)
                _cut_image_image(L, G, r2, r1, settings["std_mul_image_image"], T)
            P = torch.softmax(L, dim=-1)
    return P


def _one_sample(q, k, v, ent, hist, step: int, h: int, w: int, block_offset: int, blocks_per_step: int,
                settings: dict):
    """q, k, v [H, N, D] float32 in the canonical order (text, image, excluded); ent [E, T];
    hist [E, I] float32; settings: this sample's op_schema.SETTINGS values. Returns (out [H, N, D], hist_out)."""
    T = ent.shape[-1]
    I = h * w
    tau = tau_of(step, block_offset, blocks_per_step)
    a0, a1 = settings["start_aggregating_from"], settings["stop_aggregating_at"]
    i0, i1 = settings["start_intervention_from"], settings["stop_intervention_at"]

    L = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # logits [H, N, N]
    P = torch.softmax(L, dim=-1)
    hist_out = hist.clone()
    if tau < a0:
        return P @ v, hist_out

    token_sets = ent > 0  # [E, T] bool
    active = token_sets.any(dim=-1).nonzero().flatten().tolist()
    if not active:
        return P @ v, hist_out

    # p_e[i]: mean over heads and the entity's tokens of image->entity probabilities, [E_act, I]
    img_text = P[:, T:T + I, :T]  # [H, I, T]
    p = torch.stack([img_text[:, :, token_sets[e]].mean(dim=-1).mean(dim=0) for e in active])
    if settings["use_history"]:
        hist_out[active] = update_history(hist[active], p, tau, a0, a1)

    if not (i0 <= tau <= i1) or len(active) < 2:
        return P @ v, hist_out

    source = hist_out[active] if (settings["use_history"] and tau > a0) else p
    masks = entity_masks(source, settings["std_mul_text"])  # [E_act, I]
    if settings["do_smoothing"]:
        masks = smooth_masks(masks, h, w)
    # entity columns widened to the joint sequence, [N] bool each
    sets = [F.pad(token_sets[e], (0, q.shape[-2] - T), value=False) for e in active]
    firsts = [int(token_sets[e].nonzero()[0]) for e in active]
    P = _intervene(L, P, masks, firsts, sets, T, settings)
    return P @ v, hist_out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, entity_tokens, history, h: int, w: int, layout: int) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [B, H, T+I, D] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, _, N, _ = q.shape
    if entity_tokens.dim() != 3 or entity_tokens.shape[0] != B:
        raise ValueError(f"entity_tokens must be [B={B}, E, T]; got {tuple(entity_tokens.shape)}")
    E, T = entity_tokens.shape[1:]
    if "excluded" in op_schema.LAYOUTS[layout]:
        I = h * w
        op_schema.segment_lengths(layout, T, I, N)  # raises when T + I exceeds N
    else:
        I = N - T
        if I <= 0:
            raise ValueError(f"text length T={T} leaves no image tokens in a sequence of {N}")
        if h * w != I:
            raise ValueError(f"grid {h}x{w} does not match the {I} image tokens")
    if tuple(history.shape) != (B, E, I):
        raise ValueError(f"history must be [B, E, I] = [{B}, {E}, {I}]; got {tuple(history.shape)}")


def _check_settings(windows, knobs, rules, B: int) -> None:
    for name, t in (("windows", windows), ("knobs", knobs), ("rules", rules)):
        want = (B, op_schema.settings_width(name))
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must be [B, {want[1]}] = {list(want)}; got {tuple(t.shape)}")


def deleaker_attention_ref(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules, *,
                           block_offset: int, blocks_per_step: int, layout: int = op_schema.DEFAULT_LAYOUT):
    """Reference DeLeaker attention. Inputs and attributes: deleaker.runtime.op_schema (contract v2).

    q, k, v are in the model's token order (`layout`); the math runs in the canonical order
    (text, image, excluded) and the output rows go back to the model's order.
    Returns (out [B, H, N, D] in q's dtype, history_out [B, E, I] float32).
    """
    step = int(step)
    h, w = (int(x) for x in grid)
    layout = int(layout)
    if not 0 <= layout < len(op_schema.LAYOUTS):
        raise ValueError(f"layout must be 0..{len(op_schema.LAYOUTS) - 1} ({', '.join(op_schema.LAYOUT_NAMES)}), "
                         f"got {layout}")
    _check_inputs(q, k, v, entity_tokens, history, h, w, layout)
    _check_settings(windows, knobs, rules, q.shape[0])
    N, T = q.shape[-2], entity_tokens.shape[-1]
    order = op_schema.canonical_order(layout, T, h * w, N)
    # identity for text_image (FLUX.1): no gather at all, so that layout computes exactly as before
    perm = None if order == list(range(N)) else torch.tensor(order, device=q.device)
    outs, hists = [], []
    for b in range(q.shape[0]):
        settings = op_schema.unpack_settings(windows.cpu(), knobs.cpu(), rules.cpu(), b)
        qb, kb, vb = (x[b].float() if perm is None else x[b].float()[:, perm] for x in (q, k, v))
        o, hb = _one_sample(qb, kb, vb, entity_tokens[b].float(), history[b].float(), step, h, w,
                            int(block_offset), int(blocks_per_step), settings)
        if perm is not None:  # canonical rows back to the model's positions
            o = torch.empty_like(o).index_copy_(1, perm, o)
        outs.append(o)
        hists.append(hb)
    # in q's layout (q is often a transposed view), as the fake implementation and the fused kernel
    # promise: compiled graphs read the output with the fake's strides
    return torch.empty_like(q).copy_(torch.stack(outs)), torch.stack(hists)


@torch.library.custom_op(op_schema.TORCH_OP, mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, entity_tokens: torch.Tensor,
              history: torch.Tensor, step: torch.Tensor, grid: torch.Tensor, windows: torch.Tensor,
              knobs: torch.Tensor, rules: torch.Tensor, block_offset: int,
              blocks_per_step: int, layout: int = op_schema.DEFAULT_LAYOUT) -> tuple[torch.Tensor, torch.Tensor]:
    # layout defaults to text_image: callers from before layouts (FLUX.1) pass two attributes
    return deleaker_attention_ref(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules,
                                  block_offset=block_offset, blocks_per_step=blocks_per_step, layout=layout)


@attention.register_fake
def _(q, k, v, entity_tokens, history, step, grid, windows, knobs, rules, block_offset, blocks_per_step,
      layout=op_schema.DEFAULT_LAYOUT):
    return torch.empty_like(q), torch.empty_like(history, dtype=torch.float32)


def call_op(*args):
    """Call torch.ops.deleaker.attention in the attention_ops convention: the op's inputs
    (op_schema.INPUTS order), then the node attributes as one dict (op_schema.ATTRIBUTES)."""
    inputs, attrs = op_schema.split_call(args)
    return torch.ops.deleaker.attention(*inputs, *op_schema.attribute_values(attrs))


def settings_tensors(configs, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(windows, knobs, rules) tensors for one ResolvedConfig (or settings dict) per sample."""
    packed = op_schema.pack_settings(configs)
    return tuple(torch.from_numpy(packed[n]).to(device) for n in op_schema.SETTINGS_TENSORS)
