"""The held-out report of a toy-world evaluation: per-image scores and their statistics.

Per image (`score`): leak, clean (every entity present with every attribute right, hence no leak),
all present, per-attribute fidelity (of the named entities' attribute values, the share the
image shows right: each entity is matched one-to-one to the object agreeing with it most, with no
minimum, so fidelity does not depend on the presence rule; an entity left without an object
counts its three values as wrong), mixing (some object shows a value of one named entity and a value
of another, whatever the presence rule says) and a tag for the transition table.

Intervals (`Clusters`, eval/stats.py): held-out images are a grid of prompts x noise seeds, and
every prompt at one seed starts from the same noise, so the images are not independent draws.
Every interval here is the two-way cluster bootstrap over prompts and seeds. Paired differences
(DeLeaker - vanilla on the same prompt and seed) are resampled the same way.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np

from deleaker.eval.judges.base import OUTCOMES
from deleaker.eval.stats import Clusters

from . import world

TAGS = ("clean", "leak", "missing", "flawed")  # flawed: every entity present, no leak, some value wrong


def tag(rec: dict) -> str:
    """leak (some present entity shows another's value) / missing (an entity absent, no leak) /
    clean (every attribute right) / flawed (present, no leak, a value nobody named)."""
    if rec["leak"]:
        return "leak"
    if not rec["all_present"]:
        return "missing"
    return "clean" if rec["clean"] else "flawed"


def score(verdict: dict, things) -> dict:
    """Per-image scores from a judge verdict for the named `things` (world.Thing, prompt order)."""
    right = {a: 0 for a in world.ATTRIBUTES}
    for t, obj in zip(things, best_objects(verdict["objects"], things)):
        if obj is not None:
            for a in world.ATTRIBUTES:
                right[a] += obj[a] == t.attribute(a)
    mixed = False
    if len(things) > 1:
        for obj in verdict["objects"]:
            owners = {i for i, t in enumerate(things) for a in world.ATTRIBUTES if obj[a] == t.attribute(a)}
            mixed |= len(owners) > 1
    rec = {"clean": bool(verdict["all_recognised"] and not verdict["leak"]), "right": right,
           "named": len(things), "mixed": mixed, "leak": verdict["leak"], "all_present": verdict["all_present"]}
    rec["tag"] = tag(rec)
    return rec


def best_objects(objects: list[dict], things) -> list[dict | None]:
    """Each entity's object, one-to-one, maximising the number of attribute values that agree (no
    minimum agreement, unlike the judge's presence rule); None where there are fewer objects."""
    def agree(o, t):
        return sum(o[a] == t.attribute(a) for a in world.ATTRIBUTES)

    best, best_score = [None] * len(things), -1
    for perm in itertools.permutations(range(len(objects)), min(len(objects), len(things))):
        for slots in itertools.permutations(range(len(things)), len(perm)):
            score = sum(agree(objects[o], things[i]) for o, i in zip(perm, slots))
            if score > best_score:
                best, best_score = [None] * len(things), score
                for o, i in zip(perm, slots):
                    best[i] = objects[o]
    return best


def fidelity(rec: dict, attr: str) -> float:
    """Share of the named entities' `attr` values the image shows right."""
    return rec["right"][attr] / rec["named"]


METRICS = {  # name -> per-image value
    "leak": lambda r: float(r["leak"]),
    "clean": lambda r: float(r["clean"]),
    "all_present": lambda r: float(r["all_present"]),
    "mixing": lambda r: float(r["mixed"]),
    **{f"fidelity_{a}": (lambda r, a=a: fidelity(r, a)) for a in world.ATTRIBUTES},
    "all_right": lambda r: float(all(r["right"][a] == r["named"] for a in world.ATTRIBUTES)),
}


def rates(records: list[dict], clusters: Clusters) -> dict:
    """Every METRICS rate with its 95% interval."""
    out = {}
    for name, f in METRICS.items():
        v = [f(r) for r in records]
        out[name] = float(np.mean(v))
        out[name + "_ci95"] = clusters.ci(v)
    return out


def named_share(records: list[dict], clusters: Clusters) -> dict:
    """Of the wrong attribute values of present entities (records' 'wrong': (attribute, named)), the
    share that is another named entity's, against the prompt-blind share (E - 1 of an attribute's 4
    wrong values are named), with a clustered standard error and z."""
    named = [sum(1 for _, n in r["wrong"] if n) for r in records]
    wrong = [len(r["wrong"]) for r in records]
    out = clusters.ratio(named, wrong)
    out["chance"] = (records[0]["named"] - 1) / 4 if records else None
    out["n"] = int(sum(wrong))
    out["z"] = (out["share"] - out["chance"]) / out["se"] if out["share"] is not None and out["se"] else None
    return out


def transitions(van: list[dict], dl: list[dict]) -> dict:
    """{vanilla tag: {DeLeaker tag: count}} over paired images."""
    c = Counter((a["tag"], b["tag"]) for a, b in zip(van, dl))
    return {t: {u: c[t, u] for u in TAGS} for t in TAGS}


def paired(van: list[dict], dl: list[dict], clusters: Clusters) -> dict:
    """DeLeaker - vanilla for every METRICS rate, with 95% intervals (paired on prompt and seed)."""
    out = {}
    for name, f in METRICS.items():
        d = [f(b) - f(a) for a, b in zip(van, dl)]
        out[name] = {"change": float(np.mean(d)), "ci95": clusters.ci(d)}
    return out


def full(van: list[dict], dl: list[dict], outcomes: dict) -> dict:
    """The held-out report: rates of both arms, paired changes, the transition table and the paper's
    outcome categories among leaking vanilla images (`outcomes`, evaluate.outcomes)."""
    for a, b in zip(van, dl):
        if (a["prompt"], a["seed"]) != (b["prompt"], b["seed"]):
            raise ValueError("vanilla and DeLeaker records must be paired on (prompt, seed)")
    cl = Clusters(van)
    return {"intervals": cl.describe(), "pairs": len(van), "prompts": cl.prompts, "seeds": cl.seeds,
            "vanilla": rates(van, cl), "deleaker": rates(dl, cl), "change": paired(van, dl, cl),
            "named_share": {"vanilla": named_share(van, cl), "deleaker": named_share(dl, cl)},
            "transitions": transitions(van, dl), "outcomes": outcomes,
            "outcome_names": list(OUTCOMES)}
