"""The toy world's exact judge (deleaker.benchmarks.toyworld.judge), on a run made with the toy model.

toyworld.judge.judge(image [H, W, 3] uint8, entities) -> dict is called on both images; its
dicts are kept. The outcome compares the number of leaks (len(dict["leaks"]): attribute values of
one named entity shown by another; lower is better):
  fewer in DeLeaker -> mitigation: major when none is left, else minor;
  more in DeLeaker  -> degradation: major when vanilla had none, else minor;
  equal             -> no change.
"""

from __future__ import annotations

import importlib
import numpy as np
from PIL import Image

from ..store import RunDir
from .base import Judge, JudgeUnavailable

MODULE = "deleaker.benchmarks.toyworld.judge"


def outcome(vanilla: float, deleaker: float) -> str:
    if deleaker < vanilla:
        return "mitigation_major" if deleaker == 0 else "mitigation_minor"
    if deleaker > vanilla:
        return "degradation_major" if vanilla == 0 else "degradation_minor"
    return "no_change"


class ToyWorldJudge(Judge):
    name = "toyworld"

    def __init__(self, options):
        super().__init__(options)
        try:
            self.fn = importlib.import_module(MODULE).judge
        except (ImportError, AttributeError) as e:
            raise JudgeUnavailable(f"judge 'toyworld' needs {MODULE}.judge, which is not available here ({e})") from e

    def judge_item(self, item: dict, run: RunDir) -> dict:
        rec: dict = {}
        for variant in ("vanilla", "deleaker"):
            image = np.asarray(Image.open(run.root / item[variant]).convert("RGB"))  # [H, W, 3] uint8
            rec[variant] = self.fn(image, list(item["entities"]))
        leaks = [rec[v].get("leaks") if isinstance(rec[v], dict) else None for v in ("vanilla", "deleaker")]
        if not all(isinstance(x, list) for x in leaks):
            return {**rec, "status": "unparseable", "error": "the toy-world judge gave no 'leaks' list"}
        return {**rec, "status": "ok", "outcome": outcome(len(leaks[0]), len(leaks[1]))}
