"""The DeLeakerAttention op schema: the ONE place that names its inputs, outputs and attributes.

Every implementation reads this module: the PyTorch reference op, the ONNX node and its
function body, the CUDA kernels' torch adapter and C header (checked by a test), and the
TensorRT plugin. docs/op-contract.md is generated from it (`python -m deleaker.runtime.op_schema`).

Contract v2: everything a request may change is a per-sample runtime input (the windows, the
thresholds and strength, the rule switches), so one engine serves every step count and every
DeLeaker setting, and one batch may mix them. Only what is structural stays an attribute
(the block's offset within a step and the blocks per step).
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class SettingSpec:
    """One per-sample DeLeaker setting: column `index` of input tensor `tensor`."""

    name: str  # DeLeakerConfig / ResolvedConfig field
    tensor: str  # "windows", "knobs" or "rules"
    index: int
    type: str  # "int", "float" or "bool"
    doc: str


# Order matters: the tensors' columns, the C struct and the TensorRT plugin follow it.
SETTINGS = (
    SettingSpec("start_aggregating_from", "windows", 0, "int", "a0: first tau of the mask history"),
    SettingSpec("stop_aggregating_at", "windows", 1, "int", "a1: history frozen from here on"),
    SettingSpec("start_intervention_from", "windows", 2, "int", "i0: first tau that is edited"),
    SettingSpec("stop_intervention_at", "windows", 3, "int", "i1: last tau that is edited (inclusive)"),
    SettingSpec("std_mul_text", "knobs", 0, "float", "beta1: entity-mask threshold mean + beta1 * std"),
    SettingSpec("std_mul_image_image", "knobs", 1, "float", "beta2: image-image cut threshold"),
    SettingSpec("k_strength", "knobs", 2, "float", "alpha: multiplier on own-entity image->text logits"),
    SettingSpec("use_history", "rules", 0, "bool", "masks from the running mean"),
    SettingSpec("do_smoothing", "rules", 1, "bool", "3x3 open + close of the masks"),
    SettingSpec("do_image_text_weakening", "rules", 2, "bool", "rule W"),
    SettingSpec("do_image_text_strengthening", "rules", 3, "bool", "rule S"),
    SettingSpec("do_image_image", "rules", 4, "bool", "rule X"),
    SettingSpec("do_text_text_weakening", "rules", 5, "bool", "rule TT"),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)
SETTINGS_TENSORS = ("windows", "knobs", "rules")
_SETTINGS_DTYPES = {"windows": np.int64, "knobs": np.float32, "rules": np.int64}


def settings_width(tensor: str) -> int:
    return sum(1 for s in SETTINGS if s.tensor == tensor)


INPUTS = (
    TensorSpec("q", "float", "[B, H, T+I, D]", "queries after QK-norm and RoPE, text first"),
    TensorSpec("k", "float", "[B, H, T+I, D]", "keys after QK-norm and RoPE"),
    TensorSpec("v", "float", "[B, H, T+I, D]", "values"),
    TensorSpec("entity_tokens", "float32", "[B, E, T]",
               "1 where text token t belongs to entity slot e; an all-zero slot is inactive"),
    TensorSpec("history", "float32", "[B, E, I]", "running mean of entity->image attention (semantics.md, the history)"),
    TensorSpec("step", "int64", "[] (scalar)", "denoising step s; tau = s * blocks_per_step + block_offset"),
    TensorSpec("grid", "int64", "[2]", "latent token grid (h, w), h * w = I"),
    TensorSpec("windows", "int64", f"[B, {settings_width('windows')}]",
               "per sample: a0, a1, i0, i1 (block-steps; see SETTINGS)"),
    TensorSpec("knobs", "float32", f"[B, {settings_width('knobs')}]", "per sample: beta1, beta2, alpha"),
    TensorSpec("rules", "int64", f"[B, {settings_width('rules')}]",
               "per sample, 0/1: use_history, do_smoothing, W, S, X, TT"),
)
INPUT_NAMES = tuple(t.name for t in INPUTS)

OUTPUTS = (
    TensorSpec("out", "float", "[B, H, T+I, D]", "attention output, same dtype as q"),
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
    AttrSpec("blocks_per_step", "int", "n_double + n_single"),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)


def node_attributes(block_offset: int, blocks_per_step: int) -> dict:
    """Attribute dict of one node."""
    return {"block_offset": int(block_offset), "blocks_per_step": int(blocks_per_step)}


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
    lines += [f"| `{s.tensor}` | {s.index} | `{s.name}` | {s.type} | {s.doc} |" for s in SETTINGS]
    lines += ["", "## Attributes (structural, in this order)", "", "| # | name | type | meaning |",
              "|---|---|---|---|"]
    lines += [f"| {i} | `{a.name}` | {a.type} | {a.doc} |" for i, a in enumerate(ATTRIBUTES)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
