"""The DeLeakerAttention op schema: the ONE place that names its inputs, outputs and attributes.

Every implementation reads this module: the PyTorch reference op, the ONNX node and its
function body, the CUDA kernels' torch adapter and C header (checked by a test), and the
TensorRT plugin. docs/op-contract.md is generated from it (`python -m deleaker.runtime.op_schema`).

Contract v2: everything a request may change is a per-sample runtime input (the windows, the
thresholds and strength, the rule switches), so one engine serves every step count and every
DeLeaker setting, and one batch may mix them. Only what is structural stays an attribute
(the block's offset within a step, the blocks per step and the layout of the joint sequence).

Layouts: a model family's joint attention sequence is its text tokens (T), image tokens (I) and,
in some families, excluded tokens (X = N - T - I: reference images, context) in a fixed order.
LAYOUTS names each order; the `layout` attribute is its index. Segment lengths are not
attributes: T is entity_tokens' last axis, I = h * w from `grid`, X the rest, so one engine
serves every resolution and reference count.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

OP_NAME = "DeLeakerAttention"
ONNX_DOMAIN = "deleaker"
# v2: windows, knobs and rule switches became per-sample inputs (v1 had them as attributes).
ONNX_OPSET_VERSION = 2
PLUGIN_NAME = "DeLeakerAttention"
PLUGIN_NAMESPACE = "deleaker"
PLUGIN_VERSION = "2"
# Name of the op registered with torch.library (namespace::name); the fused CUDA library
# registers its kernel for the same op (CUDA dispatch key).
TORCH_OP = "deleaker::attention"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (fp32/fp16/bf16, same as q), "float32", "int64"
    shape: str  # symbolic
    doc: str


# Largest finite float32: the knobs travel as float32, so a larger value would become inf there.
FLOAT32_MAX = 3.4028234663852886e38
# Largest window value (block-steps); far past any run (1000 steps x 57 blocks is 57000).
MAX_WINDOW = 2 ** 31 - 1


@dataclass(frozen=True)
class SettingSpec:
    """One per-sample DeLeaker setting: column `index` of input tensor `tensor`.

    Also a field of runtime/config.py's DeLeakerConfig and ResolvedConfig (in SETTINGS order,
    with this default) and of the fused kernels' Settings struct (named `kernel`)."""

    name: str  # DeLeakerConfig / ResolvedConfig field
    tensor: str  # "windows", "knobs" or "rules"
    index: int
    type: str  # "int", "float" or "bool"
    default: int | float | bool | None  # None: derived from the step count (DeLeakerConfig.resolved)
    symbol: str  # docs/semantics.md symbol ("" where it has none)
    kernel: str  # field of the kernels' Settings struct (plugins/deleaker_attention/src/internal.h)
    doc: str
    minimum: float | None = None  # lower bound (validated by ResolvedConfig)
    min_exclusive: bool = False  # minimum itself is refused
    maximum: float | None = None  # upper bound (floats: float32 range)


def _knob(name, index, default, symbol, minimum, min_exclusive, doc):
    return SettingSpec(name, "knobs", index, "float", default, symbol, symbol, f"{symbol}: {doc}", minimum,
                       min_exclusive, FLOAT32_MAX)


def _window(name, index, default, symbol, doc, minimum=None):
    return SettingSpec(name, "windows", index, "int", default, symbol, symbol, f"{symbol}: {doc}", minimum,
                       maximum=MAX_WINDOW)


def _rule(name, index, default, kernel, doc, symbol=""):
    return SettingSpec(name, "rules", index, "bool", default, symbol, kernel, doc)


# The public field order of DeLeakerConfig; `index` is the column (the tensors, the C enums and
# the kernels' loader follow the columns).
SETTINGS = (
    _knob("std_mul_text", 0, 1.0, "beta1", 0, False, "entity-mask threshold mean + beta1 * std"),
    _knob("std_mul_image_image", 1, 1.0, "beta2", 0, False, "image-image cut threshold"),
    _knob("k_strength", 2, 1.2, "alpha", 0, True, "multiplier on own-entity image->text logits"),
    _window("start_aggregating_from", 0, 12, "a0", "first tau of the mask history", minimum=0),
    _window("stop_aggregating_at", 1, None, "a1", "history frozen from here on"),
    _window("start_intervention_from", 2, 18, "i0", "first tau that is edited", minimum=0),
    _window("stop_intervention_at", 3, None, "i1", "last tau that is edited (inclusive)"),
    _rule("use_history", 0, True, "use_history", "masks from the running mean"),
    _rule("do_smoothing", 1, True, "do_smoothing", "3x3 open + close of the masks"),
    _rule("do_image_text_weakening", 2, True, "do_w", "rule W", "W"),
    _rule("do_image_text_strengthening", 3, True, "do_s", "rule S", "S"),
    _rule("do_image_image", 4, True, "do_x", "rule X", "X"),
    _rule("do_text_text_weakening", 5, False, "do_tt", "rule TT", "TT"),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)
SETTINGS_TENSORS = ("windows", "knobs", "rules")
_SETTINGS_DTYPES = {"windows": np.int64, "knobs": np.float32, "rules": np.int64}
# Python type of each setting type (DeLeakerConfig / ResolvedConfig fields)
PY_TYPES = {"int": int, "float": float, "bool": bool}


def settings_of(tensor: str) -> tuple[SettingSpec, ...]:
    """The settings carried by one settings tensor, in column order."""
    return tuple(sorted((s for s in SETTINGS if s.tensor == tensor), key=lambda s: s.index))


def settings_by_column() -> tuple[SettingSpec, ...]:
    """Every setting, tensor by tensor (SETTINGS_TENSORS order), column by column."""
    return tuple(s for t in SETTINGS_TENSORS for s in settings_of(t))


def settings_width(tensor: str) -> int:
    return sum(1 for s in SETTINGS if s.tensor == tensor)


def _check_columns() -> None:
    for t in SETTINGS_TENSORS:
        cols = [s.index for s in settings_of(t)]
        if cols != list(range(len(cols))):
            raise AssertionError(f"op_schema: the {t} columns are {cols}, not 0..{len(cols) - 1}")
    if len(set(SETTING_NAMES)) != len(SETTINGS) or {s.tensor for s in SETTINGS} != set(SETTINGS_TENSORS):
        raise AssertionError("op_schema: setting names must be unique, each in one of SETTINGS_TENSORS")


_check_columns()


def _symbols(tensor: str) -> str:
    return ", ".join(s.symbol or s.name for s in settings_of(tensor))


# Segments of the joint sequence: text (T tokens, entity_tokens' last axis), image (I = h * w, grid)
# and excluded (X = N - T - I): tokens that are neither, which the edits never touch.
SEGMENTS = ("text", "image", "excluded")
# Every order of the segments; `layout` is the index. The two-segment orders require X = 0 (a
# sequence length that does not add up is an error there, not silently excluded tokens).
LAYOUTS = (("text", "image"), ("image", "text")) + tuple(
    p for p in itertools.permutations(SEGMENTS))
LAYOUT_NAMES = tuple("_".join(lay) for lay in LAYOUTS)
DEFAULT_LAYOUT = 0  # text_image: FLUX.1's order, and the order of every artifact made before layouts
# The layout the op's math is written in (docs/semantics.md): text, then image, then excluded.
CANONICAL = SEGMENTS


def layout_code(name: str) -> int:
    """The `layout` attribute of a layout name ("text_image", "image_text", ...)."""
    if name not in LAYOUT_NAMES:
        raise ValueError(f"unknown layout {name!r}; known layouts: {', '.join(LAYOUT_NAMES)}")
    return LAYOUT_NAMES.index(name)


def is_identity_layout(layout: int) -> bool:
    """True when the model's order is already the canonical one (text_image, text_image_excluded):
    the op needs no reorder there, for any segment lengths."""
    return tuple(LAYOUTS[layout]) == CANONICAL[:len(LAYOUTS[layout])]


def segment_lengths(layout: int, T: int, I: int, N: int) -> dict[str, int]:
    """{segment: length} of a joint sequence of N tokens with T text and I image tokens.
    Raises ValueError when the lengths do not fit the layout."""
    if not 0 <= layout < len(LAYOUTS):
        raise ValueError(f"layout must be 0..{len(LAYOUTS) - 1} ({', '.join(LAYOUT_NAMES)}), got {layout}")
    X = N - T - I
    if X < 0 or (X and "excluded" not in LAYOUTS[layout]):
        raise ValueError(f"layout {LAYOUT_NAMES[layout]}: {T} text + {I} image tokens do not make a sequence "
                         f"of {N}")
    return {"text": T, "image": I, "excluded": X}


def segment_starts(layout: int, T: int, I: int, N: int) -> dict[str, int]:
    """{segment: first position} in the model's joint sequence (segments the layout lacks: at N, empty)."""
    lengths = segment_lengths(layout, T, I, N)
    starts, pos = {}, 0
    for seg in LAYOUTS[layout]:
        starts[seg] = pos
        pos += lengths[seg]
    return {seg: starts.get(seg, N) for seg in SEGMENTS}


def canonical_order(layout: int, T: int, I: int, N: int) -> list[int]:
    """Model positions in canonical order: entry j is the model position of canonical token j
    (text, then image, then excluded). The identity for text_image."""
    lengths, starts = segment_lengths(layout, T, I, N), segment_starts(layout, T, I, N)
    return [starts[seg] + j for seg in CANONICAL for j in range(lengths[seg])]


INPUTS = (
    TensorSpec("q", "float", "[B, H, N, D]", "queries after QK-norm and RoPE, in the model's order (`layout`)"),
    TensorSpec("k", "float", "[B, H, N, D]", "keys after QK-norm and RoPE"),
    TensorSpec("v", "float", "[B, H, N, D]", "values"),
    TensorSpec("entity_tokens", "float32", "[B, E, T]",
               "1 where text token t belongs to entity slot e; an all-zero slot is inactive"),
    TensorSpec("history", "float32", "[B, E, I]", "running mean of entity->image attention (semantics.md, the history)"),
    TensorSpec("step", "int64", "[] (scalar)", "denoising step s; tau = s * blocks_per_step + block_offset"),
    TensorSpec("grid", "int64", "[2]", "latent token grid (h, w), h * w = I"),
    TensorSpec("windows", "int64", f"[B, {settings_width('windows')}]",
               f"per sample: {_symbols('windows')} (block-steps; see SETTINGS)"),
    TensorSpec("knobs", "float32", f"[B, {settings_width('knobs')}]", f"per sample: {_symbols('knobs')}"),
    TensorSpec("rules", "int64", f"[B, {settings_width('rules')}]", f"per sample, 0/1: {_symbols('rules')}"),
)
INPUT_NAMES = tuple(t.name for t in INPUTS)
assert INPUT_NAMES[-len(SETTINGS_TENSORS):] == SETTINGS_TENSORS  # the settings tensors close the input list

OUTPUTS = (
    TensorSpec("out", "float", "[B, H, N, D]", "attention output, same dtype as q, in q's token order"),
    TensorSpec("history_out", "float32", "[B, E, I]", "updated history"),
)


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int"
    doc: str


# Structural only. Order matters: the C struct and the TensorRT plugin fields follow it.
ATTRIBUTES = (
    AttrSpec("block_offset", "int", "b: offset of this block within a step"),
    AttrSpec("blocks_per_step", "int", "joint-attention blocks per step (FLUX.1: 19 double + 38 single)"),
    AttrSpec("layout", "int", "order of the joint sequence, an index of LAYOUTS (0: text_image; "
             "see Layouts); absent on a node: 0"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
# Attributes a node may omit (artifacts exported before layouts), with the value meant.
ATTRIBUTE_DEFAULTS = {"layout": DEFAULT_LAYOUT}


def node_attributes(block_offset: int, blocks_per_step: int, layout: int = DEFAULT_LAYOUT) -> dict:
    """Attribute dict of one node."""
    return {"block_offset": int(block_offset), "blocks_per_step": int(blocks_per_step), "layout": int(layout)}


def attribute_problem(attrs: dict) -> str | None:
    """Why `attrs` is not exactly the op's attribute dict (None: it is)."""
    missing = set(ATTRIBUTE_NAMES) - set(attrs) - set(ATTRIBUTE_DEFAULTS)
    unknown = set(attrs) - set(ATTRIBUTE_NAMES)
    if missing or unknown:
        return f"attributes: missing {sorted(missing)}, unknown {sorted(unknown)}"
    layout = attrs.get("layout", DEFAULT_LAYOUT)
    if not 0 <= int(layout) < len(LAYOUTS):
        return f"attributes: layout must be 0..{len(LAYOUTS) - 1} ({', '.join(LAYOUT_NAMES)}), got {layout}"
    return None


def attribute_values(attrs: dict) -> tuple[int, ...]:
    """The attributes as ints in ATTRIBUTES order (the tail of torch.ops.deleaker.attention's
    arguments), omitted ones at ATTRIBUTE_DEFAULTS. Raises TypeError if attrs is not the op's attributes."""
    problem = attribute_problem(attrs)
    if problem:
        raise TypeError(problem)
    return tuple(int(attrs.get(n, ATTRIBUTE_DEFAULTS.get(n))) for n in ATTRIBUTE_NAMES)


def split_call(args: Sequence) -> tuple[tuple, dict]:
    """(inputs, attrs) of a call in the implementations' convention (modeling/attention_ops.py):
    fn(*inputs in INPUT_NAMES order, attrs: dict)."""
    if len(args) != len(INPUTS) + 1 or not isinstance(args[-1], dict):
        raise TypeError(f"{OP_NAME} takes its {len(INPUTS)} inputs ({', '.join(INPUT_NAMES)}) and then the "
                        f"attribute dict; got {len(args)} arguments")
    return tuple(args[:-1]), args[-1]


def named_inputs(inputs: Sequence) -> dict:
    """{name: value} of the op's inputs given in INPUT_NAMES order."""
    if len(inputs) != len(INPUTS):
        raise TypeError(f"{OP_NAME} takes {len(INPUTS)} inputs ({', '.join(INPUT_NAMES)}), got {len(inputs)}")
    return dict(zip(INPUT_NAMES, inputs))


def pack_settings(configs: Sequence) -> dict[str, np.ndarray]:
    """Per-sample settings tensors from one ResolvedConfig per sample (or one dict of SETTING_NAMES).

    Returns {"windows": int64 [B, 4], "knobs": float32 [B, 3], "rules": int64 [B, 6]}.
    """
    if len(configs) == 0:
        raise ValueError("pack_settings needs at least one config")
    out = {name: np.zeros((len(configs), settings_width(name)), _SETTINGS_DTYPES[name])
           for name in SETTINGS_TENSORS}
    for b, cfg in enumerate(configs):
        get = cfg.__getitem__ if isinstance(cfg, dict) else (lambda n, c=cfg: getattr(c, n))
        for s in SETTINGS:
            v = get(s.name)
            out[s.tensor][b, s.index] = float(v) if s.type == "float" else int(v)
    return out


def unpack_settings(windows, knobs, rules, b: int) -> dict:
    """The settings of sample b as {name: python value} (any array-like with [B, n] indexing)."""
    src = {"windows": windows, "knobs": knobs, "rules": rules}
    out = {}
    for s in SETTINGS:
        v = src[s.tensor][b][s.index]
        v = v.item() if hasattr(v, "item") else v
        out[s.name] = float(v) if s.type == "float" else (bool(v) if s.type == "bool" else int(v))
    return out


def markdown() -> str:
    lines = [
        f"# `{OP_NAME}` op contract (v{ONNX_OPSET_VERSION})",
        "",
        "Generated from `runtime/op_schema.py` (`python -m deleaker.runtime.op_schema > docs/op-contract.md`).",
        "The math is [semantics.md](semantics.md); this page fixes names, order and types.",
        "",
        f"- ONNX: domain `{ONNX_DOMAIN}`, op `{OP_NAME}`, version {ONNX_OPSET_VERSION}; nodes also carry "
        f"`plugin_namespace=\"{PLUGIN_NAMESPACE}\"` and `plugin_version=\"{PLUGIN_VERSION}\"`.",
        f"- TensorRT plugin: `{PLUGIN_NAME}`, namespace `{PLUGIN_NAMESPACE}`, version \"{PLUGIN_VERSION}\".",
        f"- PyTorch: `torch.ops.{TORCH_OP.replace('::', '.')}` (CPU kernel: the reference; CUDA kernel: "
        "the fused library when built).",
        "- v2: the windows, thresholds, strength and rule switches are per-sample inputs, so one engine "
        "serves every step count and setting and a batch may mix them. Artifacts of v1 must be re-exported.",
        "",
        "## Inputs", "", "| # | name | dtype | shape | meaning |", "|---|---|---|---|---|",
    ]
    lines += [f"| {i} | `{t.name}` | {t.dtype} | {t.shape} | {t.doc} |" for i, t in enumerate(INPUTS)]
    lines += ["", "## Outputs", "", "| # | name | dtype | shape | meaning |", "|---|---|---|---|---|"]
    lines += [f"| {i} | `{t.name}` | {t.dtype} | {t.shape} | {t.doc} |" for i, t in enumerate(OUTPUTS)]
    lines += ["", "## Per-sample settings (columns of `windows`, `knobs`, `rules`)", "",
              "| tensor | column | name | type | meaning |", "|---|---|---|---|---|"]
    lines += [f"| `{s.tensor}` | {s.index} | `{s.name}` | {s.type} | {s.doc} |" for s in settings_by_column()]
    lines += ["", "## Attributes (structural, in this order)", "", "| # | name | type | meaning |",
              "|---|---|---|---|"]
    lines += [f"| {i} | `{a.name}` | {a.type} | {a.doc} |" for i, a in enumerate(ATTRIBUTES)]
    lines += ["", "## Layouts (values of `layout`)", "",
              "The joint sequence of N tokens is the model's text tokens (T: `entity_tokens`' last axis), "
              "image tokens (I = h * w: `grid`) and excluded tokens (X = N - T - I: reference images, "
              "context tokens; never edited, still attended to) in the order below. The two-segment "
              "layouts require X = 0. The math ([semantics.md](semantics.md#layouts)) is written in the "
              "canonical order text, image, excluded; `out` comes back in q's order.", "",
              "| layout | name | order |", "|---|---|---|"]
    lines += [f"| {i} | `{n}` | {' ; '.join(lay)} |" for i, (n, lay) in enumerate(zip(LAYOUT_NAMES, LAYOUTS))]
    lines += ["", "### Why the layout is an attribute, not a per-sample input", "", *_LAYOUT_CHOICE]
    return "\n".join(lines) + "\n"


# docs/op-contract.md's argument for the layout's form (kept here so the page stays generated).
_LAYOUT_CHOICE = [
    "- The order is a property of the architecture: every sample of a batch runs through the same "
    "transformer blocks, so a per-sample value could only ever repeat one number. An attribute says "
    "so in the graph, is checked once when a node is built or a plugin is created, and lets an "
    "engine specialise on it (the fused kernels and the TensorRT plugin take `text_image` and refuse "
    "the rest in one line, the plugin when the engine is built).",
    "- What does vary per request stays dynamic: the segment lengths are read from the shapes "
    "(T from `entity_tokens`, I from `grid`, X from N), so one engine serves every resolution and "
    "every number of reference images. An attribute holding offsets would have pinned those.",
    "- FLUX.1 stays exactly as it was: `text_image` is the identity order, and a node without the "
    "attribute (an artifact exported before layouts) means it, so existing artifacts keep loading "
    "and computing bit for bit the same.",
    "- The cost: a family with a new order needs a new `layout` value and a new node, not a new "
    "request; since a family never changes its order at run time, nothing is lost.",
]


if __name__ == "__main__":
    print(markdown(), end="")
