"""Pass/fail verdict of a DeLeakerAttention implementation on one case, against the float32
reference (modeling/reference_op.py), with the rules the case is evidence for.

A case passes only if
  (a) masks are identical: the same samples are edited and every edited sample's final masks
      equal the reference's, row for row;
  (b) the rule-X cut sets differ by at most `Tolerance.max_cut_diff` (i, j) pairs per sample;
  (c) the output error against the float32 reference, as max |difference| and as relative
      Frobenius norm, is within the bound: `Tolerance.error_factor` x the output-rounding floor
      of the case (the error of the float32 reference itself rounded to the output dtype, which
      no bf16/fp16 output can beat);
  and the history equals the reference's at float32 tolerance.

Evidence. The bound is only meaningful if it is smaller than what each edit does. For every
edit rule enabled in an edited sample (W, S, X, TT) the verdict computes its effect in this
case, |out_ref - out_ref with that rule switched off| (the per-sample `rules` input), and for
E >= 3 with rule X also the effect of rule X's G being the head-mean of the probabilities
edited by the earlier pairs ("Xseq": out_ref - out_ref with the unedited G for every pair).
A rule is *demonstrated* when its effect is at least `Tolerance.margin` x the bound in one of
the two metrics: an implementation lacking it is then off by at least effect - floor > bound
and fails (c). Rules below that are listed as not shown: the case is no evidence for them.

    exp = expected(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs)   # reference side
    v = judge("name", exp, observed_from_debug(cuda_op.debug_run(...)))           # op side
    v.passed, v.demonstrated, v.line()
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from deleaker.benchmarks import op_bench as ob

# edit rules and their column in the per-sample rules input (op_schema: use_history,
# do_smoothing, W, S, X, TT); use_history and do_smoothing act through the masks, checked by (a)
RULE_COLUMNS = {"W": 2, "S": 3, "X": 4, "TT": 5}
SEQ_G = "Xseq"  # rule X's G from the probabilities edited by earlier pairs (E >= 3)
ALL_RULES = (*RULE_COLUMNS, SEQ_G)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Tolerance:
    """The verdict's stated limits."""

    error_factor: float = 4.0  # output error bound, in units of the output-rounding floor
    margin: float = 2.0  # a rule is demonstrated when its effect >= margin x bound
    max_cut_diff: int = 4  # rule-X (i, j) pairs that may differ per sample (values at the threshold)
    history_rtol: float = 1e-4
    history_atol: float = 1e-7


@dataclass(frozen=True)
class Metric:
    """An output difference: max |d| and ||d|| / ||ref||."""

    max: float
    rel: float

    def __str__(self) -> str:
        return f"max {self.max:.2e} rel {self.rel:.2e}"

    def scaled(self, f: float) -> "Metric":
        return Metric(self.max * f, self.rel * f)

    def within(self, bound: "Metric") -> bool:
        return self.max <= bound.max and self.rel <= bound.rel

    def clears(self, bound: "Metric") -> bool:
        """Above the bound in at least one metric."""
        return self.max >= bound.max or self.rel >= bound.rel


def difference(x: torch.Tensor, ref: torch.Tensor) -> Metric:
    d = x.float() - ref.float()
    return Metric(float(d.abs().max()), float(d.norm() / ref.float().norm().clamp_min(1e-30)))


# ------------------------------------------------------------------------------------------
# reference variants


@contextlib.contextmanager
def unedited_g():
    """Reference variant: rule X of every pair uses the head-mean of the unedited probabilities
    (the first pair's G) instead of the probabilities edited by the earlier pairs. Enter it
    around op_bench.reference_run (outside its Recorder)."""
    from deleaker.modeling import reference_op as R

    orig_cut, orig_int = R._cut_image_image, R._intervene
    first = {}

    def intervene(*a, **k):
        first.clear()  # a new sample
        return orig_int(*a, **k)

    def cut(L, G, rows, cols, beta2, T):
        g0 = first.setdefault("G", G)
        return orig_cut(L, g0, rows, cols, beta2, T)

    R._cut_image_image, R._intervene = cut, intervene
    try:
        yield
    finally:
        R._cut_image_image, R._intervene = orig_cut, orig_int


def rules_without(rules: torch.Tensor, rule: str) -> torch.Tensor:
    """The per-sample rules input [B, 6] with `rule` switched off in every sample."""
    r = rules.clone()
    r[:, RULE_COLUMNS[rule]] = 0
    return r


# ------------------------------------------------------------------------------------------
# the reference side


@dataclass
class Expected:
    """The float32 reference of one case and what the case can demonstrate."""

    out: torch.Tensor  # [B, H, N, D] float32
    history: torch.Tensor  # [B, E, I] float32
    records: list  # per sample {masks [E_active, I] bool or None, cut [I, I] bool}
    active: list  # per sample, the active entity slots
    dtype: torch.dtype  # output dtype of the implementation under test
    floor: Metric  # error of the reference itself rounded to dtype
    bound: Metric  # floor x error_factor
    effects: dict = field(default_factory=dict)  # rule -> Metric, rules enabled in an edited sample
    tolerance: Tolerance = Tolerance()

    @property
    def demonstrated(self) -> tuple[str, ...]:
        need = self.bound.scaled(self.tolerance.margin)
        return tuple(r for r in ALL_RULES if r in self.effects and self.effects[r].clears(need))

    @property
    def not_shown(self) -> tuple[str, ...]:
        return tuple(r for r in ALL_RULES if r in self.effects and r not in self.demonstrated)


def _enabled_rules(rules: torch.Tensor, records: list, active: list) -> list[str]:
    """Edit rules that act in this case: enabled in a sample that was edited (two or more
    active entities inside the window)."""
    out = []
    for name, col in RULE_COLUMNS.items():
        if any(rec["masks"] is not None and int(rules[b, col]) for b, rec in enumerate(records)):
            out.append(name)
    if "X" in out and any(rec["masks"] is not None and len(active[b]) >= 3 and int(rules[b, RULE_COLUMNS["X"]])
                          for b, rec in enumerate(records)):
        out.append(SEQ_G)
    return out


def expected(q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs, tol: Tolerance = Tolerance()) -> Expected:
    """Run the reference on one case (per sample, float32) and each enabled rule switched off.
    q, k, v carry the dtype of the implementation under test (bf16 or fp16)."""
    if q.dtype not in OUTPUT_DTYPES:
        raise ValueError(f"the verdict's error floor is the output rounding of bf16/fp16; got {q.dtype}")
    args = (q, k, v, ent, hist, step, grid, windows, knobs, rules, attrs)
    out, hist_out, recs = ob.reference_run(*args)
    active = [(ent[b] > 0).any(-1).nonzero().flatten().tolist() for b in range(ent.shape[0])]
    floor = difference(out.to(q.dtype), out)
    if floor.max == 0 or floor.rel == 0:
        raise ValueError("the reference output rounds exactly to the output dtype: no error floor to scale")
    exp = Expected(out=out, history=hist_out, records=recs, active=active, dtype=q.dtype, floor=floor,
                   bound=floor.scaled(tol.error_factor), tolerance=tol)
    rules_cpu = rules.cpu()
    for name in _enabled_rules(rules_cpu, recs, active):
        if name == SEQ_G:
            with unedited_g():
                off, _, _ = ob.reference_run(*args, record=False)
        else:
            off, _, _ = ob.reference_run(*args[:9], rules_without(rules, name), attrs, record=False)
        exp.effects[name] = difference(off, out)
    return exp


# ------------------------------------------------------------------------------------------
# the implementation side


@dataclass
class Observed:
    """What the implementation under test produced for the case."""

    out: torch.Tensor  # [B, H, N, D]
    history: torch.Tensor  # [B, E, I] float32
    intervened: list  # per sample: bool
    masks: torch.Tensor  # [B, E, I] bool (inactive slots ignored)
    cut: torch.Tensor  # [B, I, I] bool


def observed_from_debug(d: dict) -> Observed:
    """From deleaker.modeling.cuda_op.debug_run's result."""
    return Observed(out=d["out"], history=d["history_out"], intervened=[bool(i["intervene"]) for i in d["info"]],
                    masks=d["masks"], cut=d["cut"])


def observed_from_reference(out, history, records, ent) -> Observed:
    """From op_bench.reference_run's result (a reference variant standing in for an op)."""
    B, E, _ = ent.shape
    I = history.shape[-1]
    masks = torch.zeros(B, E, I, dtype=torch.bool, device=out.device)
    for b, rec in enumerate(records):
        if rec["masks"] is not None:
            masks[b, (ent[b] > 0).any(-1).nonzero().flatten().to(out.device)] = rec["masks"].to(out.device)
    return Observed(out=out, history=history, intervened=[rec["masks"] is not None for rec in records], masks=masks,
                    cut=torch.stack([rec["cut"] for rec in records]).to(out.device))


# ------------------------------------------------------------------------------------------
# the verdict


@dataclass
class Verdict:
    name: str
    passed: bool
    failures: list
    error: Metric
    bound: Metric
    floor: Metric
    mask_flips: list  # per sample
    cut_diff: list  # per sample
    effects: dict
    demonstrated: tuple
    not_shown: tuple

    def line(self) -> str:
        shown = " ".join(self.demonstrated) or "none"
        weak = (" | not shown: " + ", ".join(f"{r} ({self.effects[r]})" for r in self.not_shown)
                if self.not_shown else "")
        ratio = self.error.max / self.floor.max if self.floor.max else float("nan")
        status = "PASS" if self.passed else "FAIL (" + "; ".join(self.failures) + ")"
        return (f"{self.name}: {status} | error {self.error} = {ratio:.2f}x floor, bound {self.bound} | "
                f"mask rows differing {sum(self.mask_flips)}, cut pairs differing {max(self.cut_diff, default=0)} | "
                f"demonstrates: {shown}{weak}")


def judge(name: str, exp: Expected, obs: Observed) -> Verdict:
    tol = exp.tolerance
    failures = []
    dev = exp.out.device
    hist_ok = torch.allclose(obs.history.float().to(dev), exp.history, rtol=tol.history_rtol, atol=tol.history_atol)
    if not hist_ok:
        failures.append("history differs")
    flips, cut_diff = [], []
    for b, rec in enumerate(exp.records):
        edited = rec["masks"] is not None
        if bool(obs.intervened[b]) != edited:
            failures.append(f"sample {b}: {'not edited, the reference edits it' if edited else 'edited, the reference does not edit it'}")
            flips.append(0)
            cut_diff.append(0)
            continue
        n = 0
        if edited:
            n = int((obs.masks[b, exp.active[b]].to(dev) != rec["masks"]).sum())
        flips.append(n)
        if n:
            failures.append(f"sample {b}: {n} mask rows differ")
        c = int((obs.cut[b].to(dev) != rec["cut"]).sum()) if edited else 0
        cut_diff.append(c)
        if c > tol.max_cut_diff:
            failures.append(f"sample {b}: {c} cut pairs differ (limit {tol.max_cut_diff})")
    err = difference(obs.out.to(dev), exp.out)
    if not err.within(exp.bound):
        failures.append(f"output error {err} over the bound {exp.bound}")
    return Verdict(name=name, passed=not failures, failures=failures, error=err, bound=exp.bound, floor=exp.floor,
                   mask_flips=flips, cut_diff=cut_diff, effects=dict(exp.effects), demonstrated=exp.demonstrated,
                   not_shown=exp.not_shown)
