"""Measure semantic leakage of the toy-world model, vanilla vs DeLeaker, with the exact judge.

    python -m deleaker.toyworld.evaluate --out docs/toyworld --max-batch 40 --heldout-seeds 5

Stages (each logged with the overall progress; results.json is rewritten after every stage, so a
stopped run keeps what it measured):
1. judge accuracy on held-out renders (ground truth known), as rendered and after the VAE;
2. a sweep of DeLeaker settings on the sweep prompts and seeds;
3. the chosen setting vs vanilla on held-out prompts and seeds (disjoint from the sweep's), with
   bootstrap 95% intervals, the named/unnamed source of every wrong attribute, the paper's
   outcome categories, where DeLeaker's masks fall, and a per-rule ablation (W / S / X alone);
   then three entities;
4. leakage.png (rates with intervals) and examples.png (vanilla | DeLeaker).
Every image goes through the runtime: Pipeline + the torch backend (`--backend onnxruntime`
with an exported artifact: step 3's pairs only, or the first --limit of them, into
results-onnxruntime.json, with the share of samples whose flags equal the torch run's). `--pilot N`
runs only N held-out pairs with one setting, for choosing a world or recipe.

    python -m deleaker.toyworld.evaluate --stage heldout --preset toyworld --seeds 0-9 --own-seeds --out OUT

`--stage heldout|single|triples` runs one held-out set on its own (pairs, the 125 one-object
prompts, triples), vanilla vs `--preset`, on any backend, with the full report of report.py (every
interval a two-way cluster bootstrap over prompts and seeds), into OUT/STAGE-BACKEND.json.
`--rule clean` makes the sweep choose by the v3 rule (choose_clean).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from deleaker.eval.judges.base import OUTCOMES
from deleaker.runtime import latents as lat
from deleaker.runtime.config import DeLeakerConfig
from deleaker.runtime.embedded import default_model_dir

from . import judge as J
from . import report as R
from . import world
from .preset import PRESET_NAME, RULES, SIZE, STEPS, TOYWORLD_PRESET

log = logging.getLogger("deleaker.toyworld")

# Prompt sets are drawn from disjoint generator seeds and then de-duplicated against each other,
# so the sweep never sees a held-out prompt; image seeds are disjoint too.
SWEEP_PROMPT_SEED, SWEEP_PROMPTS, SWEEP_SEEDS = 1, 80, range(10_000, 10_005)
HELDOUT_PROMPT_SEED, HELDOUT_PROMPTS, EVAL_SEEDS = 2, 200, range(0, 5)
TRIPLE_PROMPT_SEED, TRIPLE_PROMPTS, TRIPLET_SEEDS = 3, 100, range(0, 5)
ABLATION_PAIRS = 300  # held-out pairs (the first prompts' seeds) for the per-rule ablation
JUDGE_CHECK_SEEDS = range(2_000_000, 2_000_300)


def _cfg(a0: int, i0: int, k: float, rules: str = "WSX") -> DeLeakerConfig:
    """A candidate: history from block-step a0, intervention from i0, own-entity strength k, the
    rules in `rules` (W, S, X) on and the others off, no mask smoothing; the derived stops
    (history to 60% of the steps, intervention to the end) and everything else as the authors'
    defaults."""
    return DeLeakerConfig(num_steps=STEPS, start_aggregating_from=a0, start_intervention_from=i0, k_strength=k,
                          do_smoothing=False, **{f: c in rules for c, f in RULES.items()})


# Candidate settings (block-steps tau = step * 5 + block): windows from the first step (the
# authors' FLUX.1-dev windows, blocks 12 and 18 of 57, scaled to 5 blocks per step), from the
# second and from the third step; all three rules with the authors' strength and a stronger one,
# W + S with both strengths, W + X and W alone (k acts only through S). No smoothing: on the
# 8x8 token grid of the factor-2 VAE the 3x3 opening erases most masks (the previous sweep: every
# smoothed setting within 0.02 of vanilla's leakage).
WINDOWS = {"a0=1 i0=2": (1, 2), "a0=5 i0=7": (5, 7), "a0=10 i0=12": (10, 12)}
CANDIDATES = {"WSX k=1.2": ("WSX", 1.2), "WSX k=2.0": ("WSX", 2.0), "WS k=1.2": ("WS", 1.2), "WS k=2.0": ("WS", 2.0),
              "WX": ("WX", 1.2), "W": ("W", 1.2)}
SWEEP: dict[str, DeLeakerConfig] = {
    f"{w} {c}": _cfg(a0, i0, k, rules) for w, (a0, i0) in WINDOWS.items() for c, (rules, k) in CANDIDATES.items()
}
PILOT_SETTING = "a0=1 i0=2 WSX k=1.2"  # the authors' windows scaled, all rules; used by --pilot


def ablations(cfg: DeLeakerConfig) -> dict[str, DeLeakerConfig]:
    """The chosen setting with one rule at a time: W (cut image->other entity's words),
    S (strengthen image->own words), X (cut image<->image across entities)."""
    off = dict(do_image_text_weakening=False, do_image_text_strengthening=False, do_image_image=False)
    return {"W only": replace(cfg, **{**off, "do_image_text_weakening": True}),
            "S only": replace(cfg, **{**off, "do_image_text_strengthening": True}),
            "X only": replace(cfg, **{**off, "do_image_image": True})}


def _prompt_set(seed: int, n: int, entities: int, exclude=()) -> list[tuple[world.Thing, ...]]:
    rng = np.random.default_rng(seed)
    seen, out = {frozenset(p) for p in exclude}, []
    while len(out) < n:
        p = world.distinct_things(rng, entities)
        if frozenset(p) not in seen:  # the same objects in another order count as the same prompt
            seen.add(frozenset(p))
            out.append(p)
    return out


def heldout_prompts() -> list[tuple[world.Thing, ...]]:
    return _prompt_set(HELDOUT_PROMPT_SEED, HELDOUT_PROMPTS, 2)


def sweep_prompts() -> list[tuple[world.Thing, ...]]:
    return _prompt_set(SWEEP_PROMPT_SEED, SWEEP_PROMPTS, 2, exclude=heldout_prompts())


def heldout_triplets() -> list[tuple[world.Thing, ...]]:
    return _prompt_set(TRIPLE_PROMPT_SEED, TRIPLE_PROMPTS, 3)


def single_prompts() -> list[tuple[world.Thing, ...]]:
    """All 125 one-object prompts (colour-major). They are in every training set; what is held out
    is the noise (the held-out image seeds)."""
    return [(world.Thing(c, t, sh),) for c in world.VALUES["colour"] for t in world.TEXTURES for sh in world.SHAPES]


# --stage NAME: one held-out set on its own, vanilla vs --preset, on any backend, into
# OUT/NAME-BACKEND.json: prompts, default number of image seeds (from --heldout-seeds)
STAGES = {"heldout": (heldout_prompts, 10), "single": (single_prompts, 4), "triples": (heldout_triplets, 5)}


def requests(prompts, seeds, config: DeLeakerConfig | None):
    """One GenerateRequest per (prompt, seed); config None = vanilla (plain attention)."""
    from deleaker.runtime.pipeline import GenerateRequest

    return [GenerateRequest(prompt=world.caption_for(p), entities=tuple(t.phrase for t in p), seed=s, steps=STEPS,
                            height=SIZE, width=SIZE, deleaker=config is not None, config=config)
            for p in prompts for s in seeds]


def wrong_attributes(verdict: dict, entities) -> list[tuple[str, bool]]:
    """(attribute, named) for every attribute a present entity's object shows wrongly: named when
    the value shown is another entity's of the prompt (a leak), else a value no entity named.
    Evaluation prompts give each entity its own value per attribute, so of the 4 wrong values of
    an attribute, 1 (two entities) or 2 (three) are named: an error blind to the prompt is named
    1 time in 4 (2 in 4)."""
    things = J.parse_entities(entities)
    out = []
    for t in things:
        info = verdict["entities"][t.phrase]
        if not info["present"]:
            continue
        obj = verdict["objects"][info["object"]]
        for a in world.ATTRIBUTES:
            if obj[a] != t.attribute(a):
                out.append((a, any(o.attribute(a) == obj[a] for o in things if o != t)))
    return out


def object_tokens(image: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """[I] bool: image tokens (patches of SIZE / grid pixels) that touch an object."""
    h, w = grid
    ph, pw = image.shape[0] // h, image.shape[1] // w
    return J.foreground(image).reshape(h, ph, w, pw).any(axis=(1, 3)).reshape(-1)


def mask_on_objects(result, objects: np.ndarray, grid: tuple[int, int]) -> float | None:
    """Fraction of the entity-mask tokens (the final history's masks, smoothed as configured)
    that lie on `objects` ([I] bool, object_tokens of the image); None for vanilla or an empty mask."""
    import torch

    from deleaker.modeling.reference_op import entity_masks, smooth_masks

    cfg = result.request.config
    if not result.request.deleaker or cfg is None:
        return None
    hist = torch.from_numpy(np.asarray(result.history[:len(result.request.entities)], np.float32))  # [E, I]
    masks = entity_masks(hist, cfg.std_mul_text)
    if cfg.do_smoothing:
        masks = smooth_masks(masks, *grid)
    m = masks.numpy().any(axis=0)  # [I]
    return float(objects[m].mean()) if m.any() else None


def run(pipe, reqs, label: str = "") -> list[dict]:
    """Generate and judge; one record per request."""
    out = []
    t0 = time.time()
    grid = lat.geometry(SIZE, SIZE, pipe.backend.info.vae_scale_factor).grid  # image tokens (h, w)
    for r in pipe.generate(reqs):
        v = J.judge(r.image, r.request.entities)
        objects = object_tokens(r.image, grid)
        out.append({"prompt": r.request.prompt, "entities": list(r.request.entities), "seed": r.request.seed,
                    "image": r.image, "all_recognised": v["all_recognised"], "leaks": v["leaks"],
                    **R.score(v, J.parse_entities(r.request.entities)),
                    "wrong": wrong_attributes(v, r.request.entities), "object_share": float(objects.mean()),
                    "mask_on_objects": mask_on_objects(r, objects, grid)})
    if label:
        log.info("  %s: %d images in %.0fs", label, len(out), time.time() - t0)
    return out


def rate(records, key) -> float:
    return float(np.mean([r[key] for r in records])) if records else float("nan")


def bootstrap(values, records) -> list[float]:
    """95% interval of the mean of `values` (one per record, paired differences included): the
    two-way cluster bootstrap over the records' prompts and seeds (deleaker.eval.stats.Clusters)."""
    return R.Clusters(records).ci(values)


def named_share(named: int, unnamed: int, chance: float) -> dict:
    """Share of wrong values that are another named entity's, its standard error under the
    prompt-blind hypothesis (binomial at `chance`) and how many of those it lies above chance."""
    n = named + unnamed
    if n == 0 or not 0.0 < chance < 1.0:  # one entity: no other entity to leak from
        return {"n": 0, "share": None, "chance": chance, "se": None, "z": None}
    se = float(np.sqrt(chance * (1 - chance) / n))
    share = named / n
    return {"n": n, "share": share, "chance": chance, "se": se, "z": (share - chance) / se}


def summary(records, with_ci: bool = False, chance: float = 0.25) -> dict:
    """Rates (with bootstrap intervals if asked) of leakage, presence and recognition; leakage
    also per attribute (images with at least one leak of that attribute); wrong values by source."""
    s = {"n": len(records)}
    clusters = R.Clusters(records) if with_ci and records else None
    for key in ("leak", "all_present", "all_recognised"):
        s[key] = rate(records, key)
        if clusters:
            s[key + "_ci95"] = clusters.ci([r[key] for r in records])
    attrs = {a: 0 for a in world.ATTRIBUTES}
    for r in records:
        for _, a, _ in r["leaks"]:
            attrs[a] += 1
    s["leaked_attributes"] = attrs
    wrong = Counter(tuple(w) for r in records for w in r["wrong"])  # (attribute, named) -> count
    s["wrong_attributes"] = {a: {"named": wrong[a, True], "unnamed": wrong[a, False]} for a in world.ATTRIBUTES}
    s["named_share"] = {a: named_share(wrong[a, True], wrong[a, False], chance) for a in world.ATTRIBUTES}
    s["named_share"]["all"] = named_share(sum(wrong[a, True] for a in world.ATTRIBUTES),
                                          sum(wrong[a, False] for a in world.ATTRIBUTES), chance)
    on = [r["mask_on_objects"] for r in records if r["mask_on_objects"] is not None]
    if on:  # DeLeaker runs: where its masks fall, against the objects' share of the image
        s["mask_on_objects"] = float(np.mean(on))
        s["image_on_objects"] = float(np.mean([r["object_share"] for r in records]))
        s["empty_masks"] = sum(r["mask_on_objects"] is None for r in records)
    for a in world.ATTRIBUTES:
        flags = [any(x[1] == a for x in r["leaks"]) for r in records]
        s[f"leak_{a}"] = float(np.mean(flags)) if flags else float("nan")
        if clusters:
            s[f"leak_{a}_ci95"] = clusters.ci(flags)
    return s


def outcome(vanilla_leaks: int, deleaker_leaks: int) -> str:
    """The paper's outcome categories on the number of leaked attribute values of a pair."""
    from deleaker.eval.judges.base import outcome as slim_outcome

    return slim_outcome(vanilla_leaks, deleaker_leaks)


def outcomes(van, dl) -> dict:
    """Among the pairs whose vanilla image leaks: the share of each outcome, mitigated (major +
    minor) minus degraded, and how many mitigated pairs still show every entity."""
    leaking = [(a, b) for a, b in zip(van, dl) if a["leak"]]
    cats = Counter(outcome(len(a["leaks"]), len(b["leaks"])) for a, b in leaking)
    n = len(leaking)
    share = {k: (cats[k] / n if n else None) for k in OUTCOMES}
    mitigated = [(a, b) for a, b in leaking if len(b["leaks"]) < len(a["leaks"])]
    out = {"leaking_vanilla": n, "counts": dict(cats), "share": share}
    if n:
        out["mitigated"] = (cats["mitigation_major"] + cats["mitigation_minor"]) / n
        out["degraded"] = (cats["degradation_minor"] + cats["degradation_major"]) / n
        out["mitigated_minus_degraded"] = out["mitigated"] - out["degraded"]
        out["mitigated_all_present"] = sum(b["all_present"] for _, b in mitigated) / n
    return out


def vae_round_trip(model: Path):
    """image [H, W, 3] uint8 -> the same image encoded and decoded by the model's VAE: renders
    as blurred as the model's own outputs can be at best."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model / "vae", local_files_only=True).eval()

    def f(image: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(image.astype(np.float32).transpose(2, 0, 1)[None] / 127.5 - 1.0)  # [1, 3, H, W]
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]
        return ((y.clamp(-1, 1).permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    return f


def judge_accuracy(transform=None) -> dict:
    """Per-attribute accuracy of the judge on held-out renders (every placed object), optionally
    after `transform` (e.g. a VAE round trip)."""
    hits = {a: 0 for a in world.ATTRIBUTES}
    n = found = clean = leaks = 0
    for seed in JUDGE_CHECK_SEEDS:
        smp = world.sample(seed)
        image = smp.image if transform is None else transform(smp.image)
        objs = J.find_objects(image)
        verdict = J.judge(image, smp.entities)
        clean += verdict["all_recognised"]
        leaks += verdict["leak"]  # every render is leak-free: a leak here is the judge's error
        for p in smp.layout:
            n += 1
            match = [o for o in objs if abs(o["box"][0] - p.x0) <= 1 and abs(o["box"][1] - p.y0) <= 1]
            if match:
                found += 1
                for a in world.ATTRIBUTES:
                    hits[a] += match[0][a] == p.thing.attribute(a)
    return {"scenes": len(JUDGE_CHECK_SEEDS), "objects": n, "found": found / n,
            **{a: hits[a] / n for a in world.ATTRIBUTES}, "scenes_all_recognised": clean / len(JUDGE_CHECK_SEEDS),
            "scenes_false_leak": leaks / len(JUDGE_CHECK_SEEDS)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = results["heldout"]
    keys = [("leak", "leakage"), ("all_present", "all entities present"), ("all_recognised", "all recognised")]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    x = np.arange(len(keys))
    for j, (name, colour) in enumerate((("vanilla", "#999999"), ("deleaker", "#2a6fdb"))):
        vals = [ev[name][k] for k, _ in keys]
        lo = [ev[name][k] - ev[name][k + "_ci95"][0] for k, _ in keys]
        hi = [ev[name][k + "_ci95"][1] - ev[name][k] for k, _ in keys]
        ax.bar(x + (j - 0.5) * 0.38, vals, 0.38, yerr=[lo, hi], capsize=3, color=colour, label=name)
    ax.set_xticks(x, [label for _, label in keys])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"rate over {ev['vanilla']['n']} prompt-seed pairs")
    ax.legend(frameon=False)
    ax.set_title("toy world, held-out prompts and seeds (95% bootstrap CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tag(rec: dict) -> str:
    """A cell's judge tag: leak / clean (every entity present, no leak) / missing."""
    return "leak" if rec["leak"] else "clean" if rec["all_present"] else "missing"


def example_grid(vanilla, deleaker, path: Path, n: int = 8, scale: int = 4) -> None:
    """Rows: prompt-seed pairs (evenly spaced, not chosen); columns: vanilla | DeLeaker, each
    upscaled `scale`x, captioned and tagged by the judge."""
    from PIL import Image, ImageDraw

    s = SIZE * scale
    pad, text_h = 4, 14
    row_h = text_h + s + text_h + pad  # caption, images, tags
    picks = list(range(0, len(vanilla), max(1, len(vanilla) // n)))[:n]
    W, H = max(2 * s + 3 * pad, 330), text_h + len(picks) * row_h + pad
    grid = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    d.text((pad, 1), "vanilla", fill=(0, 0, 0))
    d.text((2 * pad + s, 1), "DeLeaker", fill=(0, 0, 0))
    for row, i in enumerate(picks):
        top = text_h + pad + row * row_h
        d.text((pad, top), f"{vanilla[i]['prompt']} (seed {vanilla[i]['seed']})", fill=(0, 0, 0))
        for col, rec in enumerate((vanilla[i], deleaker[i])):
            im = Image.fromarray(rec["image"]).resize((s, s), Image.NEAREST)
            grid.paste(im, (pad + col * (s + pad), top + text_h))
            d.text((pad + col * (s + pad), top + text_h + s + 1), tag(rec),
                   fill=(200, 0, 0) if rec["leak"] else (0, 0, 0))
    grid.save(path)


PRESENCE_SLACK = 0.05


def choose(sweep: dict) -> str:
    """The lowest-leakage setting for which the sweep shows, at 95%, that the all-entities-present
    rate stays within PRESENCE_SLACK of vanilla's (the lower end of the paired interval of the
    presence change >= -PRESENCE_SLACK), so leakage does not fall just because objects vanish and
    the sweep's sampling error is not spent on the held-out set; if none qualifies, the one with
    the highest presence minus leakage."""
    ok = [k for k, v in sweep.items() if v["presence_change_ci95"][0] >= -PRESENCE_SLACK]
    if ok:
        return min(ok, key=lambda k: (sweep[k]["leak"], -sweep[k]["all_present"]))
    return max(sweep, key=lambda k: sweep[k]["all_present"] - sweep[k]["leak"])


FIDELITY_SLACK = 0.02  # the most an attribute's fidelity may fall (the must-show)


def choose_clean(sweep: dict) -> str | None:
    """The v3 rule (fixed before any v3 sweep): among settings whose sweep shows the clean rate
    rising (paired change > 0) and no attribute's fidelity falling by more than FIDELITY_SLACK
    (point estimates of the paired changes, report.paired), the one with the lowest leakage (ties:
    the higher clean rate); None when no setting qualifies (then no preset is chosen)."""
    def ok(v):
        c = v["change"]
        return c["clean"]["change"] > 0 and all(c[f"fidelity_{a}"]["change"] >= -FIDELITY_SLACK
                                                for a in world.ATTRIBUTES)

    good = [k for k, v in sweep.items() if ok(v)]
    return min(good, key=lambda k: (sweep[k]["leak"], -sweep[k]["change"]["clean"]["change"])) if good else None


RULES_OF_CHOICE = ("presence", "clean")  # evaluate --rule: choose, choose_clean


def presence_change(van, dl) -> dict:
    """Paired change of the all-entities-present flag (DeLeaker - vanilla, same (prompt, seed)
    list): its mean and bootstrap 95% interval."""
    pres = [float(b["all_present"]) - float(a["all_present"]) for a, b in zip(van, dl)]
    return {"presence_change": float(np.mean(pres)), "presence_change_ci95": bootstrap(pres, van)}


def compare(van, dl, config: DeLeakerConfig, chance: float) -> dict:
    """Vanilla vs DeLeaker records of the same (prompt, seed) list: summaries with intervals, the
    paired leakage reduction, the paper's outcomes, per-sample flags."""
    diff = [float(a["leak"]) - float(b["leak"]) for a, b in zip(van, dl)]
    return {"config": asdict(config), "vanilla": summary(van, True, chance), "deleaker": summary(dl, True, chance),
            "leak_reduction": float(np.mean(diff)), "leak_reduction_ci95": bootstrap(diff, van),
            **presence_change(van, dl),
            "outcomes": outcomes(van, dl),
            "report": R.full(van, dl, outcomes(van, dl)),
            "per_sample": [{"prompt": a["prompt"], "entities": a["entities"], "seed": a["seed"],
                            "vanilla_leak": a["leak"], "deleaker_leak": b["leak"],
                            "vanilla_all_present": a["all_present"], "deleaker_all_present": b["all_present"],
                            "vanilla_tag": a["tag"], "deleaker_tag": b["tag"],
                            "vanilla_right": a["right"], "deleaker_right": b["right"]}
                           for a, b in zip(van, dl)]}


def own_seeds(n_prompts: int, seeds) -> list[list[int]]:
    """Every (prompt, image) pair its own noise seed: prompt i's j-th image gets seed
    seeds[0] + i * len(seeds) + j (the same count of images per prompt as `seeds`, no seed shared
    between prompts)."""
    return [[seeds[0] + i * len(seeds) + j for j in range(len(seeds))] for i in range(n_prompts)]


def heldout(pipe, config: DeLeakerConfig, prompts=None, seeds=EVAL_SEEDS, label: str = "held-out pairs",
            limit: int | None = None, own: bool = False):
    """Vanilla and `config` on held-out prompts (default: the held-out pairs) and seeds: summary
    dict, both record lists. limit: only the first `limit` (prompt, seed) samples, in the order
    prompt-major (each prompt's seeds together), so the prompts covered are the first ones."""
    prompts = heldout_prompts() if prompts is None else prompts
    if limit is not None:
        prompts = prompts[:-(-limit // len(seeds))]  # the prompts the first `limit` samples use
    chance = (len(prompts[0]) - 1) / 4  # of the 4 wrong values of an attribute, E-1 are named
    per_prompt = own_seeds(len(prompts), list(seeds)) if own else [list(seeds)] * len(prompts)

    def reqs(cfg):
        return [q for p, ss in zip(prompts, per_prompt) for q in requests([p], ss, cfg)][:limit]

    van = run(pipe, reqs(None), f"{label}, vanilla")
    dl = run(pipe, reqs(config), f"{label}, DeLeaker")
    res = {"prompts": [world.caption_for(p) for p in prompts], "seeds": list(seeds), "own_seeds": own,
           "samples": len(van),
           **compare(van, dl, config, chance)}
    return res, van, dl


FLAG_KEYS = ("vanilla_leak", "deleaker_leak", "vanilla_all_present", "deleaker_all_present")


def agreement(per_sample: list[dict], reference: list[dict]) -> dict:
    """How far held-out samples' flags equal those of another run on the same (prompt, seed) (e.g.
    onnxruntime vs torch): the fraction of samples with all four flags equal, and per flag the
    number of samples where it is equal."""
    ref = {(r["prompt"], r["seed"]): r for r in reference}
    missing = [a for a in per_sample if (a["prompt"], a["seed"]) not in ref]
    if missing:
        raise ValueError(f"the reference run has no sample ({missing[0]['prompt']!r}, seed {missing[0]['seed']}); "
                         "compare runs of the same held-out seeds")
    pairs = [(a, ref[(a["prompt"], a["seed"])]) for a in per_sample]
    same = [all(a[k] == r[k] for k in FLAG_KEYS) for a, r in pairs]
    return {"samples": len(same), "all_flags_equal": float(np.mean(same)), "samples_all_flags_equal": int(sum(same)),
            "flags_equal": {k: sum(a[k] == r[k] for a, r in pairs) for k in FLAG_KEYS}}


SLIM_PAIRS, SLIM_TRIPLES = 200, 100  # records of write_slim: held-out prompts, one seed each


def write_slim(path: Path, seed: int = EVAL_SEEDS.start) -> int:
    """The held-out prompts as SLIM-format records (jsonl), for `deleaker eval run/judge/report
    --judge toyworld`: the first SLIM_PAIRS pairs and SLIM_TRIPLES triples, image seed `seed` each
    (the first held-out seed, so the run's images are the evaluator's at that seed)."""
    rows = [{"prompt": world.caption_for(p), "entities": [t.phrase for t in p], "seed": seed, "dataset": split,
             "model": "toyworld", "leakage": None}
            for split, prompts in (("toy_pairs", heldout_prompts()[:SLIM_PAIRS]),
                                   ("toy_triples", heldout_triplets()[:SLIM_TRIPLES])) for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def check_heldout_seeds(start: int) -> None:
    first_sweep = SWEEP_SEEDS.start
    if not 0 <= start <= first_sweep - len(EVAL_SEEDS):
        raise ValueError(f"--heldout-seeds takes 0..{first_sweep - len(EVAL_SEEDS)} (held-out image seeds stay "
                         f"below the sweep's {first_sweep}), got {start}")


def check_options(args) -> None:
    if args.out is None:
        raise ValueError("--out is required")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.pilot is not None and not 1 <= args.pilot <= HELDOUT_PROMPTS * len(EVAL_SEEDS):
        raise ValueError(f"--pilot takes 1..{HELDOUT_PROMPTS * len(EVAL_SEEDS)} pairs, got {args.pilot}")
    if args.stage is not None:
        if args.pilot is not None:
            raise ValueError("--stage and --pilot are different runs; give one")
        stage_seeds(args)  # one-line errors for a bad --seeds
        from deleaker.runtime.config import preset

        preset(args.preset or PRESET_NAME)  # an unknown name: one line naming the known presets
    elif args.seeds is not None or args.preset is not None or args.own_seeds:
        raise ValueError("--seeds, --own-seeds and --preset go with --stage")
    if args.limit is not None:
        if args.stage is None and (args.backend == "torch" or args.pilot is not None):
            raise ValueError("--limit applies to --stage or a backend other than torch (the held-out pairs with the preset)")
        if not 1 <= args.limit <= HELDOUT_PROMPTS * len(EVAL_SEEDS) and args.stage is None:
            raise ValueError(f"--limit takes 1..{HELDOUT_PROMPTS * len(EVAL_SEEDS)} pairs, got {args.limit}")
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.sweep_seeds < 1:
        raise ValueError(f"--sweep-seeds must be >= 1, got {args.sweep_seeds}")
    check_heldout_seeds(args.heldout_seeds)
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {args.out} exists and is not a folder")
    if not args.model.exists():
        raise ValueError(f"checkpoint folder not found: {args.model}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.toyworld.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=default_model_dir(),
                    help="model folder (torch backend) or exported artifact (other backends)")
    ap.add_argument("--backend", default="torch", help="runtime backend: torch runs the sweep and the held-out "
                    "set; any other (onnxruntime) runs the held-out set with the preset, into results-BACKEND.json")
    ap.add_argument("--out", type=Path, help="folder for results.json and the figures (required unless --write-slim)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--sweep-seeds", type=int, default=len(SWEEP_SEEDS), metavar="N",
                    help=f"image seeds per sweep prompt (seeds {SWEEP_SEEDS.start}..; default %(default)s)")
    ap.add_argument("--heldout-seeds", type=int, default=EVAL_SEEDS.start, metavar="START",
                    help=f"first of the {len(EVAL_SEEDS)} held-out image seeds per prompt (pairs and triples; "
                    "default %(default)s); another START gives a fresh held-out sample of the same prompts")
    ap.add_argument("--pilot", type=int, default=None, metavar="N",
                    help=f"only N held-out pairs, vanilla vs '{PILOT_SETTING}', into pilot.json")
    ap.add_argument("--limit", type=int, default=None, metavar="N",
                    help="with --stage or a backend other than torch: only the first N held-out samples "
                    "(prompt-major: the first prompts, each with its seeds)")
    ap.add_argument("--stage", choices=sorted(STAGES), default=None,
                    help="run one held-out set on its own (pairs, one-object or three-object prompts), vanilla vs "
                    "--preset, on any backend, into OUT/STAGE-BACKEND.json")
    ap.add_argument("--preset", default=None, help="with --stage: the DeLeaker preset (default: toyworld)")
    ap.add_argument("--seeds", default=None, metavar="A-B|A,B,..",
                    help="with --stage: the image seeds of every prompt (default: "
                    + ", ".join(f"{k} {n} from --heldout-seeds" for k, (_, n) in STAGES.items()) + ")")
    ap.add_argument("--rule", choices=RULES_OF_CHOICE, default="presence",
                    help="the sweep's rule of choice: presence = the lowest leakage whose presence stays within "
                    f"{PRESENCE_SLACK} of vanilla's at 95%% (the shipped model's); clean = the lowest leakage whose "
                    f"clean rate rises and no attribute's fidelity falls by more than {FIDELITY_SLACK}")
    ap.add_argument("--own-seeds", action="store_true",
                    help="with --stage: every (prompt, image) pair its own noise seed (prompt i's j-th image: "
                    "first seed + i x n + j, n = the number of --seeds) instead of every prompt at the same seeds")
    ap.add_argument("--write-slim", type=Path, default=None, metavar="FILE",
                    help="only write the held-out prompts as SLIM-format jsonl (for `deleaker eval`; image seed: the first "
                    "held-out seed, --heldout-seeds) and exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from deleaker.runtime.errors import run_reporting_errors

    if args.write_slim is not None:
        def slim() -> int:
            check_heldout_seeds(args.heldout_seeds)
            log.info("%d records written to %s", write_slim(args.write_slim, args.heldout_seeds), args.write_slim)
            return 0

        return run_reporting_errors(ap.prog, slim)
    return run_reporting_errors(ap.prog, lambda: _evaluate(args, argv))


class _Results:
    """results dict written to --out after every stage (a stopped run keeps what it measured)."""

    def __init__(self, path: Path, data: dict, stages: int):
        self.path, self.data, self.stages, self.done, self.t0 = path, data, stages, 0, time.time()

    def stage(self, name: str) -> None:
        self.done += 1
        log.info("[%d/%d] %s (%.0fs so far)", self.done, self.stages, name, time.time() - self.t0)

    def save(self) -> None:
        self.data["seconds"] = round(time.time() - self.t0, 1)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def stage_seeds(args) -> list[int]:
    """--seeds 'A-B' (inclusive) or 'A,B,...'; default: the stage's number of seeds from --heldout-seeds.
    Held-out seeds stay below the sweep's."""
    if args.seeds is None:
        n = STAGES[args.stage][1]
        seeds = list(range(args.heldout_seeds, args.heldout_seeds + n))
    else:
        try:
            if "-" in args.seeds.strip("-"):
                a, b = (int(x) for x in args.seeds.split("-"))
                seeds = list(range(a, b + 1))
            else:
                seeds = [int(x) for x in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds takes A-B or A,B,... (integers), got {args.seeds!r}") from None
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"--seeds must name distinct seeds, got {args.seeds!r}")
    last = max(seeds)
    if args.own_seeds:
        if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
            raise ValueError(f"--own-seeds takes a range --seeds A-B (its first seed and count), got {args.seeds!r}")
        last = seeds[0] + len(STAGES[args.stage][0]()) * len(seeds) - 1
    if min(seeds) < 0 or last >= SWEEP_SEEDS.start:
        raise ValueError(f"held-out seeds are 0..{SWEEP_SEEDS.start - 1} (the sweep's start at {SWEEP_SEEDS.start}), "
                         f"got {min(seeds)}..{last}")
    return seeds


def _stage(args, pipe, data: dict) -> int:
    """One held-out set on its own (--stage), vanilla vs --preset."""
    from deleaker.runtime.config import preset

    make, _ = STAGES[args.stage]
    cfg = preset(args.preset or PRESET_NAME)
    seeds = stage_seeds(args)
    data.update(stage=args.stage, preset=args.preset or PRESET_NAME)
    res = _Results(args.out / f"{args.stage}-{args.backend}.json", data, 1)
    ev, van, dl = heldout(pipe, cfg, make(), seeds, args.stage, args.limit, args.own_seeds)
    if args.stage == "single":  # one entity is plain attention: DeLeaker must not change a pixel
        ev["unchanged_images"] = sum(bool(np.array_equal(a["image"], b["image"])) for a, b in zip(van, dl))
    data[args.stage] = ev
    res.stage(f"{args.stage}: {len(van)} samples")
    res.save()
    _log_report(args.stage, ev)
    return 0


def _log_report(label: str, ev: dict) -> None:
    rep = ev["report"]
    log.info("%s: %d samples (%s)", label, rep["pairs"], rep["intervals"])
    for k in R.METRICS:
        v, d, c = rep["vanilla"], rep["deleaker"], rep["change"][k]
        log.info("  %-16s vanilla %.3f [%.3f, %.3f]  DeLeaker %.3f [%.3f, %.3f]  change %+.3f [%+.3f, %+.3f]", k,
                 v[k], *v[k + "_ci95"], d[k], *d[k + "_ci95"], c["change"], *c["ci95"])
    if "unchanged_images" in ev:
        log.info("  DeLeaker images equal to vanilla: %d of %d", ev["unchanged_images"], rep["pairs"])


def _evaluate(args, argv) -> int:
    check_options(args)
    import torch

    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    sweep_seeds = range(SWEEP_SEEDS.start, SWEEP_SEEDS.start + args.sweep_seeds)
    eval_seeds = range(args.heldout_seeds, args.heldout_seeds + len(EVAL_SEEDS))
    triplet_seeds = range(args.heldout_seeds, args.heldout_seeds + len(TRIPLET_SEEDS))
    data: dict = {"command": "python -m deleaker.toyworld.evaluate " + " ".join(argv or sys.argv[1:]),
                  "backend": args.backend, "steps": STEPS, "size": SIZE}
    threads = {} if args.backend == "torch" else {"threads": args.threads}  # torch: set_num_threads above
    pipe = Pipeline(load_backend(args.backend, str(args.model), progress=False, **threads), config=TOYWORLD_PRESET,
                    max_batch=args.max_batch)
    args.out.mkdir(parents=True, exist_ok=True)  # after the model loaded: a bad --model leaves nothing
    if args.stage is not None:
        return _stage(args, pipe, data)
    if args.pilot is not None:
        res = _Results(args.out / "pilot.json", data, 1)
        prompts, seeds = heldout_prompts(), eval_seeds
        pairs = [(p, s) for p in prompts for s in seeds][:args.pilot]
        van = run(pipe, [q for p, s in pairs for q in requests([p], [s], None)], "pilot, vanilla")
        dl = run(pipe, [q for p, s in pairs for q in requests([p], [s], SWEEP[PILOT_SETTING])], "pilot, DeLeaker")
        data["pilot"] = compare(van, dl, SWEEP[PILOT_SETTING], 0.25)
        res.stage("pilot")
        res.save()
        _log_comparison("pilot", data["pilot"])
        return 0
    if args.backend != "torch":
        res = _Results(args.out / f"results-{args.backend}.json", data, 1)
        data["heldout"], _, _ = heldout(pipe, TOYWORLD_PRESET, seeds=eval_seeds, limit=args.limit)
        res.stage("held-out pairs with the preset")
        res.save()  # before the comparison, which may refuse (another run's seeds): the images stay measured
        torch_json = args.out / "results.json"
        if torch_json.exists():  # the torch run of the same held-out seeds, in the same --out
            data["agreement_with_torch"] = agreement(data["heldout"]["per_sample"],
                                                     json.loads(torch_json.read_text())["heldout"]["per_sample"])
            res.save()
        _log_comparison(f"held-out ({args.backend})", data["heldout"])
        if "agreement_with_torch" in data:
            a = data["agreement_with_torch"]
            log.info("flags equal to the torch backend's on %.1f%% of %d samples (per flag: %s)",
                     100 * a["all_flags_equal"], a["samples"], a["flags_equal"])
        return 0

    res = _Results(args.out / "results.json", data, 6)
    data["judge_accuracy"] = judge_accuracy()
    data["judge_accuracy_vae"] = judge_accuracy(vae_round_trip(args.model))
    res.stage(f"judge accuracy: renders {data['judge_accuracy']}, after the VAE {data['judge_accuracy_vae']}")
    res.save()
    sp = sweep_prompts()
    data["sweep_set"] = {"prompts": [world.caption_for(p) for p in sp], "seeds": list(sweep_seeds)}
    van = run(pipe, requests(sp, sweep_seeds, None), "sweep vanilla")
    sweep = {"vanilla": summary(van)}
    for name, cfg in SWEEP.items():
        dl = run(pipe, requests(sp, sweep_seeds, cfg), f"sweep {name}")
        sweep[name] = {**summary(dl), "config": asdict(cfg), **presence_change(van, dl),
                       "change": R.paired(van, dl, R.Clusters(van))}
        log.info("  %s: %s, presence change %+.3f %s", name,
                 {k: round(sweep[name][k], 3) for k in ("leak", "all_present", "all_recognised")},
                 sweep[name]["presence_change"], [round(x, 3) for x in sweep[name]["presence_change_ci95"]])
    candidates = {k: v for k, v in sweep.items() if k != "vanilla"}
    best = choose(candidates) if args.rule == "presence" else choose_clean(candidates)
    data["sweep"], data["chosen"], data["rule"] = sweep, best, args.rule
    if best is None:
        res.stage("sweep: no setting raises the clean rate without costing fidelity (rule 'clean'); stopping")
        res.save()
        return 0
    chosen_cfg = SWEEP[best]
    if chosen_cfg != TOYWORLD_PRESET:
        log.warning("the sweep chose %s, which differs from preset.TOYWORLD_PRESET: update the preset", best)
    data["preset_matches_sweep"] = chosen_cfg == TOYWORLD_PRESET
    res.stage(f"sweep: chose {best}")
    res.save()
    data["heldout"], van, dl = heldout(pipe, chosen_cfg, seeds=eval_seeds)
    res.stage("held-out pairs")
    _log_comparison("held-out pairs", data["heldout"])
    res.save()
    plot(data, args.out / "leakage.png")
    example_grid(van, dl, args.out / "examples.png")
    n_abl = ABLATION_PAIRS
    data["ablation"] = {"pairs": n_abl, "full": {"leak_reduction": float(np.mean(
        [float(a["leak"]) - float(b["leak"]) for a, b in zip(van[:n_abl], dl[:n_abl])]))}}
    reqs = requests(heldout_prompts(), eval_seeds, None)[:n_abl]
    for name, cfg in ablations(chosen_cfg).items():
        abl = run(pipe, [replace(q, deleaker=True, config=cfg) for q in reqs], f"ablation {name}")
        c = compare(van[:n_abl], abl, cfg, 0.25)
        data["ablation"][name] = {k: c[k] for k in ("leak_reduction", "leak_reduction_ci95", "presence_change",
                                                    "presence_change_ci95")}
        data["ablation"][name]["deleaker"] = {k: c["deleaker"][k] for k in ("leak", "all_present", "all_recognised")}
    res.stage("per-rule ablation: " + ", ".join(f"{k} {v['leak_reduction']:+.3f}" for k, v in data["ablation"].items()
                                               if isinstance(v, dict) and "leak_reduction" in v))
    res.save()
    data["heldout_triplets"], _, _ = heldout(pipe, chosen_cfg, heldout_triplets(), triplet_seeds,
                                            "held-out triples")
    res.stage("held-out triples")
    _log_comparison("held-out triples", data["heldout_triplets"])
    res.save()
    res.stage("done")
    return 0


def _log_comparison(label: str, ev: dict) -> None:
    v, d = ev["vanilla"], ev["deleaker"]
    log.info("%s: leakage vanilla %.3f, DeLeaker %.3f; reduction %.3f %s; all present %.3f vs %.3f",
             label, v["leak"], d["leak"], ev["leak_reduction"], [round(x, 3) for x in ev["leak_reduction_ci95"]],
             v["all_present"], d["all_present"])
    ns = v["named_share"]["all"]
    if ns["n"]:
        log.info("%s: vanilla wrong values from another named entity %.1f%% of %d (prompt-blind %.0f%%, z %.1f)",
                 label, 100 * ns["share"], ns["n"], 100 * ns["chance"], ns["z"])
    o = ev["outcomes"]
    if o["leaking_vanilla"]:
        log.info("%s: of %d leaking vanilla images DeLeaker mitigates %.1f%%, degrades %.1f%% (net %+.1f points)",
                 label, o["leaking_vanilla"], 100 * o["mitigated"], 100 * o["degraded"],
                 100 * o["mitigated_minus_degraded"])


if __name__ == "__main__":
    raise SystemExit(main())
