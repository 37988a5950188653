"""One validation of a generation request, for every surface: the Python API (Pipeline.generate and
Pipeline.check), the command line (`deleaker generate`) and the server (`deleaker serve`'s admission).

Each check raises a FieldError (runtime/errors.py) whose `field` names the field it blames, in the
Python API's words; the server answers it under the API's name (API_FIELDS), so no layer reads a
field out of a message. A size is refused with the same message on every surface.

The size rule comes from the model's own geometry: each side a positive multiple of one image
token, vae_scale_factor x PATCH pixels (16 for FLUX.1, 4 for the embedded toy-world model), at most
MAX_IMAGE_SIDE (or inside an exported artifact's range), and small enough that the batch fits the
memory free now (runtime/footprint.py; the refusal names the largest square size that fits).

The step count is the request's `steps`; None takes the pipeline's (its DeLeaker preset's
num_steps). A request's own DeLeakerConfig never changes it: its windows are resolved for the
request's steps.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import latents as lat
from . import text_policy
from .config import FLOAT32_MAX, DeLeakerConfig
from .errors import FieldError

MAX_STEPS = 1000  # a request over this is a mistake, not a setting
# FLUX embeds guidance x 1000 like a timestep, in float32: past this the embedding is inf (a black image).
MAX_GUIDANCE = FLOAT32_MAX / 1000
# the server's JSON field for each Python API field that is spelled differently there
API_FIELDS = {"height": "size", "width": "size", "guidance_scale": "guidance", "config": "deleaker_settings"}
# DeLeakerConfig fields a request may not set: its step count is the request's `steps`
FIXED_SETTINGS = ("num_steps",)


class RequestError(FieldError):
    """A request is invalid; the message says why and `field` names the field (nothing was computed)."""


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    entities: tuple[str, ...] = ()
    seed: int = 0
    steps: int | None = None  # None: the pipeline's step count (its preset's); a request's config never sets it
    height: int = 256
    width: int = 256
    guidance_scale: float = 3.5
    deleaker: bool = True  # False: every entity slot inactive (plain attention), same engine
    config: DeLeakerConfig | None = None  # DeLeaker settings of this request; None: the pipeline's


def api_field(field: str | None) -> str | None:
    """The server's name of a Python API field (size for height/width, guidance, deleaker_settings)."""
    if field is None:
        return None
    head, dot, rest = field.partition(".")
    return API_FIELDS.get(head, head) + dot + rest


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _short_repr(v, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def check_request(req, info=None) -> lat.LatentGeometry | None:
    """The checks of one request: types, ranges, float32 limits and, given the model (a ModelInfo:
    its VAE scale factor and any exported size range), the size rule. Without `info` (before a
    model loads, as the CLI checks) the size is checked for its type only. Returns the geometry
    (None without `info`); raises a RequestError / LatentSizeError / ConfigError naming the field."""
    if not isinstance(req, GenerateRequest):
        raise RequestError(f"expected a GenerateRequest, got {type(req).__name__}", "request")
    if not isinstance(req.prompt, str) or not req.prompt.strip():
        raise RequestError(f"prompt must be a non-empty string, got {_short_repr(req.prompt)}", "prompt")
    try:
        req.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800" (JSON allows it, UTF-8 does not)
        raise RequestError(f"prompt is not valid Unicode: {e.reason} at character {e.start}", "prompt") from None
    if req.entities is not None and (isinstance(req.entities, (str, bytes, dict))
                                     or not isinstance(req.entities, (tuple, list))
                                     or not all(isinstance(e, str) and e.strip() for e in req.entities)):
        raise RequestError(f"entities must be a list of non-empty strings (or None), got {_short_repr(req.entities)}",
                           "entities")
    text_policy.check_request_text(req.prompt, req.entities or ())
    if not _is_int(req.seed) or not 0 <= req.seed < 2 ** 63:
        raise RequestError(f"seed must be an integer in [0, 2**63), got {req.seed!r}", "seed")
    if req.steps is not None and (not _is_int(req.steps) or not 1 <= req.steps <= MAX_STEPS):
        raise RequestError(f"steps must be an integer in [1, {MAX_STEPS}] (or None: the pipeline's), got "
                           f"{req.steps!r}", "steps")
    g = req.guidance_scale
    if isinstance(g, (bool, np.bool_)) or not isinstance(g, (int, float, np.floating, np.integer)) \
            or not math.isfinite(g) or not 0 <= g <= MAX_GUIDANCE:
        raise RequestError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE:.4g}] (the model embeds "
                           f"guidance x 1000 in float32), got {g!r}", "guidance_scale")
    if not isinstance(req.deleaker, (bool, np.bool_)):
        # a string such as "no" is truthy: refuse it rather than run DeLeaker
        raise RequestError(f"deleaker must be True or False, got {type(req.deleaker).__name__} {req.deleaker!r}",
                           "deleaker")
    for side in ("height", "width"):
        if not _is_int(getattr(req, side)):
            raise RequestError(f"{side} must be an integer number of pixels, got {getattr(req, side)!r}", "size")
    if req.config is not None:
        if not isinstance(req.config, DeLeakerConfig):
            raise RequestError(f"config must be a DeLeakerConfig, got {type(req.config).__name__}", "config")
        steps = req.steps if req.steps is not None else req.config.num_steps
        req.config.replace(num_steps=steps).resolved(1)  # explicit settings are model-independent
    return None if info is None else check_size(req.height, req.width, info)


def check_size(height: int, width: int, info) -> lat.LatentGeometry:
    """The size rule of the model `info` (a ModelInfo): its exported range, if any, then multiples
    of one image token; the memory check is the pipeline's (it needs the batch)."""
    size_range = info.size_range
    if size_range is not None:
        lo, hi = size_range
        for side, v in (("height", height), ("width", width)):
            if not lo <= v <= hi:
                raise lat.LatentSizeError(f"size {width}x{height}: {side} {v} is outside the exported range "
                                          f"[{lo}, {hi}]; re-export with a wider --min-size/--max-size")
    return lat.geometry(height, width, info.vae_scale_factor, max_side=size_range[1] if size_range else None)


def size_multiple(info) -> int:
    """Pixels per image-token side of the model `info`: every image side is a multiple of this."""
    return info.vae_scale_factor * lat.PATCH


_SIZE = re.compile(r"^\s*(\d{1,5})\s*(?:[xX]\s*(\d{1,5})\s*)?$", re.ASCII)  # ASCII digits only


class Size(NamedTuple):
    """An image size in pixels, width first as written (WIDTHxHEIGHT); read it by name."""

    width: int
    height: int


def parse_size(size: str, what: str = "size", *, square: bool = False) -> Size:
    """'WIDTHxHEIGHT' -> Size(width, height), the one way every layer reads a size; with square,
    'SIDE' too (SIDExSIDE). A RequestError (field size) naming `what` otherwise."""
    m = _SIZE.match(size) if isinstance(size, str) else None
    if not m or (m.group(2) is None and not square):
        form = "SIDE or WIDTHxHEIGHT" if square else "WIDTHxHEIGHT"
        raise RequestError(f"{what} must be {form} in pixels, e.g. 32x32; got {text_policy.short(size)}", "size")
    width = int(m.group(1))
    return Size(width, int(m.group(2)) if m.group(2) is not None else width)


# -- DeLeaker settings given as JSON (the server's deleaker_settings) --------------------------------

def _setting_kinds() -> dict[str, type]:
    """DeLeakerConfig field -> the JSON type it takes (from its default; None defaults are ints)."""
    return {f.name: int if f.default is None else type(f.default)
            for f in dataclasses.fields(DeLeakerConfig) if f.name not in FIXED_SETTINGS}


SETTING_KINDS = _setting_kinds()
_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number"}


def check_settings(settings) -> dict:
    """DeLeaker settings from JSON ({name: value}) -> the same dict, or a RequestError (field
    config.NAME) saying in plain words what the value must be."""
    if not isinstance(settings, dict):
        raise RequestError(f"the DeLeaker settings must be an object of setting: value, got {_short_repr(settings)}",
                           "config")
    for name, value in settings.items():
        kind = SETTING_KINDS.get(name)
        if kind is None:
            hint = " (the step count is the request's `steps`)" if name in FIXED_SETTINGS else ""
            raise RequestError(f"unknown DeLeaker setting {name!r}{hint}; known: {', '.join(SETTING_KINDS)}",
                               "config")
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool))
        if not ok:
            raise RequestError(f"DeLeaker setting {name} must be {_KIND_WORDS[kind]}, got {_short_repr(value)}",
                               "config")
    return settings
