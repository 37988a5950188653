"""The DeLeakerAttention op schema: the ONE place that names its inputs, outputs and attributes.

Every implementation reads this module: the PyTorch reference op, the ONNX node and its
function body, the CUDA kernels' Python binding and the TensorRT plugin (whose C++ field list
mirrors ATTRIBUTES and is checked against it by a test). docs/op-contract.md is generated
from it (`python -m deleaker.runtime.op_schema`).
"""

from __future__ import annotations

from dataclasses import dataclass

OP_NAME = "DeLeakerAttention"
ONNX_DOMAIN = "deleaker"
ONNX_OPSET_VERSION = 1
PLUGIN_NAME = "DeLeakerAttention"
PLUGIN_NAMESPACE = "deleaker"
PLUGIN_VERSION = "1"
# Name of the op registered with torch.library (namespace::name).
TORCH_OP = "deleaker::attention"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # "float" (fp32/fp16/bf16, same as q), "float32", "int64"
    shape: str  # symbolic
    doc: str


INPUTS = (
    TensorSpec("q", "float", "[B, H, T+I, D]", "queries after QK-norm and RoPE, text first"),
    TensorSpec("k", "float", "[B, H, T+I, D]", "keys after QK-norm and RoPE"),
    TensorSpec("v", "float", "[B, H, T+I, D]", "values"),
    TensorSpec("entity_tokens", "float32", "[B, E, T]",
               "1 where text token t belongs to entity slot e; an all-zero slot is inactive"),
    TensorSpec("history", "float32", "[B, E, I]", "running mean of entity->image attention (section 3)"),
    TensorSpec("step", "int64", "[] (scalar)", "denoising step s; tau = s * blocks_per_step + block_offset"),
    TensorSpec("grid", "int64", "[2]", "latent token grid (h, w), h * w = I"),
)

OUTPUTS = (
    TensorSpec("out", "float", "[B, H, T+I, D]", "attention output, same dtype as q"),
    TensorSpec("history_out", "float32", "[B, E, I]", "updated history"),
)


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int" or "float"
    config_field: str | None  # ResolvedConfig field it comes from (None: per-block)
    doc: str


# Order matters: the CUDA params struct and the TensorRT plugin fields follow it.
ATTRIBUTES = (
    AttrSpec("block_offset", "int", None, "b: offset of this block within a step"),
    AttrSpec("blocks_per_step", "int", "blocks_per_step", "n_double + n_single"),
    AttrSpec("std_mul_text", "float", "std_mul_text", "beta1"),
    AttrSpec("std_mul_image_image", "float", "std_mul_image_image", "beta2"),
    AttrSpec("k_strength", "float", "k_strength", "alpha"),
    AttrSpec("start_aggregating_from", "int", "start_aggregating_from", "a0"),
    AttrSpec("stop_aggregating_at", "int", "stop_aggregating_at", "a1"),
    AttrSpec("start_intervention_from", "int", "start_intervention_from", "i0"),
    AttrSpec("stop_intervention_at", "int", "stop_intervention_at", "i1 (inclusive)"),
    AttrSpec("use_history", "int", "use_history", "bool"),
    AttrSpec("do_smoothing", "int", "do_smoothing", "bool"),
    AttrSpec("do_image_text_weakening", "int", "do_image_text_weakening", "bool: rule W"),
    AttrSpec("do_image_text_strengthening", "int", "do_image_text_strengthening", "bool: rule S"),
    AttrSpec("do_image_image", "int", "do_image_image", "bool: rule X"),
    AttrSpec("do_text_text_weakening", "int", "do_text_text_weakening", "bool: rule TT"),
)

ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)


def attribute_values(cfg, block_offset: int) -> dict:
    """Attribute dict for one node from a ResolvedConfig (bools as 0/1 ints, as in ONNX)."""
    out = {}
    for a in ATTRIBUTES:
        v = block_offset if a.config_field is None else getattr(cfg, a.config_field)
        out[a.name] = int(v) if a.type == "int" else float(v)
    return out


def markdown() -> str:
    lines = [
        f"# `{OP_NAME}` op contract",
        "",
        "Generated from `runtime/op_schema.py` (`python -m deleaker.runtime.op_schema > docs/op-contract.md`).",
        "The math is ../shared/docs/deleaker-semantics.md; this page fixes names, order and types.",
        "",
        f"- ONNX: domain `{ONNX_DOMAIN}`, op `{OP_NAME}`, version {ONNX_OPSET_VERSION}; nodes also carry "
        f"`plugin_namespace=\"{PLUGIN_NAMESPACE}\"` and `plugin_version=\"{PLUGIN_VERSION}\"`.",
        f"- TensorRT plugin: `{PLUGIN_NAME}`, namespace `{PLUGIN_NAMESPACE}`, version \"{PLUGIN_VERSION}\".",
        f"- PyTorch: `torch.ops.{TORCH_OP.replace('::', '.')}` (reference; CUDA adapter registers its own).",
        "",
        "## Inputs", "", "| # | name | dtype | shape | meaning |", "|---|---|---|---|---|",
    ]
    lines += [f"| {i} | `{t.name}` | {t.dtype} | {t.shape} | {t.doc} |" for i, t in enumerate(INPUTS)]
    lines += ["", "## Outputs", "", "| # | name | dtype | shape | meaning |", "|---|---|---|---|---|"]
    lines += [f"| {i} | `{t.name}` | {t.dtype} | {t.shape} | {t.doc} |" for i, t in enumerate(OUTPUTS)]
    lines += ["", "## Attributes (in this order)", "", "| # | name | type | meaning |", "|---|---|---|---|"]
    lines += [f"| {i} | `{a.name}` | {a.type} | {a.doc} |" for i, a in enumerate(ATTRIBUTES)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
