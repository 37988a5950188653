"""Confidence intervals that respect how samples were drawn: the one bootstrap of the project.

Images of a leakage measurement are a grid of prompts x noise seeds: images sharing a prompt, or a
seed, are not independent draws. `Clusters` is the two-way cluster bootstrap (the "pigeonhole"
bootstrap): each replicate draws the prompts with replacement and, independently, the seeds with
replacement, and counts every record of a drawn prompt and a drawn seed once per draw of each
(weight = prompt count x seed count). With every record at one seed it resamples prompts (with
all their records); with one record per prompt and one seed it is the plain percentile bootstrap
over records. Used by `deleaker eval report` and the toy world's report.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000  # replicates


class Clusters:
    """Two-way cluster bootstrap weights for records with 'prompt' and 'seed' (see the module doc)."""

    def __init__(self, records: list[dict], n: int = BOOTSTRAP, seed: int = 0):
        """records: dicts with 'prompt' and 'seed' (any hashable values)."""
        _, p = np.unique([r["prompt"] for r in records], return_inverse=True)
        _, s = np.unique([r["seed"] for r in records], return_inverse=True)
        rng = np.random.default_rng(seed)
        P, S = p.max() + 1, s.max() + 1
        wp = rng.multinomial(P, np.full(P, 1.0 / P), size=n)  # [n, P] draws of each prompt
        ws = rng.multinomial(S, np.full(S, 1.0 / S), size=n)  # [n, S] draws of each seed
        w = (wp[:, p] * ws[:, s]).astype(np.float64)  # [n, N] weight of each record per replicate
        keep = w.sum(axis=1) > 0  # a replicate that drew no existing (prompt, seed) pair says nothing
        self.w = w[keep] / w[keep].sum(axis=1, keepdims=True)
        self.prompts, self.seeds, self.n = int(P), int(S), len(records)

    def ci(self, values) -> list[float]:
        means = self.w @ np.asarray(values, np.float64)
        return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]

    def ratio(self, num, den) -> dict:
        """sum(num) / sum(den) (e.g. named wrong values over all wrong values) with its 95% interval
        and its bootstrap standard error."""
        num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
        if den.sum() == 0:
            return {"share": None, "ci95": None, "se": None}
        wd = self.w @ den
        reps = (self.w @ num)[wd > 0] / wd[wd > 0]
        return {"share": float(num.sum() / den.sum()), "ci95": [float(np.percentile(reps, 2.5)),
                                                                 float(np.percentile(reps, 97.5))],
                "se": float(reps.std(ddof=1))}

    def describe(self) -> str:
        return (f"two-way cluster bootstrap over {self.prompts} prompts and {self.seeds} seeds "
                f"({len(self.w)} replicates)")
