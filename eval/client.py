"""An OpenAI-compatible chat endpoint (vLLM, SGLang, llama.cpp server, hosted APIs) via the openai client.

Timeouts and retries with exponential backoff (on connection errors, timeouts, 408/409/429/5xx)
are the openai client's own; concurrency is bounded by the callers' thread pool (judges/base.py).
Answers are parsed strictly: JSON (optionally inside one ```json fence) that matches the
question's schema, else the answer is recorded as unparseable with its raw text.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("deleaker.eval")


@dataclass(frozen=True)
class EndpointConfig:
    endpoint: str  # base URL, e.g. http://127.0.0.1:8000/v1
    model: str
    api_key_env: str | None = None  # name of the environment variable holding the key (None: no key)
    timeout: float = 120.0  # seconds per call
    retries: int = 3  # extra attempts after a failed call (backoff 0.5 s, 1 s, 2 s, ... up to 8 s)
    concurrency: int = 4  # items judged at once
    structured: bool = True  # send response_format=json_schema (vLLM, SGLang, OpenAI); else plain JSON
    max_tokens: int = 1024
    temperature: float = 0.0


@dataclass
class Answer:
    status: str  # "ok", "unparseable" (raw text kept), "error" (the call failed after retries)
    value: Any = None
    raw: str | None = None
    error: str | None = None

    def record(self) -> dict:
        return {k: v for k, v in {"status": self.status, "value": self.value, "raw": self.raw,
                                  "error": self.error}.items() if v is not None}


def image_part(path: str | os.PathLike) -> dict:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


class SchemaMismatch(ValueError):
    pass


def check_schema(value: Any, schema: dict, path: str = "answer") -> None:
    """The subset of JSON Schema the prompts use: object/array/string/boolean/number, enum, required."""
    t = schema.get("type")
    if t == "object":
        if not isinstance(value, dict):
            raise SchemaMismatch(f"{path} must be an object")
        for key in schema.get("required", []):
            if key not in value:
                raise SchemaMismatch(f"{path} has no {key!r}")
        extra = set(value) - set(schema.get("properties", {}))
        if schema.get("additionalProperties") is False and extra:
            raise SchemaMismatch(f"{path} has unexpected key(s) {sorted(extra)}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                check_schema(value[key], sub, f"{path}.{key}")
    elif t == "array":
        if not isinstance(value, list):
            raise SchemaMismatch(f"{path} must be a list")
        for i, v in enumerate(value):
            check_schema(v, schema.get("items", {}), f"{path}[{i}]")
    elif t == "string" and not isinstance(value, str):
        raise SchemaMismatch(f"{path} must be a string")
    elif t == "boolean" and not isinstance(value, bool):
        raise SchemaMismatch(f"{path} must be true or false")
    elif t == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SchemaMismatch(f"{path} must be a number")
    if "enum" in schema and value not in schema["enum"]:
        raise SchemaMismatch(f"{path} must be one of {schema['enum']}, got {value!r}")


_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_json_answer(text: str | None, schema: dict) -> Answer:
    if text is None:
        return Answer("unparseable", raw=None, error="empty answer")
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1)
    try:
        value = json.loads(body)
        check_schema(value, schema)
    except ValueError as e:  # json.JSONDecodeError and SchemaMismatch are ValueErrors
        return Answer("unparseable", raw=text, error=str(e))
    return Answer("ok", value=value, raw=text)


class ChatClient:
    def __init__(self, cfg: EndpointConfig):
        try:
            from openai import OpenAI
        except ImportError:
            raise ValueError("the eval judges need the openai client: pip install 'deleaker[eval]'") from None
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                raise ValueError(f"--api-key-env {cfg.api_key_env} names an environment variable that is not set")
        self.cfg = cfg
        # a local server needs no key, but the client insists on one
        self._client = OpenAI(base_url=cfg.endpoint, api_key=key or "no-key", timeout=cfg.timeout,
                              max_retries=cfg.retries)

    def _create(self, parts: list[dict], **kw):
        import openai

        try:
            return self._client.chat.completions.create(
                model=self.cfg.model, messages=[{"role": "user", "content": parts}],
                temperature=self.cfg.temperature, **kw), None
        except openai.APIError as e:  # after the client's own retries
            return None, f"{type(e).__name__}: {e}"

    def ask_json(self, parts: list[dict], name: str, schema: dict) -> Answer:
        kw: dict = {"max_tokens": self.cfg.max_tokens}
        if self.cfg.structured:
            kw["response_format"] = {"type": "json_schema",
                                     "json_schema": {"name": name, "schema": schema, "strict": True}}
        resp, err = self._create(parts, **kw)
        if err:
            return Answer("error", error=err)
        try:
            text = resp.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            return Answer("unparseable", raw=str(resp)[:2000], error="no message in the response")
        return parse_json_answer(text, schema)

    def yes_probability(self, parts: list[dict], top: int = 20) -> Answer:
        """P(first answer token is "yes"), from the returned top logprobs (VQAScore)."""
        resp, err = self._create(parts, max_tokens=1, logprobs=True, top_logprobs=top)
        if err:
            return Answer("error", error=err)
        try:
            first = resp.choices[0].logprobs.content[0]
            candidates = first.top_logprobs or [first]
        except (AttributeError, IndexError, TypeError):
            return Answer("unparseable", raw=str(resp)[:2000], error="the endpoint returned no logprobs")
        p = sum(math.exp(c.logprob) for c in candidates if c.token.strip().lower() == "yes")
        return Answer("ok", value=min(p, 1.0), raw=first.token)
