"""`deleaker eval report`: the paper's table per split and overall, a bar chart and an HTML gallery.

Percentages are over the items the outcome judge classified (status "ok"); unparseable and failed
judgments are counted beside them, never folded into an outcome. 95% CIs: the two-way cluster
bootstrap over the items' prompts and seeds (eval/stats.py; items sharing a prompt or a seed are
not independent draws), fixed seed. The paper's DeLeaker row (FLUX.1-dev, Gemini judge) is shown alongside.
"""

from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from .judges.base import OUTCOMES
from .stats import Clusters
from .store import RunDir, atomic_write

log = logging.getLogger("deleaker.eval")

# Paper, SLIM, FLUX.1-dev, DeLeaker vs vanilla, Gemini judge (percent; VQAScore, LPIPS as given)
PAPER_ROW = {"mitigation_major": 46.07, "mitigation_minor": 9.76, "no_change": 25.36, "degradation_minor": 5.83,
             "degradation_major": 12.98, "vqascore": 0.68, "lpips": 0.22}
LABELS = {"mitigation_major": "mitigation (major)", "mitigation_minor": "mitigation (minor)",
          "no_change": "no change", "degradation_minor": "degradation (minor)",
          "degradation_major": "degradation (major)"}


@dataclass
class Stat:
    value: float | None
    lo: float | None = None
    hi: float | None = None

    def fmt(self, digits: int) -> str:
        if self.value is None:
            return "n/a"
        if self.lo is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


@dataclass
class Group:
    name: str
    items: int = 0  # generated pairs
    judged: int = 0  # with an outcome
    unparseable: int = 0
    failed: int = 0
    outcomes: dict[str, Stat] = field(default_factory=dict)  # percent
    vqascore: Stat = field(default_factory=lambda: Stat(None))  # DeLeaker images
    vqascore_vanilla: Stat = field(default_factory=lambda: Stat(None))
    lpips: Stat = field(default_factory=lambda: Stat(None))


def bootstrap_mean(values, items: list[dict], scale: float = 1.0) -> Stat:
    """Mean of values [N] (one per item, items with 'prompt' and 'seed') with its 95% interval."""
    if len(values) == 0:
        return Stat(None)
    lo, hi = Clusters(items).ci(np.asarray(values, np.float64) * scale)
    return Stat(float(np.mean(values) * scale), lo, hi)


def _group(name: str, items: list[dict], judged: dict[str, dict[str, dict]], outcome_judge: str) -> Group:
    g = Group(name, items=len(items))
    verdicts = [judged.get(outcome_judge, {}).get(i["id"]) for i in items]
    g.unparseable = sum(1 for v in verdicts if v and v["status"] == "unparseable")
    g.failed = sum(1 for v in verdicts if v and v["status"] == "error")
    ok = [(i, v) for i, v in zip(items, verdicts) if v and v["status"] == "ok"]
    g.judged = len(ok)
    for name_k in OUTCOMES:
        g.outcomes[name_k] = bootstrap_mean([v["outcome"] == name_k for _, v in ok], [i for i, _ in ok], scale=100.0)
    vqa = [(i, judged.get("vqascore", {}).get(i["id"])) for i in items]
    vqa = [(i, v) for i, v in vqa if v and v["status"] == "ok"]
    g.vqascore = bootstrap_mean([v["deleaker"] for _, v in vqa], [i for i, _ in vqa])
    g.vqascore_vanilla = bootstrap_mean([v["vanilla"] for _, v in vqa], [i for i, _ in vqa])
    lp = [(i, judged.get("lpips", {}).get(i["id"])) for i in items]
    lp = [(i, v) for i, v in lp if v and v["status"] == "ok"]
    g.lpips = bootstrap_mean([v["lpips"] for _, v in lp], [i for i, _ in lp])
    return g


def summarize(run: RunDir, outcome_judge: str = "paper") -> list[Group]:
    """Groups per split (sorted) then "overall"."""
    items = [e for e in run.items().values() if e["status"] == "ok"]
    judged = {name: run.judged(name) for name in ("paper", "vqascore", "lpips", "toyworld", outcome_judge)}
    splits = sorted({e["split"] for e in items})
    groups = [_group(s, [e for e in items if e["split"] == s], judged, outcome_judge) for s in splits]
    groups.append(_group("overall", items, judged, outcome_judge))
    return groups


def table_markdown(groups: list[Group], outcome_judge: str) -> str:
    head = ["split", "pairs", "judged", *(LABELS[k] + " %" for k in OUTCOMES), "VQAScore", "VQAScore vanilla",
            "LPIPS", "unparseable", "failed"]
    rows = [head, ["---"] * len(head)]
    for g in groups:
        rows.append([g.name, str(g.items), str(g.judged), *(g.outcomes[k].fmt(1) for k in OUTCOMES),
                     g.vqascore.fmt(3), g.vqascore_vanilla.fmt(3), g.lpips.fmt(3), str(g.unparseable), str(g.failed)])
    rows.append(["paper (FLUX.1-dev, Gemini)", "", "", *(f"{PAPER_ROW[k]:.2f}" for k in OUTCOMES),
                 f"{PAPER_ROW['vqascore']:.2f}", "", f"{PAPER_ROW['lpips']:.2f}", "", ""])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"Outcomes from judge `{outcome_judge}`: DeLeaker vs vanilla, same prompt and seed; percent of judged "
            "pairs with bootstrap 95% CI. VQAScore: P(yes), DeLeaker images (vanilla beside it). LPIPS: DeLeaker "
            "vs vanilla image. n/a: not computed (judge not run, or no judged pairs).")
    return "\n".join(lines) + "\n\n" + note + "\n"


def summary_json(groups: list[Group]) -> dict:
    def stat(s: Stat) -> dict:
        return {"value": s.value, "ci95": None if s.lo is None else [s.lo, s.hi]}

    return {"paper": PAPER_ROW, "groups": [{
        "name": g.name, "pairs": g.items, "judged": g.judged, "unparseable": g.unparseable, "failed": g.failed,
        "outcomes_percent": {k: stat(v) for k, v in g.outcomes.items()}, "vqascore": stat(g.vqascore),
        "vqascore_vanilla": stat(g.vqascore_vanilla), "lpips": stat(g.lpips)} for g in groups]}


def bar_chart(groups: list[Group], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(g.name, [g.outcomes[k].value or 0.0 for k in OUTCOMES],
             [(g.outcomes[k].lo, g.outcomes[k].hi) for k in OUTCOMES]) for g in groups]
    rows.append(("paper", [PAPER_ROW[k] for k in OUTCOMES], [(None, None)] * len(OUTCOMES)))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(rows)
    x = np.arange(len(OUTCOMES))
    for n, (name, vals, cis) in enumerate(rows):
        err = np.array([[v - lo if lo is not None else 0 for v, (lo, _) in zip(vals, cis)],
                        [hi - v if hi is not None else 0 for v, (_, hi) in zip(vals, cis)]])  # [2, 5]
        ax.bar(x + n * width - 0.4 + width / 2, vals, width, yerr=err, capsize=2, label=name,
               hatch="//" if name == "paper" else None)
    ax.set_xticks(x, [LABELS[k] for k in OUTCOMES], fontsize=8)
    ax.set_ylabel("% of judged pairs")
    ax.set_title("DeLeaker vs vanilla (95% bootstrap CI)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


_CSS = """body{font-family:sans-serif;margin:16px}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:6px;vertical-align:top}img{width:256px;image-rendering:pixelated;display:block}
.broken{outline:3px solid red}.warn{color:#b00;font-weight:bold}small{color:#555}"""
# Broken images are flagged on the page (and counted in data attributes) so a missing file is visible.
_SCRIPT = """window.addEventListener('load',function(){var im=document.querySelectorAll('img'),ok=0;
im.forEach(function(i){if(i.complete&&i.naturalWidth>0){ok++;i.dataset.loaded='1'}else{i.classList.add('broken')}});
document.body.dataset.imagesTotal=im.length;document.body.dataset.imagesLoaded=ok;
if(ok<im.length){var p=document.getElementById('status');p.className='warn';
p.textContent=(im.length-ok)+' of '+im.length+' images are missing'}});"""


def _reasons(v: dict | None) -> str:
    if v is None:
        return "not judged"
    if v["status"] != "ok":
        raw = v.get("raw") or ""
        return f"{v['status']}: {v.get('error', '')}" + (f"<br><small>raw: {html.escape(raw[:300])}</small>"
                                                           if raw else "")
    parts = []
    if "verdict" in v:
        parts.append(html.escape(v["verdict"]["reason"]))
    for variant, label in (("vanilla", "vanilla"), ("deleaker", "DeLeaker")):
        for ent, t in v.get("typicality", {}).get(variant, {}).items():
            state = "missing" if not t["present"] else "typical" if t["typical"] else \
                "borrows " + ", ".join(t["borrowed_features"])
            parts.append(f"<small>{label} {html.escape(ent)}: {html.escape(state)}</small>")
    return "<br>".join(parts)


def gallery_html(run: RunDir, outcome_judge: str) -> str:
    items = run.items()
    judged = run.judged(outcome_judge)
    vqa, lp = run.judged("vqascore"), run.judged("lpips")
    rel = os.path.relpath(run.root, run.report)
    rows = []
    for e in sorted(items.values(), key=lambda e: (e["split"], e["id"])):
        head = (f"<td>{html.escape(e['split'])}<br><b>{html.escape(e['prompt'])}</b><br>"
                f"<small>entities: {html.escape(', '.join(e['entities']))}; seed {e['seed']}</small></td>")
        if e["status"] != "ok":
            rows.append(f"<tr>{head}<td colspan=4 class=warn>generation failed: {html.escape(e.get('error', ''))}"
                        "</td></tr>")
            continue
        v = judged.get(e["id"])
        verdict = LABELS.get(v.get("outcome"), v["status"]) if v else "not judged"
        scores = []
        if vqa.get(e["id"], {}).get("status") == "ok":
            scores.append(f"VQAScore {vqa[e['id']]['vanilla']:.3f} / {vqa[e['id']]['deleaker']:.3f}")
        if lp.get(e["id"], {}).get("status") == "ok":
            scores.append(f"LPIPS {lp[e['id']]['lpips']:.3f}")
        imgs = "".join(f"<td><img src=\"{html.escape(rel + '/' + e[k])}\" alt=\"{k} {html.escape(e['id'])}\"></td>"
                       for k in ("vanilla", "deleaker"))
        rows.append(f"<tr>{head}{imgs}<td><b>{html.escape(verdict)}</b><br><small>{'<br>'.join(scores)}</small>"
                    f"</td><td>{_reasons(v)}</td></tr>")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>deleaker eval: {html.escape(run.root.name)}"
            f"</title><style>{_CSS}</style></head><body><h1>DeLeaker vs vanilla: {html.escape(run.root.name)}</h1>"
            f"<p id=status>{len(items)} item(s); outcomes from judge <code>{html.escape(outcome_judge)}</code>; "
            "VQAScore vanilla / DeLeaker.</p><table><tr><th>prompt</th><th>vanilla</th><th>DeLeaker</th>"
            f"<th>verdict</th><th>reasons</th></tr>{''.join(rows)}</table><script>{_SCRIPT}</script></body></html>\n")


def write_report(run: RunDir, outcome_judge: str = "paper") -> list[Group]:
    run.require()
    run.report.mkdir(exist_ok=True)
    groups = summarize(run, outcome_judge)
    table = table_markdown(groups, outcome_judge)
    atomic_write(run.report / "table.md", table.encode())
    atomic_write(run.report / "summary.json", (json.dumps(summary_json(groups), indent=2) + "\n").encode())
    bar_chart(groups, run.report / "outcomes.png")
    atomic_write(run.report / "gallery.html", gallery_html(run, outcome_judge).encode())
    print(table)
    log.info("wrote %s/{table.md, summary.json, outcomes.png, gallery.html}", run.report)
    return groups
