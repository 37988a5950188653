#!/usr/bin/env python3
"""GPU check of the fused DeLeaker CUDA op, in one run (called by scripts/gpu_check.sh).

Sections (each isolated: a failure is recorded and the next section still runs):
  lse      the SDPA backends' log-sum-exp convention vs torch.logsumexp of the scores
  cases    fused op vs the reference op (fp32, materialised) on structured random inputs:
           history and masks first (discrete: flips are counted and reported, not hidden), then
           the cut set, then the output, whose error vs fp32 must be within 2x of the error of a
           same-precision naive implementation (the reference code run in bf16/fp16).
           Outputs are NaN-poisoned before each fused run (own plain pass) and must be all written.
  timing   op vs cuDNN SDPA at T+I = 4608 (B=1, 24x128, bf16, 2 entities ~30% of the image),
           inside and outside the window, several plain/edit variants, CUDA-graph replay.
  profile  per-kernel time breakdown of the fused op (torch.profiler, CUDA activity): 4608 E=2
           inside the window, E=3 inside, after the window; mean microseconds per op call.
  flux     FLUX.1-dev-sized random-weight transformer step: vanilla vs reference vs fused
           DeLeaker at 512 and 1024 (needs diffusers and export/flux.py), peak memory.
Writes <out>/results.json and <out>/results.md; prints a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
T0 = time.time()
# epoch seconds by which the script must be done (set by gpu_check.sh from the device call's limit)
DEADLINE = float(os.environ.get("DL_DEADLINE", "inf"))


def left() -> float:
    return DEADLINE - time.time()
DEVICE = "cuda"  # the CPU dry run of this script (plumbing only) sets "cpu"
RESULTS: dict = {"env": {}, "lse": [], "cases": [], "timing": [], "profile": [], "flux": [], "errors": []}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def base_attrs(**over):
    from deleaker.runtime.config import DeLeakerConfig

    a = DeLeakerConfig().resolved(57).op_attributes(0)  # a0=12, a1=684, i0=18, i1=1140
    a.update(over)
    return a


def region(h, w, kind, shift=0, device=None):
    """Boolean [h, w] entity region (fractions of the grid so it scales)."""
    device = device or DEVICE
    y = torch.arange(h, device=device).float()[:, None] + 0.5 - shift
    x = torch.arange(w, device=device).float()[None, :] + 0.5
    if kind == 0:
        return ((y - 0.30 * h) / (0.22 * h)) ** 2 + ((x - 0.28 * w) / (0.20 * w)) ** 2 <= 1
    if kind == 1:
        return ((y - 0.68 * h) / (0.22 * h)) ** 2 + ((x - 0.70 * w) / (0.21 * w)) ** 2 <= 1
    if kind == 2:  # overlaps region 1 on purpose: rows in two masks
        return (y >= 0.55 * h) & (y < 0.80 * h) & (x >= 0.05 * w) & (x < 0.60 * w)
    if kind == 3:
        return (y >= 0.05 * h) & (y < 0.30 * h) & (x >= 0.62 * w) & (x < 0.95 * w)
    raise ValueError(kind)


TOKENS = {0: [5, 6, 7], 1: [20, 21], 2: [40, 41, 42, 43], 3: [60]}


def make_inputs(B, H, D, T, h, w, E, spec, seed, dtype, layout="bhnd", strength=8.2):
    """q, k, v with planted entities: image rows of entity e get direction u_e added to q, the
    entity's tokens get u_e added to k (logit boost ~ strength^2/sqrt(D) ~ 6), so p_e is clearly
    bimodal and threshold flips from rounding are rare. spec[b] = list of (slot, kind).
    history: a planted bimodal map per active slot, its region shifted 2 rows from the q region
    (so masks taken from the history differ from masks taken from p)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    I = h * w
    N = T + I
    q = torch.randn(B, H, N, D, generator=g, device=DEVICE)
    k = torch.randn(B, H, N, D, generator=g, device=DEVICE)
    v = torch.randn(B, H, N, D, generator=g, device=DEVICE)
    dirs = torch.linalg.qr(torch.randn(D, 8, generator=g, device=DEVICE))[0].T  # [8, D] orthonormal
    ent = torch.zeros(B, E, T, device=DEVICE)
    hist = 0.001 * torch.rand(B, E, I, generator=g, device=DEVICE)
    for b, items in enumerate(spec):
        for slot, kind in items:
            toks = TOKENS[kind]
            ent[b, slot, toks] = 1.0
            k[b, :, toks, :] += strength * dirs[kind]
            reg = region(h, w, kind).flatten()
            # a few isolated "salt" rows outside the region: the opening must remove them
            salt = torch.randint(0, I, (4,), generator=g, device=DEVICE)
            reg_q = reg.clone()
            reg_q[salt] = True
            rows = reg_q.nonzero().flatten()
            q[b, :, T + rows, :] += strength * dirs[kind]
            hist[b, slot] += 0.05 * region(h, w, kind, shift=2).flatten().float()
    if layout == "bnhd":  # FLUX layout: [B, N, H, D] memory viewed as [B, H, N, D]
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    return q.to(dtype), k.to(dtype), v.to(dtype), ent, hist


# ------------------------------------------------------------------------------------------
# reference runs, with the discrete intermediates recorded
# ------------------------------------------------------------------------------------------

class Recorder:
    """Patches the reference module's rule functions to record masks and cut sets."""

    def __init__(self):
        from deleaker.export import reference_op as R

        self.R = R
        self.sources, self.raw, self.smoothed, self.cuts, self.thr = [], [], [], [], []

    def __enter__(self):
        R = self.R
        self._orig = (R.entity_masks, R.smooth_masks, R._cut_image_image)
        em, sm, cu = self._orig

        def entity_masks(a, beta1):
            m = em(a, beta1)
            self.sources.append(a.detach().float().clone())
            self.raw.append(m.clone())
            return m

        def smooth_masks(masks, h, w):
            m = sm(masks, h, w)
            self.smoothed.append(m.clone())
            return m

        def cut_image_image(L, G, rows, cols, beta2, T):
            region_ = rows[:, None] & cols[None, :]
            vals = G[region_]
            vals = vals[vals != 0]
            if vals.numel() >= 2:
                thr = vals.mean() + beta2 * vals.std(unbiased=True)
                self.cuts.append(region_ & (G > thr))
                self.thr.append(float(thr))
            return cu(L, G, rows, cols, beta2, T)

        R.entity_masks, R.smooth_masks, R._cut_image_image = entity_masks, smooth_masks, cut_image_image
        return self

    def __exit__(self, *exc):
        self.R.entity_masks, self.R.smooth_masks, self.R._cut_image_image = self._orig


def run_reference(q, k, v, ent, hist, step, grid, attrs, upcast=True, record=True):
    """The reference op's per-sample code; upcast=False runs it in the inputs' precision (the
    same-precision naive implementation). Returns out [B,H,N,D], hist_out, per-sample records."""
    from deleaker.export import reference_op as R

    h, w = (int(x) for x in grid)
    outs, hists, recs = [], [], []
    for b in range(q.shape[0]):
        conv = (lambda x: x.float()) if upcast else (lambda x: x)
        ctx = Recorder() if record else contextlib.nullcontext()
        upd = R.update_history
        if not upcast:  # tau == a0 returns p itself: keep the float32 history tensor's dtype
            R.update_history = lambda *a_, **k_: upd(*a_, **k_).float()
        try:
            with ctx as rec:
                o, hb = R._one_sample(conv(q[b]), conv(k[b]), conv(v[b]), ent[b].float(), hist[b].float(),
                                      int(step), h, w, attrs)
        finally:
            R.update_history = upd
        outs.append(o)
        hists.append(hb.float())
        if record:
            masks = (rec.smoothed[-1] if rec.smoothed else rec.raw[-1]) if rec.raw else None
            cut = None
            if rec.cuts:
                cut = torch.zeros_like(rec.cuts[0])
                for c in rec.cuts:
                    cut |= c
            recs.append(dict(masks=masks, cut=cut, n_regions=len(rec.cuts)))
    return torch.stack(outs), torch.stack(hists), recs


def err(x, ref):
    d = x.float() - ref.float()
    return dict(rel=float(d.norm() / ref.float().norm().clamp_min(1e-30)), max=float(d.abs().max()))


# ------------------------------------------------------------------------------------------
# sections
# ------------------------------------------------------------------------------------------

def section_env():
    p = torch.cuda.get_device_properties(0)
    RESULTS["env"] = dict(gpu=p.name, sms=p.multi_processor_count, torch=torch.__version__,
                          cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                          mem_gib=round(p.total_memory / 2**30, 1))
    log("env", RESULTS["env"])


def section_lse():
    """Does each SDPA backend return natural-log LSE of the scaled scores, shape [B, H, N(, 1)]?"""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 384, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    scale = 1 / math.sqrt(128)
    ref = torch.logsumexp((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)  # [1, 4, 384]
    calls = {
        "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale),
        "cudnn": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False,
                                                                             scale=scale),
        "efficient": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False,
                                                                                     scale=scale),
    }
    for name, fn in calls.items():
        try:
            r = fn()
            lse = r[1]
            shape = list(lse.shape)
            l3 = lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, :384]
            row = dict(backend=name, shape=shape, strides=list(lse.stride()),
                       max_err_natural=float((l3 - ref).abs().max()),
                       max_err_log2=float((l3 - ref / math.log(2)).abs().max()))
        except Exception as e:  # noqa: BLE001
            row = dict(backend=name, error=f"{type(e).__name__}: {e}"[:300])
        RESULTS["lse"].append(row)
        log("lse", row)


CASES = []


def case(name, **kw):
    CASES.append(dict(name=name, **kw))


def define_cases(quick=False):
    A = dict(B=1, H=24, D=128, T=512)
    inside_h = dict(step=5, block_offset=3)  # tau 288: history updating, intervening (masks from history)
    two = [[(0, 0), (1, 1)]]
    three = [[(0, 0), (1, 1), (2, 2)]]
    case("1536 E2 hist-off inside", **A, h=32, w=32, E=2, spec=two, attrs=dict(use_history=0), **inside_h)
    case("1536 E2 hist-on inside", **A, h=32, w=32, E=2, spec=two, attrs={}, **inside_h)
    case("1536 E2 hist-on tau==a0==i0 (masks from p)", **A, h=32, w=32, E=2, spec=two,
         attrs=dict(start_intervention_from=12), step=0, block_offset=12)
    case("1536 E1 inside (plain + history)", **A, h=32, w=32, E=1, spec=[[(0, 0)]], attrs={}, **inside_h)
    case("1536 E3 hist-off inside", **A, h=32, w=32, E=3, spec=three, attrs=dict(use_history=0), **inside_h)
    case("1536 E2 before (tau<a0)", **A, h=32, w=32, E=2, spec=two, attrs={}, step=0, block_offset=5)
    case("1536 E2 history only (a0<=tau<i0)", **A, h=32, w=32, E=2, spec=two, attrs={}, step=0, block_offset=15)
    case("1536 E2 after (tau>i1, frozen)", **A, h=32, w=32, E=2, spec=two, attrs={}, step=20, block_offset=10)
    case("1536 E2 TT on, no smoothing", **A, h=32, w=32, E=2, spec=two,
         attrs=dict(do_text_text_weakening=1, do_smoothing=0), **inside_h)
    case("1536 E2 fp16", **A, h=32, w=32, E=2, spec=two, attrs=dict(use_history=0), dtype="fp16", **inside_h)
    case("1536 E2 FLUX layout [B,N,H,D]", **A, h=32, w=32, E=2, spec=two, attrs={}, layout="bnhd", **inside_h)
    case("4608 E2 hist-off inside", **A, h=64, w=64, E=2, spec=two, attrs=dict(use_history=0), **inside_h)
    case("4608 E2 hist-on inside", **A, h=64, w=64, E=2, spec=two, attrs={}, **inside_h)
    case("4608 E3 hist-off inside (overlapping masks)", **A, h=64, w=64, E=3, spec=three,
         attrs=dict(use_history=0), **inside_h)
    case("4608 E2 after", **A, h=64, w=64, E=2, spec=two, attrs={}, step=20, block_offset=10)
    case("3584 non-square 48x64 E2 hist-on", **A, h=48, w=64, E=2, spec=two, attrs={}, **inside_h)
    case("B=2 E4 slots (one empty) mixed", B=2, H=24, D=128, T=512, h=32, w=32, E=4,
         spec=[[(0, 0), (2, 1), (3, 3)], [(1, 1), (3, 0)]], attrs=dict(use_history=0), **inside_h)
    case("1536 E2 D=64 H=8", B=1, H=8, D=64, T=512, h=32, w=32, E=2, spec=two, attrs=dict(use_history=0),
         **inside_h)
    if quick:
        del CASES[6:]


VARIANTS = [("cudnn", "delta"), ("own", "delta"), ("own", "full"), ("flash", "delta")]
# implementation switches (export/cuda_op.IMPL_SWITCHES; default all on): the v6 ones off, and all off (v4)
V6_OFF = {"x_split": False, "fixed_gather": False}
V4_PATHS = {"row_order": False, "keep_g": False, "x_split": False, "fixed_gather": False}


def run_case(c):
    from deleaker.export import cuda_op

    dtype = torch.float16 if c.get("dtype") == "fp16" else torch.bfloat16
    q, k, v, ent, hist = make_inputs(c["B"], c["H"], c["D"], c["T"], c["h"], c["w"], c["E"], c["spec"],
                                     seed=zlib.crc32(c["name"].encode()) % 100000, dtype=dtype, layout=c.get("layout", "bhnd"))
    attrs = base_attrs(block_offset=c["block_offset"], **c["attrs"])
    step = torch.tensor(c["step"], device=DEVICE)  # on the device: read there
    grid = torch.tensor([c["h"], c["w"]], device=DEVICE)
    T, I = c["T"], c["h"] * c["w"]
    ref, ref_hist, recs = run_reference(q, k, v, ent, hist, c["step"], (c["h"], c["w"]), attrs, upcast=True)
    naive, naive_hist, _ = run_reference(q, k, v, ent, hist, c["step"], (c["h"], c["w"]), attrs, upcast=False,
                                         record=False)
    # the registered reference op (the oracle's public entry) agrees with the recorded run
    from deleaker.export.reference_op import call_op

    op_out, op_hist = call_op(q.float(), k.float(), v.float(), ent, hist, torch.tensor(c["step"]),
                              torch.tensor([c["h"], c["w"]]), attrs)
    oracle_same = float((op_out - ref).abs().max()) == 0.0 and torch.equal(op_hist, ref_hist)
    e_naive = err(naive, ref)
    row = dict(name=c["name"], N=T + I, E=c["E"], oracle_same=oracle_same, naive=e_naive, variants=[])
    d_on = None
    for plain, edit in VARIANTS:
        v_row = dict(plain=plain, edit=edit)
        try:
            d = cuda_op.debug_run(q, k, v, ent, hist, step, grid, plain=plain, edit=edit, **attrs)
            out, hout = d["out"], d["history_out"]
            if (plain, edit) == ("cudnn", "delta"):
                d_on = d  # compared with the v6-switches-off run below
            v_row["nan_out"] = int(torch.isnan(out).sum())
            v_row["nan_hist"] = int(torch.isnan(hout).sum())
            dh = (hout - ref_hist).abs()
            v_row["hist_max_err"] = float(dh.max())
            v_row["hist_ok"] = bool((dh <= 1e-7 + 1e-4 * ref_hist.abs()).all())
            flips, cut_diff, cut_ref, edited_rows = 0, 0, 0, []
            for b in range(c["B"]):
                info = d["info"][b]
                rec = recs[b]
                active = (ent[b] > 0).any(-1).nonzero().flatten()
                if rec["masks"] is not None:
                    fm = d["masks"][b, active]
                    flips += int((fm != rec["masks"]).sum())
                    if info["intervene"]:
                        edited_rows.append((b, d["rows"][b, : info["n_rows"]]))
                elif info["intervene"]:
                    flips += -1000000  # fused intervened where the reference did not
                rc = rec["cut"] if rec["cut"] is not None else torch.zeros(I, I, dtype=torch.bool, device=DEVICE)
                cut_diff += int((d["cut"][b] != rc).sum())
                cut_ref += int(rc.sum())
            v_row.update(mask_flips=flips, cut_ref=cut_ref, cut_diff=cut_diff, info=d["info"])
            e_f = err(out, ref)
            v_row["err"] = e_f
            v_row["ratio_rel"] = e_f["rel"] / max(e_naive["rel"], 1e-30)
            v_row["ratio_max"] = e_f["max"] / max(e_naive["max"], 1e-30)
            if edited_rows:
                sel_f, sel_r, sel_n = [], [], []
                for b, rows in edited_rows:
                    jr = T + rows
                    sel_f.append(out[b][:, jr])
                    sel_r.append(ref[b][:, jr])
                    sel_n.append(naive[b][:, jr])
                if sum(x.numel() for x in sel_r):
                    ef = err(torch.cat([x.flatten() for x in sel_f]), torch.cat([x.flatten() for x in sel_r]))
                    en = err(torch.cat([x.flatten() for x in sel_n]), torch.cat([x.flatten() for x in sel_r]))
                    v_row["edited_rows_err"] = ef
                    v_row["edited_rows_naive"] = en
            v_row["ok"] = bool(v_row["nan_out"] == 0 and v_row["nan_hist"] == 0 and v_row["hist_ok"]
                               and flips == 0 and v_row["ratio_rel"] <= 2.0 and v_row["ratio_max"] <= 2.0)
        except Exception as e:  # noqa: BLE001
            v_row["error"] = f"{type(e).__name__}: {e}"[:500]
            v_row["ok"] = False
            traceback.print_exc()
        row["variants"].append(v_row)
        info0 = v_row.get("info", [{}])[0]
        log(f"  {c['name']:<44} {plain:>6}/{edit:<5} ok={v_row['ok']} rel={v_row.get('err', {}).get('rel', float('nan')):.2e}"
            f" naive={e_naive['rel']:.2e} max={v_row.get('err', {}).get('max', float('nan')):.2e}"
            f" naive_max={e_naive['max']:.2e} flips={v_row.get('mask_flips')} cut {v_row.get('cut_diff')}/{v_row.get('cut_ref')}"
            f" rows={info0.get('n_rows')} fb={info0.get('n_fallback')} nan={v_row.get('nan_out')}"
            + (f" ERR {v_row['error']}" if "error" in v_row else ""))
    # same case, cudnn/delta, v6 switches off: tells a failure of the new paths (v6) from one of
    # the rest (if only the default rows fail, switch x_split / fixed_gather off)
    try:
        d0 = cuda_op.debug_run(q, k, v, ent, hist, step, grid, plain="cudnn", edit="delta", impl=V6_OFF, **attrs)
        d1 = d_on if d_on is not None else cuda_op.debug_run(q, k, v, ent, hist, step, grid, plain="cudnn",
                                                             edit="delta", **attrs)
        e0 = err(d0["out"], ref)
        row["v6_off"] = dict(rel=e0["rel"], ratio_rel=e0["rel"] / max(e_naive["rel"], 1e-30),
                             ratio_max=e0["max"] / max(e_naive["max"], 1e-30),
                             max_diff_vs_on=float((d0["out"].float() - d1["out"].float()).abs().max()),
                             cut_diff_vs_on=int((d0["cut"] != d1["cut"]).sum()),
                             hist_same=bool(torch.equal(d0["history_out"], d1["history_out"])))
        log(f"  {c['name']:<44} v6 off: rel={e0['rel']:.2e} ratio={row['v6_off']['ratio_rel']:.2f}"
            f" max|on-off|={row['v6_off']['max_diff_vs_on']:.2e} cut diff on/off={row['v6_off']['cut_diff_vs_on']}")
        del d0, d1, d_on
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        row["v6_off"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    del q, k, v, ref, naive
    torch.cuda.empty_cache()
    return row


def section_cases(quick):
    define_cases(quick)
    for c in CASES:
        if left() < 60:
            RESULTS["cases"].append(dict(name=c["name"], error="skipped: out of time"))
            continue
        try:
            RESULTS["cases"].append(run_case(c))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["cases"].append(dict(name=c["name"], error=f"{type(e).__name__}: {e}"[:500]))
        write_results()


def bench(fn, warmup=5, iters=30):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        evs.append((s, e))
    torch.cuda.synchronize()
    ts = sorted(s.elapsed_time(e) for s, e in evs)
    return dict(median_ms=ts[len(ts) // 2], p10_ms=ts[len(ts) // 10], p90_ms=ts[(9 * len(ts)) // 10], n=len(ts))


def section_timing():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deleaker.export import cuda_op

    B, H, D, T, h, w = 1, 24, 128, 512, 64, 64
    N = T + h * w
    flops = 4 * B * H * N * N * D
    q, k, v, ent, hist = make_inputs(B, H, D, T, h, w, 2, [[(0, 0), (1, 1)]], seed=7, dtype=torch.bfloat16)
    q3, k3, v3, ent3, hist3 = make_inputs(B, H, D, T, h, w, 3, [[(0, 0), (1, 1), (2, 2)]], seed=8,
                                          dtype=torch.bfloat16)
    grid = torch.tensor([h, w], device=DEVICE)
    inside = torch.tensor(5, device=DEVICE)
    after = torch.tensor(20, device=DEVICE)
    attrs_in = base_attrs(block_offset=3)
    cover = (region(h, w, 0) | region(h, w, 1)).float().mean().item()
    rows = []

    def add(name, fn, **kw):
        try:
            r = bench(fn, **kw)
            r.update(name=name, tflops=flops / (r["median_ms"] * 1e-3) / 1e12)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = dict(name=name, error=f"{type(e).__name__}: {e}"[:300])
        rows.append(r)
        log("timing", r)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        add("sdpa cuDNN", lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        add("sdpa flash", lambda: F.scaled_dot_product_attention(q, k, v))
    d = cuda_op.debug_run(q, k, v, ent, hist, inside, grid, **attrs_in)
    info = d["info"][0]
    for plain, edit in [("cudnn", "delta"), ("cudnn", "full"), ("own", "delta"), ("own", "full"), ("flash", "delta")]:
        add(f"fused inside plain={plain} edit={edit}",
            lambda p=plain, e=edit: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, plain=p, edit=e,
                                                                    **attrs_in))
    for plain in ("cudnn", "own"):
        add(f"fused after-window plain={plain}",
            lambda p=plain: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, after, grid, plain=p, **attrs_in))
    add("fused inside E=3 plain=cudnn edit=delta",
        lambda: cuda_op.deleaker_attention_cuda(q3, k3, v3, ent3, hist3, inside, grid, **attrs_in))
    # A/B in the same call: implementation switches (dl_params_t fields, via attention_ex's impl)
    try:
        new2 = cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, **attrs_in)[0]
        for label, impl in [("v6 switches off (x_split=0 fixed_gather=0: v5 paths)", V6_OFF),
                            ("x_split=0 only", {"x_split": False}),
                            ("fixed_gather=0 only", {"fixed_gather": False}),
                            ("v4 paths (all switches off)", V4_PATHS)]:
            add(f"fused inside plain=cudnn edit=delta, {label}",
                lambda i=impl: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, impl=i, **attrs_in))
            old2 = cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, impl=impl, **attrs_in)[0]
            rows[-1]["max_diff_vs_default"] = float((new2.float() - old2.float()).abs().max())
        for label, impl in [("v6 switches off", V6_OFF), ("v4 paths", V4_PATHS)]:
            add(f"fused inside E=3 plain=cudnn edit=delta, {label}",
                lambda i=impl: cuda_op.deleaker_attention_cuda(q3, k3, v3, ent3, hist3, inside, grid, impl=i,
                                                               **attrs_in))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    # CUDA graph: capture the whole op (step read on the device), replay
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                eager = cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, **attrs_in)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            gout = cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, **attrs_in)
        g.replay()
        torch.cuda.synchronize()
        same = float((gout[0].float() - eager[0].float()).abs().max())
        add("fused inside, CUDA graph replay", g.replay)
        rows[-1]["graph_vs_eager_max_diff"] = same
        inside.fill_(20)  # same graph, step moved after the window: read on the device
        g.replay()
        torch.cuda.synchronize()
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            plain_out = F.scaled_dot_product_attention(q, k, v)
        rows[-1]["graph_after_window_vs_sdpa_max_diff"] = float((gout[0].float() - plain_out.float()).abs().max())
        inside.fill_(5)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        rows.append(dict(name="fused inside, CUDA graph replay", error=f"{type(e).__name__}: {e}"[:300]))
    from deleaker.export.reference_op import call_op

    add("reference op (fp32 materialised) inside", lambda: call_op(q, k, v, ent, hist, torch.tensor(5), grid.cpu(), attrs_in),
        warmup=1, iters=3)
    base = next((r["median_ms"] for r in rows if r["name"] == "sdpa cuDNN" and "median_ms" in r), None)
    for r in rows:
        if base and "median_ms" in r:
            r["vs_cudnn"] = r["median_ms"] / base
    RESULTS["timing"] = dict(N=N, coverage=cover, masked_rows=info["n_rows"], fallback_rows=info["n_fallback"],
                             rows=rows)


def _kernel_name(name: str) -> str:
    """Short kernel name: no return type, namespaces or argument list; template arguments kept."""
    n = name
    for pre in ("void ", "dl::(anonymous namespace)::", "(anonymous namespace)::", "dl::"):
        n = n.replace(pre, "")
    depth, cut = 0, len(n)
    for i, ch in enumerate(n):  # drop the trailing "(args...)" outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    return n[:cut][:110]


def kernel_breakdown(fn, iters=20, warmup=3, activity=None):
    """Run fn under torch.profiler; per kernel name: calls per fn call and mean us per fn call."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    act = activity or (ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU)
    want = DeviceType.CUDA if act == ProfilerActivity.CUDA else DeviceType.CPU
    with profile(activities=[act]) as prof:
        for _ in range(iters):
            fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    agg: dict = {}
    for ev in prof.events():
        if getattr(ev, "device_type", None) != want:
            continue
        k = _kernel_name(ev.name)
        a = agg.setdefault(k, [0, 0.0])
        a[0] += 1
        a[1] += ev.time_range.elapsed_us()
    rows = [dict(kernel=k, calls=c / iters, us=t / iters) for k, (c, t) in agg.items()]
    rows.sort(key=lambda r: -r["us"])
    total = sum(r["us"] for r in rows)
    for r in rows:
        r["share"] = r["us"] / total if total else 0.0
    return dict(total_us=total, kernels=rows)


def section_profile():
    """Where the fused op's time goes: kernel-by-kernel (sum of kernel durations, no gaps)."""
    from deleaker.export import cuda_op

    B, H, D, T, h, w = 1, 24, 128, 512, 64, 64
    q, k, v, ent, hist = make_inputs(B, H, D, T, h, w, 2, [[(0, 0), (1, 1)]], seed=7, dtype=torch.bfloat16)
    q3, k3, v3, ent3, hist3 = make_inputs(B, H, D, T, h, w, 3, [[(0, 0), (1, 1), (2, 2)]], seed=8,
                                          dtype=torch.bfloat16)
    grid = torch.tensor([h, w], device=DEVICE)
    inside, after = torch.tensor(5, device=DEVICE), torch.tensor(20, device=DEVICE)
    attrs = base_attrs(block_offset=3)
    runs = [
        ("4608 E=2 inside plain=cudnn edit=delta",
         lambda: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, **attrs)),
        ("4608 E=2 inside plain=cudnn edit=delta, v6 switches off",
         lambda: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, impl=V6_OFF, **attrs)),
        ("4608 E=3 inside plain=cudnn edit=delta",
         lambda: cuda_op.deleaker_attention_cuda(q3, k3, v3, ent3, hist3, inside, grid, **attrs)),
        ("4608 E=2 after-window plain=cudnn",
         lambda: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, after, grid, **attrs)),
        ("4608 E=2 inside plain=cudnn edit=full",
         lambda: cuda_op.deleaker_attention_cuda(q, k, v, ent, hist, inside, grid, edit="full", **attrs)),
    ]
    out = []
    for name, fn in runs:
        if left() < 15:
            out.append(dict(name=name, error="skipped: out of time"))
            continue
        try:
            r = kernel_breakdown(fn)
            r["name"] = name
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            r = dict(name=name, error=f"{type(e).__name__}: {e}"[:300])
        out.append(r)
        log("profile", name, f"{r.get('total_us', float('nan')):.1f} us of kernels per call")
        for kr in r.get("kernels", []):
            log(f"    {kr['us']:9.1f} us  {kr['share']:6.1%}  x{kr['calls']:.0f}  {kr['kernel']}")
        RESULTS["profile"] = out
        write_results()
    RESULTS["profile"] = out


def section_flux(time_budget_s):
    """FLUX.1-dev-sized random-weight step through the project's benchmark harness (interleaved
    variants, same weights and inputs): vanilla (stock SDPA), fused DeLeaker, reference DeLeaker;
    then vanilla vs fused again with SDPA pinned to cuDNN (the fused op's plain pass is cuDNN)."""
    try:
        from deleaker.benchmarks.harness import bench_step_variants
        from deleaker.benchmarks.models import random_flux_transformer
    except Exception as e:  # noqa: BLE001
        RESULTS["flux"] = dict(skipped=f"benchmark harness / diffusers not importable: {e}")
        log("flux skipped", e)
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if left() < 70:
        RESULTS["flux"] = dict(skipped=f"out of time ({left():.0f} s left)")
        return
    t_start = time.time()
    tr = random_flux_transformer("flux-dev", device="cuda", dtype=torch.bfloat16)
    log("flux model built", f"{sum(p.numel() for p in tr.parameters()) / 1e9:.2f}B params")
    keep = ("impl", "label", "height", "width", "step", "status", "note", "step_median_s", "step_p10_s",
            "step_p90_s", "ratio_vs_vanilla", "peak_device_mib", "mask_coverage", "runs")
    out = []
    for res in (512, 1024):
        with_ref = time.time() - t_start < time_budget_s and left() > (130 if res == 1024 else 60)
        impls = ("sdpa", "cuda", "reference") if with_ref else ("sdpa", "cuda")
        for sdpa_pin in (None, "cudnn"):
            if left() < 25:
                out.append(dict(res=res, sdpa=sdpa_pin or "default", impl="all", status="skipped", note="out of time"))
                continue
            ctx = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if sdpa_pin else contextlib.nullcontext()
            try:
                with ctx:
                    rows = bench_step_variants(tr, impls if sdpa_pin is None else ("sdpa", "cuda"), height=res,
                                               width=res, warmup=1, runs=3 if res == 1024 else 5)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rows = [dict(impl="all", height=res, status="error", note=f"{type(e).__name__}: {e}"[:300])]
            for r in rows:
                r = {k: r.get(k) for k in keep}
                r["sdpa"] = sdpa_pin or "default"
                r["res"] = res
                out.append(r)
                log("flux", r)
            RESULTS["flux"] = out
            write_results()
    RESULTS["flux"] = out


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------

OUT_DIR = Path(".")
TAG = ""


def write_results():
    (OUT_DIR / f"results{TAG}.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def markdown() -> str:
    L = [f"# DeLeaker fused op GPU check ({RESULTS['env'].get('gpu', '?')})", "",
         f"torch {RESULTS['env'].get('torch')}, CUDA {RESULTS['env'].get('cuda')}, "
         f"cuDNN {RESULTS['env'].get('cudnn')}", ""]
    L += ["## LSE convention", "", "| backend | shape | max err (natural) | max err (log2) |", "|---|---|---|---|"]
    for r in RESULTS["lse"]:
        L.append(f"| {r['backend']} | {r.get('shape', r.get('error'))} | {r.get('max_err_natural', '')} | "
                 f"{r.get('max_err_log2', '')} |")
    L += ["", "## Correctness (fused vs fp32 reference; naive = reference code in bf16/fp16)", "",
          "| case | plain/edit | ok | rel err | naive rel | ratio | max err | naive max | mask flips | cut diff/ref | "
          "masked rows | fallback rows |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in RESULTS["cases"]:
        if "error" in c:
            L.append(f"| {c['name']} | | ERROR {c['error']} |")
            continue
        for v in c["variants"]:
            if "error" in v:
                L.append(f"| {c['name']} | {v['plain']}/{v['edit']} | ERROR {v['error'][:120]} |")
                continue
            i0 = v["info"][0]
            L.append(f"| {c['name']} | {v['plain']}/{v['edit']} | {'yes' if v['ok'] else 'NO'} | {v['err']['rel']:.2e} | "
                     f"{c['naive']['rel']:.2e} | {v['ratio_rel']:.2f} | {v['err']['max']:.2e} | {c['naive']['max']:.2e} | "
                     f"{v['mask_flips']} | {v['cut_diff']}/{v['cut_ref']} | {i0['n_rows']} | {i0['n_fallback']} |")
    v6 = [(c["name"], c["v6_off"]) for c in RESULTS["cases"] if isinstance(c.get("v6_off"), dict)]
    if v6:
        L += ["", "## Same cases, cudnn/delta, v6 switches off (x_split=0 fixed_gather=0)", "",
              "| case | rel err | ratio | max abs diff vs switches on | cut diff vs on | history same |",
              "|---|---|---|---|---|---|"]
        for name, x in v6:
            if "error" in x:
                L.append(f"| {name} | ERROR {x['error'][:120]} |")
            else:
                L.append(f"| {name} | {x['rel']:.2e} | {x['ratio_rel']:.2f} | {x['max_diff_vs_on']:.2e} | "
                         f"{x['cut_diff_vs_on']} | {x['hist_same']} |")
    t = RESULTS.get("timing") or {}
    if t:
        L += ["", f"## Timing (B=1, 24x128, bf16, T+I={t.get('N')}, entities cover {t.get('coverage', 0):.0%}, "
              f"masked rows {t.get('masked_rows')}, fallback rows {t.get('fallback_rows')})", "",
              "| what | median ms | p10 | p90 | vs cuDNN | TFLOP/s (plain-attention count) |", "|---|---|---|---|---|---|"]
        for r in t.get("rows", []):
            if "error" in r:
                L.append(f"| {r['name']} | ERROR {r['error']} |")
            else:
                extra = "".join(f"; {k_} {r[k_]:.2e}" for k_ in ("max_diff_vs_default", "graph_vs_eager_max_diff")
                                if k_ in r)
                L.append(f"| {r['name']}{extra} | {r['median_ms']:.3f} | {r['p10_ms']:.3f} | {r['p90_ms']:.3f} | "
                         f"{r.get('vs_cudnn', float('nan')):.2f}x | {r['tflops']:.0f} |")
    for pr in RESULTS.get("profile") or []:
        if "error" in pr:
            L += ["", f"## Kernel profile: {pr['name']}: ERROR {pr['error']}"]
            continue
        L += ["", f"## Kernel profile: {pr['name']} ({pr['total_us']:.1f} us of kernels per call, torch.profiler)", "",
              "| kernel | us per op call | share | launches per call |", "|---|---|---|---|"]
        for kr in pr["kernels"]:
            L.append(f"| `{kr['kernel']}` | {kr['us']:.1f} | {kr['share']:.1%} | {kr['calls']:.1f} |")
    f = RESULTS.get("flux")
    if isinstance(f, list) and f:
        L += ["", "## FLUX.1-dev-sized step (random weights, bf16, 512 text tokens, B=1; benchmarks harness)", "",
              "| res | SDPA | impl | median s | vs vanilla | peak MiB | mask coverage | status |",
              "|---|---|---|---|---|---|---|---|"]
        for r in f:
            med = r.get("step_median_s")
            L.append(f"| {r['res']} | {r['sdpa']} | {r.get('label') or r.get('impl')} | "
                     f"{'' if med is None else f'{med:.4f}'} | {r.get('ratio_vs_vanilla')} | {r.get('peak_device_mib')} | "
                     f"{r.get('mask_coverage')} | {r.get('status')} {r.get('note') or ''} |")
    elif isinstance(f, dict):
        L += ["", f"FLUX: {f}"]
    return "\n".join(L) + "\n"


def main():
    global OUT_DIR, TAG
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--sections", default="lse,cases,timing,profile,flux")
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases")
    ap.add_argument("--flux-budget", type=float, default=150.0, help="seconds after which the reference FLUX runs are skipped")
    ap.add_argument("--tag", default="", help="suffix of the result files (one per process)")
    args = ap.parse_args()
    OUT_DIR = Path(args.out)
    TAG = f"_{args.tag}" if args.tag else ""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))
    from deleaker.export import cuda_op

    section_env()
    try:
        log("loaded", cuda_op.load())
    except Exception as e:  # noqa: BLE001
        RESULTS["errors"].append(f"load: {e}")
        write_results()
        raise
    for name in args.sections.split(","):
        fn = {"lse": section_lse, "cases": lambda: section_cases(args.quick), "timing": section_timing,
              "profile": section_profile, "flux": lambda: section_flux(args.flux_budget)}[name]
        log(f"== section {name} ({left():.0f} s left)")
        if name == "timing" and left() < 30:
            RESULTS["errors"].append("timing skipped: out of time")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            RESULTS["errors"].append(f"{name}: {type(e).__name__}: {e}"[:500])
        write_results()
    md = markdown()
    (OUT_DIR / f"results{TAG}.md").write_text(md)
    write_results()
    # short table last (the device tool returns the tail of the output)
    print("\n==== SUMMARY ====")
    n_ok = sum(v.get("ok", False) for c in RESULTS["cases"] for v in c.get("variants", []))
    n_all = sum(len(c.get("variants", [])) + ("error" in c) for c in RESULTS["cases"])
    print(f"gpu: {RESULTS['env'].get('gpu')}  correctness: {n_ok}/{n_all} ok  errors: {RESULTS['errors']}")
    for c in RESULTS["cases"]:
        bad = [f"{v['plain']}/{v['edit']}" for v in c.get("variants", []) if not v.get("ok")]
        if bad or "error" in c:
            print(f"  NOT OK: {c['name']}: {bad or c.get('error')}; v6 switches off (cudnn/delta): {c.get('v6_off')}")
    v6 = [c["v6_off"] for c in RESULTS["cases"] if isinstance(c.get("v6_off"), dict)]
    if v6:
        print(f"  v6 on vs off over {len(v6)} cases (cudnn/delta): max |diff| "
              f"{max(x.get('max_diff_vs_on', float('nan')) for x in v6):.2e}, cut diffs "
              f"{sum(x.get('cut_diff_vs_on', 0) for x in v6)}, errors {sum('error' in x for x in v6)}")
    t = RESULTS.get("timing") or {}
    for r in t.get("rows", []):
        if "median_ms" in r:
            print(f"  {r['name']:<45} {r['median_ms']:8.3f} ms  {r.get('vs_cudnn', float('nan')):5.2f}x cuDNN")
    for pr in RESULTS.get("profile") or []:
        if "kernels" in pr:
            top = ", ".join(f"{kr['kernel'][:48]} {kr['us']:.0f}us" for kr in pr["kernels"][:4])
            print(f"  profile {pr['name']}: {pr['total_us']:.0f} us: {top}")
    f = RESULTS.get("flux")
    if isinstance(f, list):
        for r in f:
            med = r.get("step_median_s")
            print(f"  flux {r['res']:>4} sdpa={r['sdpa']:<7} {str(r.get('label') or r.get('impl')):<20} "
                  + (f"{med:7.4f} s  x{r.get('ratio_vs_vanilla')}  peak {r.get('peak_device_mib')} MiB"
                     if med is not None else f"{r.get('status')} {r.get('note')}"))


if __name__ == "__main__":
    main()
