"""Request and response bodies of POST /v1/images/generations.

The OpenAI images API shape (prompt, n, size "WxH", response_format, seed) plus DeLeaker's
fields (entities, steps, guidance, deleaker on/off, deleaker_settings). Types are strict (a
string is not a number) and unknown fields are rejected, so a typo never silently falls back to
a default. Limits that depend on the server's options and model are checked by the engine.
"""

from __future__ import annotations

import re
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class FieldError(ValueError):
    """A request field is invalid; `param` names it (as in the OpenAI error body)."""

    def __init__(self, param: str | None, message: str, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="text prompt; every entity must occur in it")
    n: int = Field(1, description="number of images (seeds seed, seed+1, ...)")
    size: Optional[str] = Field(None, description="WIDTHxHEIGHT in pixels, e.g. 256x256 (default: the server's)")
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: the server writes no files")
    seed: Optional[int] = Field(None, description="seed of the first image (default: random, returned per image)")
    model: Optional[str] = Field(None, description="accepted for OpenAI clients; the server serves one model")
    entities: list[str] = Field(default_factory=list, description="entity words of the prompt DeLeaker separates")
    steps: Optional[int] = Field(None, description="denoising steps (default: the server's)")
    guidance: float = Field(3.5, description="guidance scale (guidance-distilled models)")
    deleaker: bool = Field(True, description="false: plain attention on the same engine")
    deleaker_settings: Optional[dict[str, Union[bool, int, float]]] = Field(
        None, description="DeLeakerConfig fields overriding the server's preset for this request")


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: Optional[str] = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


_SIZE = re.compile(r"^\s*(\d{1,5})\s*[xX]\s*(\d{1,5})\s*$")


def parse_size(size: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (width, height)."""
    m = _SIZE.match(size)
    if not m:
        raise FieldError("size", f"size must be WIDTHxHEIGHT in pixels, e.g. 256x256; got {size!r}")
    return int(m.group(1)), int(m.group(2))


def error_body(message: str, param: str | None, code: str) -> dict:
    """The OpenAI error shape, so OpenAI clients surface the message."""
    return {"error": {"message": message, "type": "invalid_request_error" if code == "invalid_request" else code,
                      "param": param, "code": code}}
