"""The DeLeakerAttention op alone: structured inputs, reference counters, timings vs torch SDPA.

    python -m deleaker.benchmarks.op_bench [--sizes 1536,4608] [--entities 2,3] [--iters 30]

prints one JSON line per measurement (needs a CUDA GPU and the fused library, plugins/): torch
SDPA (cuDNN, flash) and the fused op (torch.ops.deleaker.attention on CUDA tensors) inside and
after the intervention window, each with the op's edit counters, read after the timing.

Also the inputs and reference values of tests/modeling/test_cuda_op.py (CPU or GPU):
- make_inputs: q, k, v with planted entities (an image region's queries and the entity's token
  keys share a direction), so the entity masks are clear-cut and rounding cannot flip them;
- settings_for: per-sample windows / knobs / rules tensors from DeLeakerConfig overrides;
- reference_run: the reference op's per-sample code with its masks and cut sets recorded, in
  float32 or in the inputs' precision (the same-precision naive implementation);
- reference_counters / op_counters: edit counters (rows per entity mask after smoothing, masked
  rows, rule-X cut pairs) from the reference, and from the fused op (plus its fallback rows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass

import torch

from deleaker.modeling.checkpoint import resolve_dtype

# FLUX.1: 19 double + 38 single blocks; the default windows are the authors' (a0 12, i0 18 block-steps)
BLOCKS_PER_STEP = 57
# token positions of the planted entity kinds (kind -> text tokens)
TOKENS = {0: [5, 6, 7], 1: [20, 21], 2: [40, 41, 42, 43], 3: [60]}


def region(h: int, w: int, kind: int, shift: int = 0, device="cpu") -> torch.Tensor:
    """Boolean [h, w] entity region of `kind` (fractions of the grid, so it scales with it)."""
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
    raise ValueError(f"region kind must be 0..3, got {kind}")


@dataclass(frozen=True)
class Case:
    """One op problem. spec[b]: (slot, kind) pairs of sample b (a slot not named stays empty)."""

    B: int = 1
    H: int = 24
    D: int = 128
    T: int = 512
    h: int = 32
    w: int = 32
    E: int = 2
    spec: tuple = (((0, 0), (1, 1)),)
    dtype: str = "bf16"
    layout: str = "bhnd"  # "bnhd": FLUX's [B, N, H, D] memory viewed as [B, H, N, D]
    leak: float = 0.0  # share of the next entity's direction in each region's queries (rule W's work)
    text_pull: float = 0.0  # share of it in each entity's first text query (rule TT's work)

    @property
    def I(self) -> int:  # noqa: E743 - the image token count, as in the semantics
        return self.h * self.w

    @property
    def N(self) -> int:
        return self.T + self.h * self.w




def make_inputs(case: Case, seed: int = 0, device="cpu", strength: float = 8.2):
    """q, k, v [B, H, N, D] (case.dtype), entity_tokens [B, E, T], history [B, E, I] float32.

    Image rows of entity kind c get direction u_c added to q, the entity's tokens get u_c added
    to k (logit boost ~ strength^2 / sqrt(D)), so p_e is clearly bimodal; four isolated "salt"
    rows per entity outside the region must be removed by the opening. The history holds the
    same region shifted by 2 rows, so masks from the history differ from masks from p.

    case.leak > 0 plants leakage: each region's queries also get leak * strength * u_next (the
    next entity of the sample, cyclically), so they attend to the other entity's tokens and
    rule W has work. case.text_pull > 0 does the same for the entity's first text query, so
    rule TT (which cuts first token -> first token) removes real probability mass."""
    c = case
    if len(c.spec) != c.B:
        raise ValueError(f"spec has {len(c.spec)} samples, B is {c.B}")
    g = torch.Generator(device=device).manual_seed(seed)
    I, N = c.I, c.N
    q, k, v = (torch.randn(c.B, c.H, N, c.D, generator=g, device=device) for _ in range(3))  # [B, H, N, D]
    dirs = torch.linalg.qr(torch.randn(c.D, 8, generator=g, device=device))[0].T  # [8, D] orthonormal
    ent = torch.zeros(c.B, c.E, c.T, device=device)  # [B, E, T]
    hist = 0.001 * torch.rand(c.B, c.E, I, generator=g, device=device)  # [B, E, I]
    for b, items in enumerate(c.spec):
        for j, (slot, kind) in enumerate(items):
            toks = TOKENS[kind]
            ent[b, slot, toks] = 1.0
            k[b, :, toks, :] += strength * dirs[kind]
            reg = region(c.h, c.w, kind, device=device).flatten()
            salt = torch.randint(0, I, (4,), generator=g, device=device)
            reg_q = reg.clone()
            reg_q[salt] = True
            rows = reg_q.nonzero().flatten()
            q[b, :, c.T + rows, :] += strength * dirs[kind]
            hist[b, slot] += 0.05 * region(c.h, c.w, kind, shift=2, device=device).flatten().float()
            if len(items) > 1:  # planted leakage towards the next entity of the sample
                nxt = dirs[items[(j + 1) % len(items)][1]]
                q[b, :, c.T + reg.nonzero().flatten(), :] += c.leak * strength * nxt
                q[b, :, toks[0], :] += c.text_pull * strength * nxt
    if c.layout == "bnhd":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    dt = resolve_dtype(c.dtype)
    return q.to(dt), k.to(dt), v.to(dt), ent, hist


def settings_for(overrides, device="cpu"):
    """(windows [B, 4], knobs [B, 3], rules [B, 6]) for one dict of DeLeakerConfig overrides per
    sample (FLUX.1-dev defaults otherwise, 57 blocks per step)."""
    from deleaker.modeling.reference_op import settings_tensors
    from deleaker.runtime.config import DeLeakerConfig

    configs = [DeLeakerConfig().replace(**o).resolved(BLOCKS_PER_STEP) for o in overrides]
    return settings_tensors(configs, device)


def attrs_for(block_offset: int) -> dict:
    return {"block_offset": int(block_offset), "blocks_per_step": BLOCKS_PER_STEP}


# ------------------------------------------------------------------------------------------
# reference runs with the discrete intermediates recorded
# ------------------------------------------------------------------------------------------

class Recorder:
    """Patches the reference module's rule functions to record masks and cut sets (one sample).
    A patch of those functions entered before it (e.g. a deliberately broken variant) is
    recorded as applied: the recorder sees what the patched functions return and the logits
    they cut."""

    def __init__(self):
        from deleaker.modeling import reference_op as R

        self.R = R
        self.raw, self.smoothed, self.cuts = [], [], []

    def __enter__(self):
        R = self.R
        self._orig = (R.entity_masks, R.smooth_masks, R._cut_image_image)
        em, sm, cu = self._orig

        def entity_masks(a, beta1):
            m = em(a, beta1)
            self.raw.append(m.clone())
            return m

        def smooth_masks(masks, h, w):
            m = sm(masks, h, w)
            self.smoothed.append(m.clone())
            return m

        def cut_image_image(L, G, rows, cols, beta2, T):
            r = cu(L, G, rows, cols, beta2, T)
            # only rule X writes -inf among image-image logits: what it cut so far, as applied
            # (whatever G the code below was given)
            self.cuts.append(torch.isinf(L[0, T:, T:]))
            return r

        R.entity_masks, R.smooth_masks, R._cut_image_image = entity_masks, smooth_masks, cut_image_image
        return self

    def __exit__(self, *exc):
        self.R.entity_masks, self.R.smooth_masks, self.R._cut_image_image = self._orig

    def record(self, I: int, device) -> dict:
        """masks [E_active, I] bool (final) or None when the sample was not edited; cut [I, I] bool."""
        masks = (self.smoothed[-1] if self.smoothed else self.raw[-1]) if self.raw else None
        cut = torch.zeros(I, I, dtype=torch.bool, device=device)
        for c in self.cuts:
            cut |= c
        return dict(masks=masks, cut=cut)


def reference_run(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs, upcast=True, record=True):
    """The reference op's per-sample code. upcast=False runs it in the inputs' precision (the
    same-precision naive implementation). Returns out [B, H, N, D] float, history_out [B, E, I],
    and per sample {masks, cut} (record=True)."""
    from deleaker.modeling import reference_op as R
    from deleaker.runtime import op_schema

    h, w = (int(x) for x in grid)
    I = h * w
    outs, hists, recs = [], [], []
    upd = R.update_history
    for b in range(q.shape[0]):
        settings = op_schema.unpack_settings(windows.cpu(), knobs.cpu(), rules.cpu(), b)
        conv = (lambda x: x.float()) if upcast else (lambda x: x)
        if not upcast:  # tau == a0 returns p itself: keep the float32 history's dtype
            R.update_history = lambda *a_, **k_: upd(*a_, **k_).float()
        ctx = Recorder() if record else contextlib.nullcontext()
        try:
            with ctx as rec:
                o, hb = R._one_sample(conv(q[b]), conv(k[b]), conv(v[b]), ent[b].float(), hist[b].float(), int(step),
                                      h, w, attrs["block_offset"], attrs["blocks_per_step"], settings)
        finally:
            R.update_history = upd
        outs.append(o.float())
        hists.append(hb.float())
        if record:
            recs.append(rec.record(I, q.device))
    return torch.stack(outs), torch.stack(hists), recs


def _counters(masks_by_slot: dict, cut: torch.Tensor) -> dict:
    rows = {int(s): int(m.sum()) for s, m in masks_by_slot.items()}
    union = None
    for m in masks_by_slot.values():
        union = m.clone() if union is None else union | m
    return dict(mask_rows=rows, masked_rows=0 if union is None else int(union.sum()), cut_pairs=int(cut.sum()))


def reference_counters(ent: torch.Tensor, recs: list) -> list[dict]:
    """Per sample: rows of each active slot's final mask {slot: rows}, masked rows (union) and
    rule-X cut pairs, from reference_run's records; an unedited sample has all zeros."""
    out = []
    for b, rec in enumerate(recs):
        active = (ent[b] > 0).any(-1).nonzero().flatten().tolist()
        masks = {} if rec["masks"] is None else dict(zip(active, rec["masks"]))
        out.append(dict(edited=rec["masks"] is not None, **_counters(masks, rec["cut"])))
    return out


def op_counters(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs, **kw) -> list[dict]:
    """The same counters from the fused op's workspace (one extra debug call), plus its exact
    fallback rows, per sample."""
    from deleaker.modeling import cuda_op

    d = cuda_op.debug_run(q, k, v, ent, hist, step, grid, windows, knobs, rules, **attrs, **kw)
    out = []
    for b, info in enumerate(d["info"]):
        edited = bool(info["intervene"])
        active = (ent[b] > 0).any(-1).nonzero().flatten().tolist()
        masks = {s: d["masks"][b, s] for s in active} if edited else {}
        cut = d["cut"][b] if edited else torch.zeros(1, dtype=torch.bool)
        out.append(dict(edited=edited, **_counters(masks, cut), fallback_rows=int(info["n_fallback"])))
    return out


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------

def time_cuda(fn, warmup: int = 5, iters: int = 30) -> dict:
    """Median / p10 / p90 milliseconds of fn() on the current CUDA stream (CUDA events)."""
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
    return dict(median_ms=ts[len(ts) // 2], p10_ms=ts[len(ts) // 10], p90_ms=ts[(9 * len(ts)) // 10], iters=iters)


def bench_case(case: Case, steps=(("inside", 5), ("after", 20)), block_offset: int = 3, iters: int = 30,
               seed: int = 7):
    """Yield one row per measurement: SDPA backends, then the op at each step (tau = step * 57 +
    block_offset; 5: inside the default windows, 20: after), with counters read after timing."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deleaker.modeling import cuda_op

    cuda_op.load()
    q, k, v, ent, hist = make_inputs(case, seed=seed, device="cuda")
    windows, knobs, rules = settings_for([{}] * case.B, device="cuda")
    grid = torch.tensor([case.h, case.w], device="cuda")
    attrs = attrs_for(block_offset)
    flops = 4 * case.B * case.H * case.N * case.N * case.D  # plain attention's count
    base = dict(N=case.N, B=case.B, H=case.H, D=case.D, E=case.E, dtype=case.dtype)
    sdpa_ms = None
    for name, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                r = time_cuda(lambda: F.scaled_dot_product_attention(q, k, v), iters=iters)
        except RuntimeError as e:  # backend refuses this shape/dtype on this GPU
            yield dict(base, what=name, error=str(e).splitlines()[0][:200])
            continue
        sdpa_ms = sdpa_ms or r["median_ms"]
        yield dict(base, what=name, **r, tflops=flops / (r["median_ms"] * 1e-3) / 1e12)
    for label, s in steps:
        step = torch.tensor(s, device="cuda")  # on the device: read there
        args = (q, k, v, ent, hist, step, grid, windows, knobs, rules)
        r = time_cuda(lambda: torch.ops.deleaker.attention(*args, attrs["block_offset"], attrs["blocks_per_step"]),
                      iters=iters)
        counters = op_counters(*args, attrs)
        row = dict(base, what=f"op {label}", step=s, tau=s * BLOCKS_PER_STEP + block_offset, **r,
                   tflops=flops / (r["median_ms"] * 1e-3) / 1e12, counters=counters)
        if sdpa_ms:
            row["vs_sdpa_cudnn"] = r["median_ms"] / sdpa_ms
        yield row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Time the fused DeLeaker op against torch SDPA (JSON lines).")
    ap.add_argument("--sizes", default="1536,4608", help="T+I values (T = 512, square image grid)")
    ap.add_argument("--entities", default="2,3", help="entity counts E (planted, one region each)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    ap.add_argument("--iters", type=int, default=30)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("op_bench: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    from deleaker.modeling import cuda_op

    try:
        cuda_op.load()
    except cuda_op.CudaOpUnavailable as e:
        print(f"op_bench: {e}", file=sys.stderr)
        return 2
    for n in (int(x) for x in args.sizes.split(",")):
        side = int(round((n - 512) ** 0.5))
        if side * side != n - 512:
            print(f"op_bench: size {n} is not 512 + a square image grid", file=sys.stderr)
            return 2
        for e in (int(x) for x in args.entities.split(",")):
            if not 1 <= e <= 4:
                print(f"op_bench: --entities takes 1..4 (planted kinds), got {e}", file=sys.stderr)
                return 2
            case = Case(H=args.heads, D=args.head_dim, h=side, w=side, E=e,
                        spec=(tuple((s, s) for s in range(e)),), dtype=args.dtype)
            for row in bench_case(case, iters=args.iters):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
