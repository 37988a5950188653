"""The toy world's exact judge (deleaker.toyworld.judge) as a `deleaker eval` judge, on a run made
with the toy model. Registered under the name "toyworld" through the `deleaker.judges` entry point
(pyproject.toml), so that eval, a lower layer, never imports the toy world.

toyworld.judge.judge(image [H, W, 3] uint8, entities) -> dict is called on both images; its
dicts are kept. The outcome compares the number of leaks (len(dict["leaks"]): attribute values of
one named entity shown by another; lower is better):
  fewer in DeLeaker -> mitigation: major when none is left, else minor;
  more in DeLeaker  -> degradation: major when vanilla had none, else minor;
  equal             -> no change.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deleaker.eval.judges.base import Judge, JudgeUnavailable, outcome
from deleaker.eval.store import RunDir


class ToyWorldJudge(Judge):
    name = "toyworld"

    def __init__(self, options):
        super().__init__(options)
        try:  # the judge needs scipy, which only the export/bench extras bring
            from .judge import judge
        except ImportError as e:
            raise JudgeUnavailable(f"judge 'toyworld' needs deleaker.toyworld.judge, which does not import here ({e})") from e
        self.fn = judge

    def judge_item(self, item: dict, run: RunDir) -> dict:
        rec: dict = {}
        for variant in ("vanilla", "deleaker"):
            image = np.asarray(Image.open(run.root / item[variant]).convert("RGB"))  # [H, W, 3] uint8
            rec[variant] = self.fn(image, list(item["entities"]))
        leaks = [rec[v].get("leaks") if isinstance(rec[v], dict) else None for v in ("vanilla", "deleaker")]
        if not all(isinstance(x, list) for x in leaks):
            return {**rec, "status": "unparseable", "error": "the toy-world judge gave no 'leaks' list"}
        return {**rec, "status": "ok", "outcome": outcome(len(leaks[0]), len(leaks[1]))}
