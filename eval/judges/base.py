"""Judge registry and the driver that judges a run's items with a bounded pool of workers.

A judge is a class with `name`, `needs_endpoint`, a constructor taking JudgeOptions, and
`judge_item(item, run) -> dict` returning at least {"status": "ok" | "unparseable" | "error"};
"outcome" (one of OUTCOMES) when it classifies the pair. Judges are imported only when asked for,
so a judge's libraries (openai, torch, the toy world) are needed only by that judge.
"""

from __future__ import annotations

import importlib
import logging
import string
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from tqdm.auto import tqdm

from ..client import EndpointConfig
from ..store import RunDir, append_jsonl

log = logging.getLogger("deleaker.eval")

# The paper's five outcomes for DeLeaker vs vanilla, best first.
OUTCOMES = ("mitigation_major", "mitigation_minor", "no_change", "degradation_minor", "degradation_major")
PROMPTS = Path(__file__).resolve().parent.parent / "prompts"

# name -> "module:Class", imported only when that judge is asked for; packages above eval (the
# toy world's exact judge) add theirs through the `deleaker.judges` entry point group
JUDGES: dict[str, str] = {
    "paper": "deleaker.eval.judges.paper:PaperJudge",
    "vqascore": "deleaker.eval.judges.vqascore:VQAScoreJudge",
    "lpips": "deleaker.eval.judges.lpips:LpipsJudge",
    **{ep.name: ep.value for ep in entry_points(group="deleaker.judges")},
}


def outcome(vanilla: float, deleaker: float) -> str:
    """The paper's category from a count of leaks (or any error count; lower is better) per image."""
    if deleaker < vanilla:
        return "mitigation_major" if deleaker == 0 else "mitigation_minor"
    if deleaker > vanilla:
        return "degradation_major" if vanilla == 0 else "degradation_minor"
    return "no_change"


class JudgeUnavailable(ValueError):
    """This judge cannot run here (missing library, weights or module); the message says what."""


@dataclass(frozen=True)
class JudgeOptions:
    endpoint: EndpointConfig | None = None
    prompts: str = "v1"  # folder under prompts/
    lpips_weights: str | None = None  # local folder with LPIPS (AlexNet) weights


class Judge:
    name = ""
    needs_endpoint = False
    reads_references = False  # whether it looks at the run's reference images (`eval run` makes them only then)

    def __init__(self, options: JudgeOptions):
        self.options = options

    def judge_item(self, item: dict, run: RunDir) -> dict:
        raise NotImplementedError


def register(name: str, target: str) -> None:
    """Add a judge: target is "module:Class"."""
    JUDGES[name] = target


def get_judge(name: str):
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; available: {', '.join(sorted(JUDGES))}")
    module, _, attr = JUDGES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_prompt(version: str, name: str) -> string.Template:
    path = PROMPTS / version / f"{name}.txt"
    if not path.exists():
        raise ValueError(f"prompt {name!r} of version {version!r} not found ({path})")
    return string.Template(path.read_text(encoding="utf-8"))


def judge_run(run: RunDir, judge: Judge, concurrency: int = 4, progress: bool = True, retry: bool = True) -> dict:
    """Judge every generated item not judged yet; returns counts by status.

    Items whose last judgment is an "error" (the call failed) are judged again; "ok" and
    "unparseable" (a real answer that did not parse) are kept.
    """
    items = [e for e in run.items().values() if e["status"] == "ok"]
    done = run.judged(judge.name)
    todo = [e for e in items if e["id"] not in done or (retry and done[e["id"]]["status"] == "error")]
    counts = {"ok": 0, "unparseable": 0, "error": 0, "skipped": len(items) - len(todo)}
    log.info("judge %s: %d item(s), %d judged before, %d to judge", judge.name, len(items), counts["skipped"],
             len(todo))
    out = run.judgment_file(judge.name)
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        futures = {pool.submit(_safe_judge, judge, e, run): e for e in todo}
        bar = tqdm(as_completed(futures), total=len(futures), desc=f"judge {judge.name}", unit="item",
                   disable=not progress)
        for fut in bar:  # results are written from this thread only, as they complete
            item = futures[fut]
            rec = {"id": item["id"], "judge": judge.name, **fut.result()}
            append_jsonl(out, rec)
            counts[rec["status"]] += 1
            if rec["status"] != "ok":
                log.warning("judge %s, item %s: %s (%s)", judge.name, item["id"], rec["status"],
                            rec.get("error", ""))
    return counts


def _safe_judge(judge: Judge, item: dict, run: RunDir) -> dict:
    try:
        rec = judge.judge_item(item, run)
    except (OSError, ValueError) as e:  # unreadable image, bad item: this item only
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}
    if rec.get("status") not in ("ok", "unparseable", "error"):
        raise RuntimeError(f"judge {judge.name} returned status {rec.get('status')!r}")
    return rec
