"""The two forms of an exported transformer.onnx, and the portable one made from the other.

    function  (default) every joint attention is ONE `deleaker::DeLeakerAttention` node, and the
              model carries the op's model-local FunctionProto (standard-ONNX body,
              export/onnx_op.py). ONNX Runtime expands the function; TensorRT binds the node to
              the deleaker plugin (the fused kernels). A runtime that does not expand model-local
              functions cannot load it (OpenVINO: "No conversion rule found for operations:
              deleaker.DeLeakerAttention").
    portable  every DeLeakerAttention node replaced by the function's body (onnx's inliner):
              standard ONNX ops only, no custom domain, no local function; any ONNX runtime
              loads it. The body is the same math, so ONNX Runtime computes the same numbers
              at the same cost (it expands the function anyway); what is lost is the node
              TensorRT's plugin binds to, so a portable artifact has no fused path. Like the
              function body, each attention materialises the (T+I) x (T+I) logits per head in
              float32.

FORMS maps each form to the consumers that can load it (written to the manifest); `graph_form`
reads the form of a loaded graph, `check_form` checks a graph against the form its manifest
records (`deleaker-export verify` runs it).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx.inliner

from deleaker.runtime import op_schema

FUNCTION, PORTABLE = "function", "portable"
# form -> the consumers that load it (the manifest's "runs_on")
FORMS = {FUNCTION: "onnxruntime; TensorRT with the deleaker plugin", PORTABLE: "any ONNX runtime"}
_OP = (op_schema.ONNX_DOMAIN, op_schema.OP_NAME)


class FormError(ValueError):
    """A graph is not in the form its manifest says (or not in any one form)."""


def _op_nodes(graph: onnx.GraphProto) -> int:
    return sum((n.domain, n.op_type) == _OP for n in graph.node)


def _custom_domains(model: onnx.ModelProto) -> set[str]:
    return {n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")}


def _node_layout(node: onnx.NodeProto) -> int:
    given = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return int(given.get("layout", op_schema.ATTRIBUTE_DEFAULTS["layout"]))


def inline_op(model: onnx.ModelProto, num_slots: int | None = None) -> onnx.ModelProto:
    """`model` with every DeLeakerAttention node expanded into the function's body (the node's
    block_offset/blocks_per_step substituted for the body's attribute references), the function
    and the deleaker opset import removed. Initializers are untouched (external data stays valid).

    With `num_slots` (the model's entity slots E), each node is expanded into the body made for
    its own layout (export/onnx_op.py make_function(..., layout=)), so a text_image node (FLUX.1)
    carries no reorder, as the reference op; without it, into the model's general function."""
    from . import onnx_op

    if num_slots is not None:
        model = _per_layout(model, num_slots, onnx_op)
    names = {(f.domain, f.name) for f in model.functions if f.domain == op_schema.ONNX_DOMAIN}
    out = onnx.inliner.inline_selected_functions(model, sorted(names | {_OP}), exclude=False)
    keep = [f for f in out.functions if (f.domain, f.name) not in names | {_OP}]
    del out.functions[:]
    out.functions.extend(keep)
    if op_schema.ONNX_DOMAIN not in _custom_domains(out):
        imports = [o for o in out.opset_import if o.domain != op_schema.ONNX_DOMAIN]
        del out.opset_import[:]
        out.opset_import.extend(imports)
    if _op_nodes(out.graph):
        raise FormError(f"{_op_nodes(out.graph)} {op_schema.OP_NAME} nodes are left after inlining")
    return out


def _per_layout(model: onnx.ModelProto, num_slots: int, onnx_op) -> onnx.ModelProto:
    """A copy of `model` whose op nodes call one function per layout (DeLeakerAttention_<layout name>)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), onnx_op.DEFAULT_OPSET)
    made = {}
    for node in out.graph.node:
        if (node.domain, node.op_type) != _OP:
            continue
        layout = _node_layout(node)
        name = f"{op_schema.OP_NAME}_{op_schema.LAYOUT_NAMES[layout]}"
        if name not in made:
            fn = onnx_op.make_function(num_slots, opset, layout=layout)
            fn.name = name
            made[name] = fn
        node.op_type = name
    out.functions.extend(made.values())
    return out


def make_portable(path: str | Path, num_slots: int | None = None) -> dict:
    """Rewrite transformer.onnx at `path` in the portable form, in place (weights in a .data file
    beside it are not read or rewritten), each op node inlined for its layout when `num_slots` (E)
    is given (inline_op). Returns the manifest entries of the form."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    inlined = inline_op(model, num_slots)
    del model
    onnx.save(inlined, str(path))
    onnx.checker.check_model(str(path))  # by path: also resolves the external data
    return manifest_entries(inlined.graph, PORTABLE)


def manifest_entries(graph: onnx.GraphProto, form: str) -> dict:
    """What the manifest records of the transformer's form (models.transformer)."""
    return {"form": form, "runs_on": FORMS[form], "op_nodes": _op_nodes(graph), "nodes": len(graph.node)}


def graph_form(model: onnx.ModelProto) -> str:
    """FUNCTION or PORTABLE, read from the graph itself."""
    has_fn = any((f.domain, f.name) == _OP for f in model.functions)
    nodes = _op_nodes(model.graph)
    if nodes and has_fn:
        return FUNCTION
    if not nodes and not has_fn and not _custom_domains(model):
        return PORTABLE
    raise FormError(f"the graph has {nodes} {op_schema.OP_NAME} nodes and "
                    f"{'a' if has_fn else 'no'} {op_schema.OP_NAME} function: neither form")


def check_form(model: onnx.ModelProto, entry: dict, blocks_per_step: int) -> str:
    """Check a transformer graph against its manifest entry; returns a one-line description.
    Raises FormError naming what differs."""
    recorded = entry.get("form", FUNCTION)  # artifacts written before the portable form have no entry
    if recorded not in FORMS:
        raise FormError(f"the manifest records an unknown transformer form {recorded!r} (known: {', '.join(FORMS)})")
    actual = graph_form(model)
    if actual != recorded:
        raise FormError(f"the manifest says the transformer is in the {recorded} form but the graph is {actual}")
    nodes = _op_nodes(model.graph)
    if actual == FUNCTION and nodes != blocks_per_step:
        raise FormError(f"the graph has {nodes} {op_schema.OP_NAME} nodes for {blocks_per_step} blocks per step")
    what = (f"{nodes} {op_schema.OP_NAME} nodes with their function" if actual == FUNCTION
            else f"{len(model.graph.node)} standard-ONNX nodes, no custom domain")
    return f"form  {actual}: {what} (runs on: {FORMS[actual]})"
