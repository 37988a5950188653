"""Measure semantic leakage of the toy-world model, vanilla vs DeLeaker, with the exact judge.

    python -m deleaker.export.toyworld.evaluate --model export/toyworld/model --out docs/toyworld

1. judge accuracy on held-out renders (ground truth known), as rendered and after the VAE;
2. a sweep of DeLeaker settings on the sweep prompts (kind pairs in one order, sweep seeds);
3. the chosen settings vs vanilla on held-out prompts (the same pairs in the other order, which
   the sweep never saw) and held-out seeds, with bootstrap 95% intervals, the named/unnamed
   source of every wrong attribute, and where DeLeaker's masks fall; then every kind triple;
4. results.json, leakage.png (rates with intervals) and examples.png (vanilla | DeLeaker).
Every image goes through the runtime: Pipeline + the torch backend (`--backend onnxruntime`
with an exported artifact: step 3's pairs only, into results-onnxruntime.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from deleaker.runtime.config import DeLeakerConfig

from . import judge as J
from . import world
from .preset import SIZE, STEPS, TOYWORLD_PRESET

log = logging.getLogger("deleaker.toyworld")

SWEEP_SEEDS = range(10_000, 10_006)
EVAL_SEEDS = range(0, 100)
TRIPLET_SEEDS = range(0, 50)
JUDGE_CHECK_SEEDS = range(2_000_000, 2_000_300)
GRID = (SIZE // 2, SIZE // 2)  # image tokens (VAE factor 1, 2x2 packing)


def _cfg(a0: int, i0: int, k: float, smoothing: bool = True) -> DeLeakerConfig:
    """A candidate: history from block-step a0, intervention from i0, own-entity strength k,
    mask smoothing on/off; the derived stops (history to 60% of the steps, intervention to the
    end) and everything else as the authors' defaults."""
    return DeLeakerConfig(num_steps=STEPS, start_aggregating_from=a0, start_intervention_from=i0, k_strength=k,
                          do_smoothing=smoothing)


# Candidate settings (block-steps tau = step * 5 + block): windows from the first step (the
# authors' FLUX.1-dev windows, blocks 12 and 18 of 57, scaled to 5 blocks per step), from the
# second and from the third step; the authors' strength and a stronger one; smoothing on/off.
WINDOWS = {"a0=1 i0=2": (1, 2), "a0=5 i0=7": (5, 7), "a0=10 i0=12": (10, 12)}
SWEEP: dict[str, DeLeakerConfig] = {
    f"{w} k={k}{'' if sm else ' no-smoothing'}": _cfg(a0, i0, k, sm)
    for w, (a0, i0) in WINDOWS.items() for k in (1.2, 2.0) for sm in (True, False)
}


def sweep_prompts() -> list[tuple[str, str]]:
    """Kind pairs in world order (a before b); the held-out prompts are the reverse order."""
    names = [k.name for k in world.KINDS]
    return [(a, b) for a, b in world.pairs() if names.index(a) < names.index(b)]


def heldout_prompts() -> list[tuple[str, str]]:
    names = [k.name for k in world.KINDS]
    return [(a, b) for a, b in world.pairs() if names.index(a) > names.index(b)]


def heldout_triplets() -> list[tuple[str, str, str]]:
    """Every set of three kinds once, named in reverse world order ("a badge, a kite and a tent")."""
    names = [k.name for k in world.KINDS][::-1]
    return list(itertools.combinations(names, 3))


def requests(pairs, seeds, config: DeLeakerConfig | None):
    """One GenerateRequest per (pair, seed); config None = vanilla (plain attention)."""
    from deleaker.runtime.pipeline import GenerateRequest

    return [GenerateRequest(prompt=world.caption_for(p), entities=tuple(p), seed=s, steps=STEPS, height=SIZE,
                            width=SIZE, deleaker=config is not None, config=config)
            for p in pairs for s in seeds]


def wrong_attributes(verdict: dict, entities) -> list[tuple[str, bool]]:
    """(attribute, named) for every attribute a present entity's object shows wrongly: named when
    the value shown belongs to another entity of the prompt (a leak), else to a kind the prompt
    does not name. With 2 of 5 kinds named and errors blind to the prompt, 1 in 4 would be named."""
    all_kinds = [k.name for k in world.KINDS]
    out = []
    for e, info in verdict["entities"].items():
        if not info["present"]:
            continue
        shown = {a: verdict["objects"][info["object"]][a] for a in world.ATTRIBUTES}
        out += [(a, src in entities) for a, src in world.leaked_attributes(e, shown, all_kinds)]
    return out


def object_tokens(image: np.ndarray) -> np.ndarray:
    """[I] bool: image tokens (2x2 pixel patches) that touch an object."""
    h, w = GRID
    return J.foreground(image).reshape(h, 2, w, 2).any(axis=(1, 3)).reshape(-1)


def mask_on_objects(result, objects: np.ndarray) -> float | None:
    """Fraction of the entity-mask tokens (the final history's masks, smoothed as configured)
    that lie on `objects` ([I] bool, object_tokens of the image); None for vanilla or an empty mask."""
    import torch

    from deleaker.export.reference_op import entity_masks, smooth_masks

    cfg = result.request.config
    if not result.request.deleaker or cfg is None:
        return None
    hist = torch.from_numpy(np.asarray(result.history[:len(result.request.entities)], np.float32))  # [E, I]
    masks = entity_masks(hist, cfg.std_mul_text)
    if cfg.do_smoothing:
        masks = smooth_masks(masks, *GRID)
    m = masks.numpy().any(axis=0)  # [I]
    return float(objects[m].mean()) if m.any() else None


def run(pipe, reqs) -> list[dict]:
    """Generate and judge; one record per request."""
    out = []
    for r in pipe.generate(reqs):
        v = J.judge(r.image, r.request.entities)
        objects = object_tokens(r.image)
        out.append({"prompt": r.request.prompt, "seed": r.request.seed, "image": r.image,
                    "leak": v["leak"], "all_present": v["all_present"], "all_recognised": v["all_recognised"],
                    "leaks": v["leaks"], "wrong": wrong_attributes(v, r.request.entities),
                    "object_share": float(objects.mean()), "mask_on_objects": mask_on_objects(r, objects)})
    return out


def rate(records, key) -> float:
    return float(np.mean([r[key] for r in records])) if records else float("nan")


def bootstrap(values, n: int = 4000, seed: int = 0) -> list[float]:
    """95% percentile interval of the mean of `values` (paired differences included)."""
    v = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n, len(v)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def summary(records, with_ci: bool = False) -> dict:
    """Rates (with bootstrap intervals if asked) of leakage, presence and recognition; leakage
    also per attribute (images with at least one leak of that attribute)."""
    s = {"n": len(records)}
    for key in ("leak", "all_present", "all_recognised"):
        s[key] = rate(records, key)
        if with_ci:
            s[key + "_ci95"] = bootstrap([r[key] for r in records])
    attrs = {a: 0 for a in world.ATTRIBUTES}
    for r in records:
        for _, a, _ in r["leaks"]:
            attrs[a] += 1
    s["leaked_attributes"] = attrs
    # wrong attribute values by where they come from: another named entity vs an unnamed kind
    wrong = Counter(w for r in records for w in r["wrong"])  # (attribute, named) -> count
    s["wrong_attributes"] = {a: {"named": wrong[a, True], "unnamed": wrong[a, False]} for a in world.ATTRIBUTES}
    on = [r["mask_on_objects"] for r in records if r["mask_on_objects"] is not None]
    if on:  # DeLeaker runs: where its masks fall, against the objects' share of the image
        s["mask_on_objects"] = float(np.mean(on))
        s["image_on_objects"] = float(np.mean([r["object_share"] for r in records]))
    for a in world.ATTRIBUTES:
        flags = [any(x[1] == a for x in r["leaks"]) for r in records]
        s[f"leak_{a}"] = float(np.mean(flags)) if flags else float("nan")
        if with_ci:
            s[f"leak_{a}_ci95"] = bootstrap(flags)
    return s


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
                    hits[a] += match[0][a] == world.KIND_BY_NAME[p.kind].attribute(a)
    return {"scenes": len(JUDGE_CHECK_SEEDS), "objects": n, "found": found / n,
            **{a: hits[a] / n for a in world.ATTRIBUTES}, "scenes_all_recognised": clean / len(JUDGE_CHECK_SEEDS),
            "scenes_false_leak": leaks / len(JUDGE_CHECK_SEEDS)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = results["heldout"]
    keys = [("leak", "leakage"), ("all_present", "all entities present"), ("all_recognised", "all recognised, no leak")]
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


def example_grid(vanilla, deleaker, path: Path, n: int = 8, scale: int = 4) -> None:
    """Rows: prompt-seed pairs; columns: vanilla | DeLeaker, each upscaled `scale`x, captioned and
    tagged leak / recognised (all entities, every attribute) / present / missing."""
    from PIL import Image, ImageDraw

    s = SIZE * scale
    pad, text_h = 4, 14
    row_h = text_h + s + text_h + pad  # caption, images, tags
    picks = list(range(0, len(vanilla), max(1, len(vanilla) // n)))[:n]
    W, H = 2 * s + 3 * pad, text_h + len(picks) * row_h + pad
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
            tag = ("leak" if rec["leak"] else "recognised" if rec["all_recognised"] else "present"
                   if rec["all_present"] else "missing")
            d.text((pad + col * (s + pad), top + text_h + s + 1), tag, fill=(200, 0, 0) if rec["leak"] else (0, 0, 0))
    grid.save(path)


PRESENCE_SLACK = 0.05


def choose(sweep: dict, vanilla: dict) -> str:
    """The lowest-leakage setting whose all-entities-present rate is within PRESENCE_SLACK of
    vanilla's (so leakage does not fall just because objects vanish); if none qualifies, the
    one with the highest presence minus leakage."""
    ok = [k for k, v in sweep.items() if v["all_present"] >= vanilla["all_present"] - PRESENCE_SLACK]
    if ok:
        return min(ok, key=lambda k: (sweep[k]["leak"], -sweep[k]["all_present"]))
    return max(sweep, key=lambda k: sweep[k]["all_present"] - sweep[k]["leak"])


def heldout(pipe, config: DeLeakerConfig, hp=None, seeds=EVAL_SEEDS) -> tuple[dict, list, list]:
    """Vanilla and `config` on held-out prompts (default: the reversed pairs) and seeds: summary
    dict, both record lists."""
    hp = heldout_prompts() if hp is None else hp
    van = run(pipe, requests(hp, seeds, None))
    dl = run(pipe, requests(hp, seeds, config))
    diff = [float(a["leak"]) - float(b["leak"]) for a, b in zip(van, dl)]
    res = {"prompts": [world.caption_for(p) for p in hp], "seeds": list(seeds), "config": asdict(config),
           "vanilla": summary(van, True), "deleaker": summary(dl, True),
           "leak_reduction": float(np.mean(diff)), "leak_reduction_ci95": bootstrap(diff),
           "per_sample": [{"prompt": a["prompt"], "seed": a["seed"], "vanilla_leak": a["leak"],
                           "deleaker_leak": b["leak"], "vanilla_all_present": a["all_present"],
                           "deleaker_all_present": b["all_present"]} for a, b in zip(van, dl)]}
    return res, van, dl


def agreement(per_sample: list[dict], reference: list[dict]) -> dict:
    """Fraction of held-out samples whose flags equal those of another run (e.g. torch vs onnxruntime)."""
    keys = ("vanilla_leak", "deleaker_leak", "vanilla_all_present", "deleaker_all_present")
    ref = {(r["prompt"], r["seed"]): r for r in reference}
    same = [all(a[k] == ref[(a["prompt"], a["seed"])][k] for k in keys) for a in per_sample]
    return {"samples": len(same), "all_flags_equal": float(np.mean(same))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deleaker.export.toyworld.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=Path(__file__).parent / "model",
                    help="model folder (torch backend) or exported artifact (other backends)")
    ap.add_argument("--backend", default="torch", help="runtime backend: torch runs the sweep and the held-out "
                    "set; any other (onnxruntime) runs the held-out set with the preset, into results-BACKEND.json")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and the figures")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-batch", type=int, default=8)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from deleaker.runtime.errors import run_reporting_errors

    return run_reporting_errors(ap.prog, lambda: _evaluate(args, argv))


def _evaluate(args, argv) -> int:
    import torch

    from deleaker.runtime.backends import load_backend
    from deleaker.runtime.pipeline import Pipeline

    torch.set_num_threads(args.threads)
    t0 = time.time()
    results: dict = {"command": "python -m deleaker.export.toyworld.evaluate " + " ".join(argv or sys.argv[1:]),
                     "backend": args.backend, "steps": STEPS, "size": SIZE}
    pipe = Pipeline(load_backend(args.backend, str(args.model), progress=False), config=TOYWORLD_PRESET,
                    max_batch=args.max_batch)
    args.out.mkdir(parents=True, exist_ok=True)  # after the model loaded: a bad --model leaves nothing
    if args.backend != "torch":
        results["heldout"], _, _ = heldout(pipe, TOYWORLD_PRESET)
        results["seconds"] = round(time.time() - t0, 1)
        torch_json = args.out / "results.json"
        if torch_json.exists():
            results["agreement_with_torch"] = agreement(results["heldout"]["per_sample"],
                                                        json.loads(torch_json.read_text())["heldout"]["per_sample"])
        (args.out / f"results-{args.backend}.json").write_text(json.dumps(results, indent=1) + "\n")
        _log_heldout(results)
        return 0

    results["judge_accuracy"] = judge_accuracy()
    log.info("judge accuracy on held-out renders: %s", results["judge_accuracy"])
    results["judge_accuracy_vae"] = judge_accuracy(vae_round_trip(args.model))
    log.info("judge accuracy on the same renders after the VAE round trip: %s", results["judge_accuracy_vae"])
    sp = sweep_prompts()
    results["sweep_set"] = {"prompts": [world.caption_for(p) for p in sp], "seeds": list(SWEEP_SEEDS)}
    base = run(pipe, requests(sp, SWEEP_SEEDS, None))
    sweep = {"vanilla": summary(base)}
    log.info("sweep vanilla: %s", sweep["vanilla"])
    for name, cfg in SWEEP.items():
        sweep[name] = {**summary(run(pipe, requests(sp, SWEEP_SEEDS, cfg))), "config": asdict(cfg)}
        log.info("sweep %s: %s (%.0fs)", name, {k: sweep[name][k] for k in ("leak", "all_present", "all_recognised")},
                 time.time() - t0)
    best = choose({k: v for k, v in sweep.items() if k != "vanilla"}, sweep["vanilla"])
    results["sweep"] = sweep
    results["chosen"] = best
    chosen_cfg = SWEEP[best]
    if chosen_cfg != TOYWORLD_PRESET:
        log.warning("the sweep chose %s, which differs from preset.TOYWORLD_PRESET: update the preset", best)
    results["preset_matches_sweep"] = chosen_cfg == TOYWORLD_PRESET
    results["heldout"], van, dl = heldout(pipe, chosen_cfg)
    # three entities: every kind triple, with the same preset (not swept on triples)
    results["heldout_triplets"], _, _ = heldout(pipe, chosen_cfg, heldout_triplets(), TRIPLET_SEEDS)
    log.info("held-out triplets: vanilla leak %.3f, DeLeaker leak %.3f, reduction %.3f %s",
             results["heldout_triplets"]["vanilla"]["leak"], results["heldout_triplets"]["deleaker"]["leak"],
             results["heldout_triplets"]["leak_reduction"], results["heldout_triplets"]["leak_reduction_ci95"])
    results["seconds"] = round(time.time() - t0, 1)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.out / "leakage.png")
    example_grid(van, dl, args.out / "examples.png")
    _log_heldout(results)
    return 0


def _log_heldout(results: dict) -> None:
    ev = results["heldout"]
    log.info("held-out (%s): vanilla leak %.3f %s, DeLeaker leak %.3f %s, reduction %.3f %s; presence %.3f vs %.3f",
             results["backend"], ev["vanilla"]["leak"], ev["vanilla"]["leak_ci95"], ev["deleaker"]["leak"],
             ev["deleaker"]["leak_ci95"], ev["leak_reduction"], ev["leak_reduction_ci95"],
             ev["vanilla"]["all_present"], ev["deleaker"]["all_present"])
    if "agreement_with_torch" in results:
        log.info("flags equal to the torch backend's on %.1f%% of %d samples",
                 100 * results["agreement_with_torch"]["all_flags_equal"], results["agreement_with_torch"]["samples"])


if __name__ == "__main__":
    raise SystemExit(main())
