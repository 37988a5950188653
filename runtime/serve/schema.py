"""Request and response bodies of POST /v1/images/generations.

The OpenAI images API shape (prompt, n, size "WxH" or "auto", response_format, output_format,
seed, model) plus DeLeaker's fields (entities, steps, guidance, deleaker on/off,
deleaker_settings). The OpenAI fields that mean nothing here (IGNORED_FIELDS) are accepted and
named in the X-Ignored-Fields response header. Types are strict (a string is not a number) and
unknown fields are rejected, so a typo never silently falls back to a default. Limits that depend
on the server's options and model are checked by the engine, with the runtime's one request
validation (runtime/request.py). FieldError is the runtime's (runtime/errors.py): its `field` is
answered as `param` under the API's name (request.api_field).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import FieldError
from ..request import parse_size  # noqa: F401 (the server's size parsing is the runtime's)

MAX_MESSAGE_CHARS = 500  # an error message never echoes more of the request than this


# OpenAI images API fields with no effect on this server: accepted, and named in IGNORED_HEADER
IGNORED_FIELDS = ("user", "quality", "style", "background", "moderation", "output_compression")
IGNORED_HEADER = "X-Ignored-Fields"
AUTO_SIZE = "auto"  # OpenAI's "let the server choose": the server's default size


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description="text prompt; every entity must occur in it")
    n: int = Field(1, description="number of images (seeds seed, seed+1, ...)")
    size: Optional[str] = Field(None, description="WIDTHxHEIGHT in pixels, e.g. 256x256, or auto (the server's)")
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json: the server writes no files")
    output_format: Literal["png"] = Field("png", description="only png: the images are PNG files")
    stream: Literal[False] = Field(False, description="streaming is not offered: images come back in one answer")
    seed: Optional[int] = Field(None, description="seed of the first image (default: random, returned per image)")
    model: Optional[str] = Field(None, description="accepted for OpenAI clients; the server serves one model")
    entities: list[str] = Field(default_factory=list, description="entity words of the prompt DeLeaker separates")
    steps: Optional[int] = Field(None, description="denoising steps (default: the server's)")
    guidance: float = Field(3.5, description="guidance scale (guidance-distilled models)")
    deleaker: bool = Field(True, description="false: plain attention on the same engine")
    # any values here: runtime/request.check_settings says in plain words what each setting takes
    deleaker_settings: Optional[dict[str, Any]] = Field(
        None, description="DeLeakerConfig fields overriding the server's preset for this request")
    # IGNORED_FIELDS
    user: Optional[str] = None
    quality: Optional[str] = None
    style: Optional[str] = None
    background: Optional[str] = None
    moderation: Optional[str] = None
    output_compression: Optional[int] = None

    def ignored_fields(self, model_id: str) -> list[str]:
        """The fields this request gave that have no effect (a model other than the one served, too)."""
        given = [f for f in IGNORED_FIELDS if getattr(self, f) is not None]
        return given + (["model"] if self.model is not None and self.model != model_id else [])


class ImageData(BaseModel):
    b64_json: str
    seed: int
    revised_prompt: Optional[str] = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


def check_text(param: str, text: str) -> None:
    """Text that is not valid Unicode (a lone surrogate from a JSON \\ud800 escape) never reaches the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FieldError(f"{param} is not valid Unicode text: {text[e.start:e.end]!r} at character "
                         f"{e.start} (a lone surrogate)", param) from None


def error_body(message: str, param: str | None, code: str) -> dict:
    """The OpenAI error shape, so OpenAI clients surface the message."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate echoed from input
    if len(message) > MAX_MESSAGE_CHARS:  # the messages quote input through text_policy.short; this is the bound
        message = message[:MAX_MESSAGE_CHARS - 3] + "..."
    param = None if param is None else param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": "invalid_request_error" if code == "invalid_request" else code,
                      "param": param, "code": code}}
