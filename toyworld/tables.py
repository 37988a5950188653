"""Markdown tables of an evaluation's results.json (the numbers docs/toyworld.md quotes).

    python -m deleaker.toyworld.tables results/toyworld/evaluation/results.json
    python -m deleaker.toyworld.tables --slim RUN results/toyworld/evaluation/results.json

--slim RUN: a `deleaker eval` run folder judged with `--judge toyworld` (its manifest.jsonl and
judgments/toyworld.jsonl), set against results.json item by item on the same (prompt, seed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deleaker.eval.judges.base import OUTCOMES  # the paper's five categories, defined once

from .preset import RULES


def _ci(v, key):
    lo, hi = v[key + "_ci95"]
    return f"{v[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def _share(ns) -> str:
    if not ns["n"]:
        return "-"
    return f"{100 * ns['share']:.1f}% of {ns['n']} (z {ns['z']:+.1f})"


def _rules(config: dict) -> str:
    """'W + S + X', 'W + S', ...: the rules a recorded config has on."""
    on = [c for c, k in RULES.items() if config.get(k, True)]
    return " + ".join(on) or "none"


def comparison(ev: dict, title: str) -> str:
    v, d = ev["vanilla"], ev["deleaker"]
    chance = v["named_share"]["all"]["chance"]
    rows = [f"| {title} | vanilla | DeLeaker |", "|---|---|---|"]
    rows += [f"| leakage (any attribute) | {_ci(v, 'leak')} | {_ci(d, 'leak')} |"]
    rows += [f"| ... in {a} | {_ci(v, 'leak_' + a)} | {_ci(d, 'leak_' + a)} |" for a in ("colour", "texture", "shape")]
    rows += [f"| all entities present | {_ci(v, 'all_present')} | {_ci(d, 'all_present')} |",
             f"| all recognised (every attribute) | {_ci(v, 'all_recognised')} | {_ci(d, 'all_recognised')} |"]
    for a in ("colour", "texture", "shape", "all"):
        rows.append(f"| wrong {a if a != 'all' else 'values'} from another named entity (prompt-blind: "
                    f"{100 * chance:.0f}%) | {_share(v['named_share'][a])} | {_share(d['named_share'][a])} |")
    if "mask_on_objects" in d:
        rows.append(f"| entity-mask tokens on an object (objects cover {100 * d['image_on_objects']:.0f}% of "
                    f"the image; {d['empty_masks']} runs with empty masks) | - | {100 * d['mask_on_objects']:.0f}% |")
    lo, hi = ev["leak_reduction_ci95"]
    plo, phi = ev["presence_change_ci95"]
    o = ev["outcomes"]
    text = "\n".join(rows) + "\n\n"
    text += (f"Paired leakage reduction (vanilla - DeLeaker): {ev['leak_reduction']:+.3f}, 95% CI "
             f"[{lo:+.3f}, {hi:+.3f}]; change in all-entities-present {ev['presence_change']:+.3f} "
             f"[{plo:+.3f}, {phi:+.3f}].\n\n")
    if o["leaking_vanilla"]:
        s = o["share"]
        text += (f"Paper's outcome categories, over the {o['leaking_vanilla']} leaking vanilla images: mitigation "
                 f"major {100 * s['mitigation_major']:.1f}%, minor {100 * s['mitigation_minor']:.1f}%, no change "
                 f"{100 * s['no_change']:.1f}%, degradation minor {100 * s['degradation_minor']:.1f}%, major "
                 f"{100 * s['degradation_major']:.1f}%; mitigated minus degraded "
                 f"{100 * o['mitigated_minus_degraded']:+.1f} points (the paper: +37 on FLUX.1-dev); mitigated with "
                 f"every entity still present {100 * o['mitigated_all_present']:.1f}%.\n")
    return text


def sweep(res: dict) -> str:
    paired = any("presence_change_ci95" in v for v in res["sweep"].values())  # recorded since the second sweep
    rows = ["| setting | leak | all present | all recognised |" + (" presence change [95% CI] |" if paired else ""),
            "|---|---|---|---|" + ("---|" if paired else "")]
    for name, v in res["sweep"].items():
        bold = "**" if name == res["chosen"] else ""
        row = f"| {bold}{name}{bold} | {v['leak']:.3f} | {v['all_present']:.3f} | {v['all_recognised']:.3f} |"
        if paired:
            ci = v.get("presence_change_ci95")
            row += f" {v['presence_change']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}] |" if ci else " |"
        rows.append(row)
    return "\n".join(rows) + "\n"


FULL_ROWS = (("leak", "leak rate"), ("clean", "clean (every entity present, every attribute right)"),
             ("all_present", "all entities present"), ("mixing", "an object mixing two entities' values"),
             ("fidelity_colour", "colour fidelity"), ("fidelity_texture", "texture fidelity"),
             ("fidelity_shape", "shape fidelity"), ("all_right", "every attribute right (best-matched objects)"))


def full_report(ev: dict, title: str) -> str:
    """The full held-out report (report.full): both arms and the paired change with 95% intervals,
    the transition table, the paper's outcomes among leaking vanilla images."""
    rep = ev["report"]
    v, d, c = rep["vanilla"], rep["deleaker"], rep["change"]
    rows = [f"| {title} ({rep['pairs']}: {rep['prompts']} prompts x {rep['seeds']} seeds) | vanilla | DeLeaker | "
            "change |", "|---|---|---|---|"]
    for k, label in FULL_ROWS:
        lo, hi = c[k]["ci95"]
        rows.append(f"| {label} | {_ci(v, k)} | {_ci(d, k)} | {c[k]['change']:+.3f} [{lo:+.3f}, {hi:+.3f}] |")
    for arm in ("vanilla", "deleaker"):
        ns = rep["named_share"][arm]
        if ns["share"] is not None and ns["chance"]:
            lo, hi = ns["ci95"]
            rows.append(f"| {arm}: wrong values from another named entity (prompt-blind {100 * ns['chance']:.0f}%) "
                        f"| {100 * ns['share']:.1f}% of {ns['n']} [{100 * lo:.1f}, {100 * hi:.1f}], clustered z "
                        f"{ns['z']:+.1f} | | |")
    tags = list(rep["transitions"])
    rows += ["", "| vanilla \\ DeLeaker | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
    rows += [f"| {t} | " + " | ".join(str(rep["transitions"][t][u]) for u in tags) + " |" for t in tags]
    return "\n".join(rows) + f"\n\nIntervals: {rep['intervals']}.\n"


def ablation(res: dict) -> str:
    ab = res["ablation"]
    rows = [f"| rules (first {ab['pairs']} held-out pairs) | leak reduction [95% CI] | presence change |", "|---|---|---|",
            f"| the preset ({_rules(res['heldout']['config'])}) | {ab['full']['leak_reduction']:+.3f} | |"]
    for k in ("W only", "S only", "X only"):
        v = ab[k]
        rows.append(f"| {k} | {v['leak_reduction']:+.3f} [{v['leak_reduction_ci95'][0]:+.3f}, "
                    f"{v['leak_reduction_ci95'][1]:+.3f}] | {v['presence_change']:+.3f} |")
    return "\n".join(rows) + "\n"




def _latest(path) -> dict:
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return {r["id"]: r for r in rows}  # the last line of an id wins, as in the run folder


def slim_vs_evaluator(run: str, results: dict) -> dict:
    """A judged `deleaker eval` run against the evaluator's held-out per-sample flags on the same
    (prompt, seed): how many items have all four flags equal (and per flag), the leakage rates,
    and the paper's outcomes among the items whose vanilla image leaks (the evaluator's basis)."""
    from pathlib import Path

    from .evaluate import agreement

    items = {k: e for k, e in _latest(Path(run) / "manifest.jsonl").items() if e["status"] == "ok"}
    judged = _latest(Path(run) / "judgments" / "toyworld.jsonl")
    per_sample = [{"prompt": e["prompt"], "seed": e["seed"],
                   **{f"{v}_{k}": judged[iid][v][k] for v in ("vanilla", "deleaker") for k in ("leak", "all_present")}}
                  for iid, e in items.items()]
    a = agreement(per_sample, results["heldout"]["per_sample"])
    leaking = [judged[iid]["outcome"] for iid, s in zip(items, per_sample) if s["vanilla_leak"]]
    return {"items": len(items), "all_flags_equal": a["samples_all_flags_equal"], "flags_equal": a["flags_equal"],
            "leak": {v: sum(s[f"{v}_leak"] for s in per_sample) / len(items) for v in ("vanilla", "deleaker")},
            "leaking_vanilla": len(leaking),
            "outcomes_among_leaking": {k: leaking.count(k) / len(leaking) if leaking else None for k in OUTCOMES}}


def slim_text(c: dict) -> str:
    o = c["outcomes_among_leaking"]
    return (f"{c['items']} items; all four flags equal to the evaluator's on {c['all_flags_equal']} "
            f"(per flag: {', '.join(f'{k} {v}' for k, v in c['flags_equal'].items())}); leakage vanilla "
            f"{c['leak']['vanilla']:.3f}, DeLeaker {c['leak']['deleaker']:.3f}; outcomes over the "
            f"{c['leaking_vanilla']} leaking vanilla images: "
            + ", ".join(f"{k} {100 * v:.1f}%" for k, v in o.items() if v is not None) + ".")


def clustered(res: dict, key: str = "heldout") -> str:
    """A recorded run's held-out flags (per_sample) with two-way cluster bootstrap intervals over
    prompts and seeds (deleaker.eval.stats.Clusters), next to the recorded intervals (which resampled the pairs
    as if independent)."""
    from .report import Clusters

    ev = res[key]
    ps = ev["per_sample"]
    cl = Clusters(ps)
    rows = [f"| {key}, {len(ps)} pairs ({cl.prompts} prompts x {cl.seeds} seeds) | rate | recorded 95% CI | "
            "clustered 95% CI |", "|---|---|---|---|"]

    def row(label, vals, recorded):
        lo, hi = cl.ci(vals)
        rec = f"[{recorded[0]:+.3f}, {recorded[1]:+.3f}]" if recorded else "-"
        rows.append(f"| {label} | {sum(vals) / len(vals):+.3f} | {rec} | [{lo:+.3f}, {hi:+.3f}] |")

    for arm in ("vanilla", "deleaker"):
        for k in ("leak", "all_present"):
            row(f"{arm} {k}", [float(r[f"{arm}_{k}"]) for r in ps], ev[arm].get(k + "_ci95"))
    row("leak reduction", [float(r["vanilla_leak"]) - float(r["deleaker_leak"]) for r in ps], ev["leak_reduction_ci95"])
    row("presence change", [float(r["deleaker_all_present"]) - float(r["vanilla_all_present"]) for r in ps],
        ev["presence_change_ci95"])
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.toyworld.tables",
                                 description="The tables of docs/toyworld.md from an evaluation's results file.")
    ap.add_argument("results", type=Path, help="results.json of evaluate, or STAGE-BACKEND.json of evaluate --stage")
    ap.add_argument("--clustered", action="store_true",
                    help="recompute the held-out intervals as a two-way cluster bootstrap over prompts and seeds")
    ap.add_argument("--slim", type=Path, metavar="RUN", help="set a `deleaker eval` run folder against the results")
    args = ap.parse_args(argv)
    from deleaker.runtime.errors import run_reporting_errors

    return run_reporting_errors(ap.prog, lambda: _main(args))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable results file ({type(e).__name__}: {e})") from None


def _main(args) -> int:
    res = _read(args.results)
    if args.clustered:
        for key in ("heldout", "heldout_triplets"):
            if key in res:
                print(clustered(res, key))
        return 0
    if args.slim is not None:
        print(slim_text(slim_vs_evaluator(str(args.slim), res)))
        return 0
    if "stage" in res:  # evaluate --stage: one held-out set
        ev = res[res["stage"]]
        print(full_report(ev, res["stage"]))
        if ev["outcomes"]["leaking_vanilla"] or res["stage"] != "single":
            print(comparison(ev, res["stage"]))
        if "unchanged_images" in ev:
            print(f"DeLeaker images equal to vanilla: {ev['unchanged_images']} of {ev['samples']}.")
        return 0
    if "pilot" in res:
        print(comparison(res["pilot"], "pilot"))
        return 0
    if "sweep" in res:
        print(sweep(res))
    print(comparison(res["heldout"], "held-out pairs"))
    if "ablation" in res:
        print(ablation(res))
    if "heldout_triplets" in res:
        print(comparison(res["heldout_triplets"], "held-out triples"))
    if "agreement_with_torch" in res:
        a = res["agreement_with_torch"]
        per_flag = ", ".join(f"{k} {v}" for k, v in a.get("flags_equal", {}).items())
        print(f"Flags equal to the torch backend's on {100 * a['all_flags_equal']:.1f}% of {a['samples']} pairs"
              f"{' (per flag: ' + per_flag + ')' if per_flag else ''}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
