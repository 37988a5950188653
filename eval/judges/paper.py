"""The paper's VLM protocol for one pair (vanilla, DeLeaker) of the same prompt and seed.

1. Visual differences between the entities: once from the prompt alone, once from the reference
   images; the two lists are merged (duplicates dropped).
2. One typicality question per entity per image, guided by that list.
3. One comparison of the two images (image 1 = vanilla, image 2 = DeLeaker) given the findings:
   which shows less leakage, and whether the difference is minor or major.
Calls per item: 2 + 2 * (number of entities) + 1 (7 for two entities, 9 for three).
A step that fails or whose answer does not parse ends the item with that status (later steps
depend on it); the raw answer is kept.
"""

from __future__ import annotations

from ..client import ChatClient, image_part, text_part
from ..store import RunDir
from .base import Judge, JudgeUnavailable, load_prompt

VERDICTS = {
    "image_2_much_better": "mitigation_major",
    "image_2_slightly_better": "mitigation_minor",
    "same": "no_change",
    "image_1_slightly_better": "degradation_minor",
    "image_1_much_better": "degradation_major",
}
VARIANTS = ("vanilla", "deleaker")


def differences_schema(entities: list[str]) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["differences"], "properties": {
        "differences": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["entity", "feature"],
            "properties": {"entity": {"type": "string", "enum": list(entities)}, "feature": {"type": "string"}}}}}}


TYPICALITY_SCHEMA = {"type": "object", "additionalProperties": False,
                     "required": ["present", "typical", "borrowed_features", "reason"], "properties": {
                         "present": {"type": "boolean"}, "typical": {"type": "boolean"},
                         "borrowed_features": {"type": "array", "items": {"type": "string"}},
                         "reason": {"type": "string"}}}
VERDICT_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["verdict", "reason"], "properties": {
    "verdict": {"type": "string", "enum": list(VERDICTS)}, "reason": {"type": "string"}}}


def merge_differences(*lists: list[dict]) -> list[dict]:
    """Union in order, dropping repeats (same entity, same feature up to case/spaces)."""
    seen, out = set(), []
    for lst in lists:
        for d in lst:
            key = (d["entity"].lower(), " ".join(d["feature"].lower().split()))
            if key not in seen:
                seen.add(key)
                out.append({"entity": d["entity"], "feature": d["feature"]})
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class PaperJudge(Judge):
    name = "paper"
    needs_endpoint = True
    reads_references = True  # its "differences from the reference images" question

    def __init__(self, options):
        super().__init__(options)
        if options.endpoint is None:
            raise JudgeUnavailable("judge 'paper' needs --endpoint and --model (an OpenAI-compatible VLM server)")
        self.client = ChatClient(options.endpoint)
        v = options.prompts
        self.t_diff_prompt = load_prompt(v, "differences_prompt")
        self.t_diff_refs = load_prompt(v, "differences_references")
        self.t_typical = load_prompt(v, "typicality")
        self.t_verdict = load_prompt(v, "verdict")

    def judge_item(self, item: dict, run: RunDir) -> dict:
        ents, prompt = item["entities"], item["prompt"]
        rec: dict = {"prompt_version": self.options.prompts, "calls": 0}

        def fail(step: str, ans) -> dict:
            return {**rec, "status": ans.status, "failed_step": step, **{k: v for k, v in ans.record().items()
                                                                           if k != "status"}}

        # 1. differences, from the prompt and from the reference images
        missing = [e for e in ents if e not in item.get("refs", {})]
        if missing:
            raise ValueError(f"item {item['id']} has no reference image of {missing[0]!r}: the run was made for "
                             "judges that read none; `deleaker eval run --judge paper` on the same folder adds them")
        fields = {"prompt": prompt, "entities": ", ".join(ents)}
        schema = differences_schema(ents)
        lists = []
        for step, parts in (
                ("differences_prompt", [text_part(self.t_diff_prompt.substitute(fields))]),
                ("differences_references", [*(image_part(run.root / item["refs"][e]) for e in ents),
                                            text_part(self.t_diff_refs.substitute(fields))])):
            ans = self.client.ask_json(parts, "differences", schema)
            rec["calls"] += 1
            if ans.status != "ok":
                return fail(step, ans)
            lists.append(ans.value["differences"])
        diffs = merge_differences(*lists)
        rec["differences"] = diffs
        features = "\n".join(f"- {d['entity']}: {d['feature']}" for d in diffs) or "- (none listed)"

        # 2. typicality of each entity in each image
        rec["typicality"] = {}
        for variant in VARIANTS:
            img = image_part(run.root / item[variant])
            rec["typicality"][variant] = {}
            for e in ents:
                others = _join([o for o in ents if o != e])
                text = self.t_typical.substitute(prompt=prompt, entity=e, article=_article(e), others=others,
                                                 features=features)
                ans = self.client.ask_json([img, text_part(text)], "typicality", TYPICALITY_SCHEMA)
                rec["calls"] += 1
                if ans.status != "ok":
                    return fail(f"typicality_{variant}_{e}", ans)
                rec["typicality"][variant][e] = ans.value

        # 3. which image is better, minor or major
        lines = []
        for n, variant in enumerate(VARIANTS, 1):
            for e in ents:
                t = rec["typicality"][variant][e]
                state = "missing" if not t["present"] else "typical" if t["typical"] else \
                    "shows " + (", ".join(t["borrowed_features"]) or "features of other entities")
                lines.append(f"- image {n}, {e}: {state}")
        text = self.t_verdict.substitute(prompt=prompt, entities=", ".join(ents), findings="\n".join(lines))
        ans = self.client.ask_json([image_part(run.root / item["vanilla"]), image_part(run.root / item["deleaker"]),
                                    text_part(text)], "verdict", VERDICT_SCHEMA)
        rec["calls"] += 1
        if ans.status != "ok":
            return fail("verdict", ans)
        return {**rec, "status": "ok", "outcome": VERDICTS[ans.value["verdict"]], "verdict": ans.value}
