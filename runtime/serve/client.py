"""A small Python client for `deleaker serve` (httpx).

    from deleaker.runtime.serve.client import Client
    with Client("http://127.0.0.1:8000") as c:
        c.wait_ready()
        out = c.generate("a cat and a dog", entities=["cat", "dog"], size="512x512", seed=0)
        out.images()[0].save("out.png")    # PIL images; out.png: the PNG bytes; out.seeds: each image's seed

Errors come back as ServeError(status, message, param) with the server's one-line message.
OpenAI's own client works too: `OpenAI(base_url=URL + "/v1", api_key=TOKEN).images.generate(
prompt=..., response_format="b64_json", extra_body={"entities": [...], "steps": 20})`.
"""

from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass

import httpx

# the generation endpoint (OpenAI's images API path), for the server's routes and every client
GENERATE_PATH = "/v1/images/generations"


class ServeError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {message}" + (f" (field: {param})" if param else ""))
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after


@dataclass
class Generated:
    png: list[bytes]  # PNG files, one per image
    seeds: list[int]

    def images(self):
        from PIL import Image

        return [Image.open(io.BytesIO(p)) for p in self.png]


def raise_for_error(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        message, param = err.get("message", r.text), err.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = r.text.strip() or r.reason_phrase, None
    retry = r.headers.get("retry-after")
    raise ServeError(r.status_code, message, param, float(retry) if retry and retry.isdigit() else None)


def request_body(prompt: str, *, n: int = 1, size: str | None = None, seed: int | None = None,
                 entities: list[str] | tuple[str, ...] = (), steps: int | None = None, guidance: float | None = None,
                 deleaker: bool = True, deleaker_settings: dict | None = None) -> dict:
    body = {"prompt": prompt, "n": n, "response_format": "b64_json", "entities": list(entities),
            "deleaker": deleaker}
    for k, v in (("size", size), ("seed", seed), ("steps", steps), ("guidance", guidance),
                 ("deleaker_settings", deleaker_settings)):
        if v is not None:
            body[k] = v
    return body


def decode_response(payload: dict) -> Generated:
    data = payload["data"]
    return Generated(png=[base64.b64decode(d["b64_json"]) for d in data], seeds=[d["seed"] for d in data])


class Client:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", token: str | None = None, timeout_s: float = 600):
        token = token if token is not None else os.environ.get("DELEAKER_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout_s)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> dict:
        return self.http.get("/health").json()

    def wait_ready(self, timeout_s: float = 120) -> dict:
        """Poll /health until the server has warmed up."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r = self.http.get("/health")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.http.base_url} was not ready within {timeout_s:g}s")
            time.sleep(0.2)

    def generate(self, prompt: str, **fields) -> Generated:
        r = self.http.post(GENERATE_PATH, json=request_body(prompt, **fields))
        raise_for_error(r)
        return decode_response(r.json())

    def metrics(self) -> str:
        r = self.http.get("/metrics")
        raise_for_error(r)
        return r.text
