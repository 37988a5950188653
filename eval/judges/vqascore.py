"""VQAScore through the chat endpoint: P("yes") to 'Does this image show "{prompt}"?', per image.

The probability comes from the first answer token's top logprobs (the endpoint must return
logprobs: vLLM and SGLang do). Both images of a pair are scored; the report shows DeLeaker's
(the paper's column) and vanilla's. Calls per item: 2.
"""

from __future__ import annotations

from ..client import ChatClient, image_part, text_part
from ..store import RunDir
from .base import Judge, JudgeUnavailable, load_prompt


class VQAScoreJudge(Judge):
    name = "vqascore"
    needs_endpoint = True

    def __init__(self, options):
        super().__init__(options)
        if options.endpoint is None:
            raise JudgeUnavailable("judge 'vqascore' needs --endpoint and --model (a server returning logprobs)")
        self.client = ChatClient(options.endpoint)
        self.template = load_prompt(options.prompts, "vqascore")

    def judge_item(self, item: dict, run: RunDir) -> dict:
        rec: dict = {"prompt_version": self.options.prompts}
        question = text_part(self.template.substitute(prompt=item["prompt"]))
        for variant in ("vanilla", "deleaker"):
            ans = self.client.yes_probability([image_part(run.root / item[variant]), question])
            if ans.status != "ok":
                return {**rec, **ans.record(), "failed_step": variant}
            rec[variant] = ans.value
        return {**rec, "status": "ok"}
