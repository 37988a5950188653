"""DeLeakerAttention as an ONNX model-local function: the portable path every ONNX runtime can run.

`make_function(num_slots)` builds a FunctionProto (domain `deleaker`, name `DeLeakerAttention`,
op contract v2: inputs/outputs/attributes in deleaker.runtime.op_schema order) whose body
computes docs/semantics.md in standard ONNX ops only, so ONNX Runtime (any execution provider)
runs a model holding these nodes with no plugin. The body materialises the (T+I) x (T+I) logits
per head in float32, like the reference op; speed is the plugin's job.

One FunctionProto serves every node of a model, and one model serves every step count and
DeLeaker setting: the per-sample settings (windows, thresholds, alpha, rule switches) are the
op's `windows` [B, 4], `knobs` [B, 3] and `rules` [B, 6] inputs, read column by column into [B]
tensors and broadcast per sample. Only the structural attributes (block_offset,
blocks_per_step, layout) are node attributes; they enter the body through attribute references
(Constant nodes with ref_attr_name). The layout (op_schema.LAYOUTS) is applied as a gather: the
body reorders q, k, v into the canonical order (text, image, excluded) with positions computed
from T, I = h * w and N at run time, computes there, and scatters the output rows back; for
text_image the gather is the identity. The portable form inlines a body made for each node's
layout (make_function(..., layout=)), where an identity layout has no reorder at all. E (entity slots) is fixed at export, so the pair loop of
section 4.2 is unrolled over all slot pairs, and each pair is gated per sample on both slots
being active and on that sample intervening at this tau: an inactive pair changes nothing,
which is the same as iterating over the active slots only.

`make_node(...)` emits a node calling the function, carrying `plugin_namespace` and
`plugin_version` so TensorRT binds it to the plugin instead of the body.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import onnx
from onnx import TensorProto, helper

from deleaker.runtime import op_schema

# Default-domain opset of the function body (and of single-op test models). Opset 18 is the
# first with ReduceMax/ReduceMean axes as inputs; models on a newer opset pass their own.
DEFAULT_OPSET = 18
# The two node-only attributes TensorRT uses to bind a node to a plugin (docs/architecture.md).
PLUGIN_ATTRIBUTES = ("plugin_namespace", "plugin_version")

_NEG_INF = float("-inf")


class _Body:
    """Tiny SSA graph builder: every call appends one node and returns its output name(s)."""

    def __init__(self, prefix: str):
        self.nodes: list[onnx.NodeProto] = []
        self._prefix = prefix
        self._count = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{self._prefix}{hint}_{next(self._count)}"

    def op(self, op_type: str, *inputs: str, outs: int = 1, hint: str | None = None, **attrs):
        names = [self.fresh(hint or op_type) for _ in range(outs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outs == 1 else names

    # constants ----------------------------------------------------------------------------
    def i64(self, values: Sequence[int] | int, hint: str = "c") -> str:
        if isinstance(values, int):  # 0-d
            t = helper.make_tensor(self.fresh(hint), TensorProto.INT64, [], [values])
        else:
            t = helper.make_tensor(self.fresh(hint), TensorProto.INT64, [len(values)], list(values))
        return self.op("Constant", value=t, hint=hint)

    def f32(self, value: float, hint: str = "c") -> str:
        return self.op("Constant", value=helper.make_tensor(self.fresh(hint), TensorProto.FLOAT, [], [value]),
                       hint=hint)

    def attr(self, name: str, kind: str) -> str:
        """A 0-d tensor holding the node attribute `name` (attribute reference)."""
        a = onnx.AttributeProto()
        a.name = "value_int" if kind == "int" else "value_float"
        a.ref_attr_name = name
        a.type = onnx.AttributeProto.INT if kind == "int" else onnx.AttributeProto.FLOAT
        n = helper.make_node("Constant", [], [self.fresh(name)])
        n.attribute.append(a)
        self.nodes.append(n)
        return n.output[0]

    # helpers ------------------------------------------------------------------------------
    def mean(self, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        return self.op("ReduceMean", x, self.i64(list(axes)), keepdims=keepdims)

    def sum(self, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        return self.op("ReduceSum", x, self.i64(list(axes)), keepdims=keepdims)

    def unsq(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", x, self.i64(list(axes)))

    def fl(self, x: str) -> str:
        return self.op("Cast", x, to=TensorProto.FLOAT)

    def outer(self, rows: str, cols: str) -> str:
        """rows [B, N] bool, cols [B, N] bool -> [B, N, N] bool (rows x cols)."""
        return self.op("And", self.unsq(rows, [2]), self.unsq(cols, [1]))

    def any_of(self, *xs: str) -> str:
        out = xs[0]
        for x in xs[1:]:
            out = self.op("Or", out, x)
        return out

    def gather(self, x: str, index: int, axis: int) -> str:
        """x[..., index, ...] with the axis dropped."""
        return self.op("Gather", x, self.i64(index), axis=axis)


def _masked_mean_std(b: _Body, x: str, sel: str, axes: Sequence[int]):
    """Per-sample mean and unbiased std of x over the positions where sel (float 0/1) is 1.

    Returns (mean, std, count), reduced over `axes` with keepdims. Denominators are clamped so
    no NaN is made; callers gate on count themselves (count < 2: no std, section 4.2 rule X).
    """
    one = b.f32(1.0)
    count = b.sum(sel, axes)
    mean = b.op("Div", b.sum(b.op("Mul", x, sel), axes), b.op("Max", count, one))
    dev = b.op("Mul", b.op("Sub", x, mean), sel)
    var = b.op("Div", b.sum(b.op("Mul", dev, dev), axes), b.op("Max", b.op("Sub", count, one), one))
    return mean, b.op("Sqrt", var), count


def _morph(b: _Body, x4: str, grow: bool) -> str:
    """One 3x3 dilation (grow) or erosion of 0/1 floats [B*E, 1, h, w].

    MaxPool ignores its padding, so outside the grid counts as 0 for a dilation; an erosion is
    1 - dilate(1 - x), so outside counts as 1 there (section 4.1 border rule).
    """
    pool = dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    if grow:
        return b.op("MaxPool", x4, **pool)
    one = b.f32(1.0)
    return b.op("Sub", one, b.op("MaxPool", b.op("Sub", one, x4), **pool))


def _smooth(b: _Body, masks: str, grid: str) -> str:
    """Open once, then close with two iterations, on the h x w grid. masks [B, E, I] float 0/1."""
    shape4 = b.op("Concat", b.i64([-1, 1]), grid, axis=0)  # [-1, 1, h, w]
    m = b.op("Reshape", masks, shape4)
    for grow in (False, True, True, True, False, False):  # erode, dilate | dilate x2, erode x2
        m = _morph(b, m, grow)
    return b.op("Reshape", m, b.op("Shape", masks))


def _pair_loop(num_slots: int, s: dict) -> tuple[onnx.GraphProto, str]:
    """Section 4.2 as the then-branch of an If: returns the branch graph and its output (final P).

    `s` names outer-scope values of the function body (If branches read them directly). Every
    edit is gated per sample: on the pair's slots both being active and the sample intervening
    at this tau (`live`), and on the sample's own rule switches; alpha and beta2 are per sample.
    """
    b = _Body("pl_")
    L, P = s["L"], s["P"]
    neg_inf = b.f32(_NEG_INF)
    for e1, e2 in itertools.combinations(range(num_slots), 2):
        # this pair is live in a sample iff both slots are active there and the sample intervenes: [B, 1, 1]
        both = b.op("And", b.gather(s["active"], e1, 1), b.gather(s["active"], e2, 1))  # [B]
        live = b.unsq(b.op("And", both, s["intervening"]), [1, 2])
        r1, r2 = b.gather(s["rows"], e1, 1), b.gather(s["rows"], e2, 1)  # image rows of each mask, [B, N]
        c1, c2 = b.gather(s["cols"], e1, 1), b.gather(s["cols"], e2, 1)  # entity token columns, [B, N]

        # W: rows of one entity lose the other entity's tokens.
        weak = b.op("And", b.op("Or", b.outer(r1, c2), b.outer(r2, c1)), s["do_w"])
        # S: rows of one entity have their own entity's logits multiplied by alpha.
        strong = b.op("And", b.op("Or", b.outer(r1, c1), b.outer(r2, c2)), s["do_s"])
        # TT: the entities' first tokens stop attending to each other.
        f1, f2 = b.gather(s["firsts"], e1, 1), b.gather(s["firsts"], e2, 1)  # [B, N]
        tt = b.op("And", b.op("Or", b.outer(f1, f2), b.outer(f2, f1)), s["do_tt"])

        # X: image-image cut on the head-mean of the current probabilities. rows r1/r2 are zero on
        # text positions, so the region r1 x r2 over the joint sequence is exactly image x image.
        G = b.mean(P, [1], keepdims=0)  # [B, N, N]
        nonzero = b.op("Not", b.op("Equal", G, b.f32(0.0)))
        cuts = []
        for ra, rb in ((r1, r2), (r2, r1)):
            region = b.outer(ra, rb)  # [B, N, N]
            sel = b.fl(b.op("And", region, nonzero))
            mean, std, count = _masked_mean_std(b, G, sel, [1, 2])  # [B, 1, 1] each
            thr = b.op("Add", mean, b.op("Mul", s["beta2"], std))
            # fewer than 2 non-zero values: no std (NaN in the reference), nothing is cut
            enough = b.op("Greater", count, b.f32(1.0))
            cuts.append(b.op("And", b.op("And", region, b.op("Greater", G, thr)), enough))
        cut = b.op("And", b.op("Or", cuts[0], cuts[1]), s["do_x"])

        # -inf wins over the alpha multiply (-inf * alpha = -inf), so the order W, S, TT, X holds.
        to_neg = b.unsq(b.op("And", b.any_of(weak, tt, cut), live), [1])  # [B, 1, N, N]
        to_mul = b.unsq(b.op("And", strong, live), [1])
        L = b.op("Where", to_mul, b.op("Mul", L, s["alpha"]), L)
        L = b.op("Where", to_neg, neg_inf, L)
        # a sample with nothing live keeps L bit for bit, so its softmax is the plain P again
        P = b.op("Softmax", L, axis=-1)
    out = b.op("Identity", P, hint="P_final")
    graph = helper.make_graph(b.nodes, "deleaker_pair_loop", [],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
    return graph, out


def _settings(b: _Body) -> dict[str, str]:
    """Every op_schema.SETTINGS column of the windows/knobs/rules inputs as a [B] tensor
    (int64 windows, float32 knobs, bool rule switches)."""
    out = {}
    for spec in op_schema.SETTINGS:
        col = b.gather(spec.tensor, spec.index, axis=1)  # [B]
        out[spec.name] = b.op("Cast", col, to=TensorProto.BOOL) if spec.type == "bool" else col
    return out


def _canonical_order(b: _Body, layout: str, T: str, I: str, N: str) -> str:
    """[N] int64: the model position of each canonical token (op_schema.canonical_order), for the
    layout code `layout` (0-d) and the segment lengths T, I and X = N - T - I ([1] each).

    Segment starts are a fixed linear function of the lengths per layout: start[seg] =
    sum of the lengths of the segments before it, a 0/1 row per (layout, segment) in a constant."""
    table = []  # [layouts, 3 segments, 3 lengths]
    for lay in op_schema.LAYOUTS:
        for seg in op_schema.CANONICAL:
            before = lay[:lay.index(seg)] if seg in lay else lay
            table += [int(other in before) for other in op_schema.SEGMENTS]
    coef = b.op("Constant", value=helper.make_tensor(b.fresh("layouts"), TensorProto.INT64,
                                                     [len(op_schema.LAYOUTS), 3, 3], table), hint="layouts")
    X = b.op("Sub", N, b.op("Add", T, I))  # [1]
    lengths = b.op("Concat", T, I, X, axis=0)  # [3] in SEGMENTS order
    # [3]: the start of each canonical segment in the model's order
    starts = b.sum(b.op("Mul", b.op("Gather", coef, layout, axis=0), lengths), [1], keepdims=0)
    parts = []
    for j, seg in enumerate(op_schema.CANONICAL):
        start = b.gather(starts, j, axis=0)  # 0-d
        length = b.op("Squeeze", {"text": T, "image": I, "excluded": X}[seg], b.i64([0]))
        parts.append(b.op("Range", start, b.op("Add", start, length), b.i64(1)))
    return b.op("Concat", *parts, axis=0)


def make_function(num_slots: int, opset: int = DEFAULT_OPSET, layout: int | None = None) -> onnx.FunctionProto:
    """The DeLeakerAttention FunctionProto for models with `num_slots` entity slots (E).

    layout None: the body reads the node's `layout` attribute (one function for every node).
    layout given: a body for nodes of that layout only (the portable form inlines one per
    node, export/onnx_portable.py): an identity layout (op_schema.is_identity_layout, FLUX.1's
    text_image) has no reorder nodes at all, as the reference op skips its gather; another
    layout gathers with its code as a constant. Such a body ignores the node's attribute."""
    if num_slots < 1:
        raise ValueError(f"num_slots (entity slots E) must be >= 1, got {num_slots}")
    if layout is not None and not 0 <= layout < len(op_schema.LAYOUTS):
        raise ValueError(f"layout must be 0..{len(op_schema.LAYOUTS) - 1} ({', '.join(op_schema.LAYOUT_NAMES)}), "
                         f"got {layout}")
    identity = layout is not None and op_schema.is_identity_layout(layout)
    b = _Body("dl_")
    q, k, v, ent, hist, step, grid = (t.name for t in op_schema.INPUTS[:7])
    a = {spec.name: b.attr(spec.name, spec.type) for spec in op_schema.ATTRIBUTES
         if spec.name != "layout" or layout is None}
    if layout is not None and not identity:
        a["layout"] = b.i64(layout, hint="layout")  # 0-d
    st = _settings(b)  # per sample, [B] each

    def per_sample(x: str, rank: int) -> str:
        """[B] -> [B, 1, ...] of the given rank, to broadcast against [B, ...] tensors."""
        return b.unsq(x, list(range(1, rank)))

    # ---- shapes and the clock ----------------------------------------------------------
    T = b.op("Shape", ent, start=2, end=3)  # [1]
    N = b.op("Shape", q, start=2, end=3)  # [1]
    D = b.fl(b.op("Shape", q, start=3, end=4))  # [1]
    # a layout without the excluded segment (text_image, image_text) has none: T + I = N
    excluded = layout is None or "excluded" in op_schema.LAYOUTS[layout]
    # [1] = h * w; the identity layout text_image needs no I at all (its image rows end at N)
    I = b.op("ReduceProd", grid, b.i64([0]), keepdims=1) if excluded or not identity else None
    order = None if identity else _canonical_order(b, a["layout"], T, I, N)  # [N]: model position of each
    if order is not None:                                                    # canonical token
        q, k, v = (b.op("Gather", x, order, axis=2, hint="to_canonical") for x in (q, k, v))  # from here on
    tau = b.op("Add", b.op("Mul", step, a["blocks_per_step"]), a["block_offset"])  # 0-d int64
    a0, a1 = st["start_aggregating_from"], st["stop_aggregating_at"]  # [B] int64
    started = b.op("Not", b.op("Less", tau, a0))  # tau >= a0, [B]
    in_window = b.op("And", b.op("Not", b.op("Less", tau, st["start_intervention_from"])),
                     b.op("Not", b.op("Greater", tau, st["stop_intervention_at"])))  # [B]

    # ---- plain attention in float32 (section 1) ----------------------------------------
    qf, kf, vf = b.fl(q), b.fl(k), b.fl(v)
    L = b.op("Div", b.op("MatMul", qf, b.op("Transpose", kf, perm=[0, 1, 3, 2])), b.op("Sqrt", D))  # [B,H,N,N]
    P = b.op("Softmax", L, axis=-1)

    # ---- entity slots ------------------------------------------------------------------
    tokset = b.fl(b.op("Greater", b.fl(ent), b.f32(0.0)))  # [B, E, T] 0/1
    ntok = b.sum(tokset, [2])  # [B, E, 1]
    active = b.op("Greater", b.op("Squeeze", ntok, b.i64([2])), b.f32(0.0))  # [B, E] bool

    # ---- p_e[i] = mean_k mean_{t in t(e)} P_k[T+i, t]; history update (section 3) ------
    TI = b.op("Add", T, I) if excluded else N  # [1] end of the image rows
    img_text = b.op("Slice", P, b.op("Concat", T, b.i64([0]), axis=0), b.op("Concat", TI, T, axis=0),
                    b.i64([2, 3]))  # [B, H, I, T]
    per_tok = b.mean(img_text, [1], keepdims=0)  # [B, I, T]
    p = b.op("Div", b.op("MatMul", tokset, b.op("Transpose", per_tok, perm=[0, 2, 1])),
             b.op("Max", ntok, b.f32(1.0)))  # [B, E, I]
    # n = tau - a0 per sample, clamped at 0 (samples before a0 do not update; no division by 0)
    n = per_sample(b.fl(b.op("Max", b.op("Sub", tau, a0), b.i64(0))), 3)  # [B, 1, 1]
    n1 = b.op("Add", n, b.f32(1.0))
    running = b.op("Add", b.op("Mul", hist, b.op("Div", n, n1)), b.op("Div", p, n1))
    updated = b.op("Where", per_sample(b.op("Equal", tau, a0), 3), p, running)
    updating = b.op("And", b.op("And", st["use_history"], started), b.op("Less", tau, a1))  # [B]
    write = b.op("And", b.unsq(active, [2]), per_sample(updating, 3))  # [B, E, 1]; inactive slots keep theirs
    hist_out = b.op("Where", write, updated, hist, hint="history_out")

    # ---- entity masks (section 4.1) -----------------------------------------------------
    from_hist = per_sample(b.op("And", st["use_history"], b.op("Greater", tau, a0)), 3)  # [B, 1, 1]
    src = b.op("Where", from_hist, hist_out, p)  # [B, E, I]
    ones = b.op("Expand", b.f32(1.0), b.op("Shape", src))
    mean, std, _ = _masked_mean_std(b, src, ones, [2])
    beta1 = per_sample(st["std_mul_text"], 3)
    masks = b.fl(b.op("Greater", src, b.op("Add", mean, b.op("Mul", beta1, std))))
    masks = b.op("Where", per_sample(st["do_smoothing"], 3), _smooth(b, masks, grid), masks)
    # widen to the joint sequence: image rows of each mask, entity token columns, first tokens [B,E,N]
    zeros_t = b.op("Expand", b.f32(0.0), b.op("Concat", b.op("Shape", ent, end=2), T, axis=0))  # [B, E, T]
    zeros_i = b.op("Mul", masks, b.f32(0.0))  # [B, E, I]
    tail = []
    if excluded:
        X = b.op("Sub", N, TI)  # [1] excluded tokens, after the image in canonical order
        tail = [b.op("Expand", b.f32(0.0), b.op("Concat", b.op("Shape", ent, end=2), X, axis=0))]  # [B, E, X]
    rows = b.op("Cast", b.op("Concat", zeros_t, masks, *tail, axis=2), to=TensorProto.BOOL)
    cols = b.op("Cast", b.op("Concat", tokset, zeros_i, *tail, axis=2), to=TensorProto.BOOL)
    first = b.op("ArgMax", tokset, axis=2, keepdims=1, select_last_index=0)  # [B, E, 1]
    pos = b.op("Range", b.i64(0), b.op("Squeeze", N, b.i64([0])), b.i64(1))  # [N]
    firsts = b.op("Equal", pos, first)  # [B, E, N] one-hot of each slot's first token

    # ---- intervene (section 4.2): per sample inside its window with two active slots; the If
    # skips the pair loop when no sample of the batch intervenes -----------------------------
    n_active = b.sum(b.fl(active), [1], keepdims=0)  # [B]
    intervening = b.op("And", b.op("And", in_window, started), b.op("Greater", n_active, b.f32(1.0)))  # [B]
    any_sample = b.op("Cast", b.op("ReduceMax", b.fl(intervening), b.i64([0]), keepdims=0), to=TensorProto.BOOL)
    rule = {name: per_sample(st[name], 3) for name in ("do_image_text_weakening", "do_image_text_strengthening",
                                                        "do_text_text_weakening", "do_image_image")}
    scope = dict(L=L, P=P, active=active, intervening=intervening, rows=rows, cols=cols, firsts=firsts,
                 alpha=per_sample(st["k_strength"], 4), beta2=per_sample(st["std_mul_image_image"], 3),
                 do_w=rule["do_image_text_weakening"], do_s=rule["do_image_text_strengthening"],
                 do_tt=rule["do_text_text_weakening"], do_x=rule["do_image_image"])
    then_graph, _ = _pair_loop(num_slots, scope)
    else_b = _Body("plain_")
    else_out = else_b.op("Identity", P, hint="P_plain")
    else_graph = helper.make_graph(else_b.nodes, "deleaker_plain", [],
                                   [helper.make_tensor_value_info(else_out, TensorProto.FLOAT, None)])
    P_final = b.op("If", any_sample, then_branch=then_graph, else_branch=else_graph, hint="P_final")

    # ---- output (section 4.3) -------------------------------------------------------------
    out_name, hist_name = (t.name for t in op_schema.OUTPUTS)
    canon = b.op("MatMul", P_final, vf)  # [B, H, N, D], canonical order
    model_order = canon
    if order is not None:  # rows back to the model's order: out[:, :, order[j]] = canon[:, :, j]
        shape = b.op("Shape", canon)
        index = b.op("Expand", b.unsq(order, [0, 1, 3]), shape)  # [B, H, N, D]
        model_order = b.op("ScatterElements", b.op("Mul", canon, b.f32(0.0)), index, canon, axis=2,
                           hint="to_model_order")
    b.nodes.append(helper.make_node("CastLike", [model_order, q], [out_name]))
    b.nodes.append(helper.make_node("Identity", [hist_out], [hist_name]))

    # Declared attributes: the op's, plus the plugin binding pair (with defaults) so nodes may
    # carry them; the body never reads those two.
    attr_protos = [helper.make_attribute(name, value) for name, value in
                   (("plugin_namespace", op_schema.PLUGIN_NAMESPACE),
                    ("plugin_version", op_schema.PLUGIN_VERSION),
                    *op_schema.ATTRIBUTE_DEFAULTS.items())]  # a node without `layout` means text_image
    return helper.make_function(
        op_schema.ONNX_DOMAIN, op_schema.OP_NAME,
        inputs=list(op_schema.INPUT_NAMES), outputs=[t.name for t in op_schema.OUTPUTS],
        nodes=b.nodes, opset_imports=[helper.make_opsetid("", opset)],
        attributes=[n for n in op_schema.ATTRIBUTE_NAMES if n not in op_schema.ATTRIBUTE_DEFAULTS],
        attribute_protos=attr_protos,
        doc_string=f"DeLeaker attention v{op_schema.ONNX_OPSET_VERSION} (semantics.md), standard ONNX ops, "
                   f"E={num_slots} slots, per-sample settings",
    )


def make_node(inputs: Sequence[str], outputs: Sequence[str], attrs: dict, name: str | None = None,
              plugin: bool = True) -> onnx.NodeProto:
    """A DeLeakerAttention node. inputs: op_schema.INPUTS order (settings tensors included);
    attrs: the structural attributes, op_schema.node_attributes(block_offset, blocks_per_step).

    With plugin=True the node carries plugin_namespace/plugin_version so TensorRT binds it to
    the plugin; ONNX Runtime ignores them and runs the function body.
    """
    problem = op_schema.attribute_problem(attrs)
    if problem:
        raise ValueError(f"DeLeakerAttention {problem} "
                         f"(v{op_schema.ONNX_OPSET_VERSION}: DeLeaker settings are the windows/knobs/rules inputs)")
    if len(inputs) != len(op_schema.INPUTS) or len(outputs) != len(op_schema.OUTPUTS):
        raise ValueError(f"DeLeakerAttention takes {len(op_schema.INPUTS)} inputs ({', '.join(op_schema.INPUT_NAMES)}) "
                         f"and gives {len(op_schema.OUTPUTS)} outputs; got {len(inputs)} and {len(outputs)}")
    values = dict(zip(op_schema.ATTRIBUTE_NAMES, op_schema.attribute_values(attrs)))
    if plugin:
        values["plugin_namespace"] = op_schema.PLUGIN_NAMESPACE
        values["plugin_version"] = op_schema.PLUGIN_VERSION
    return helper.make_node(op_schema.OP_NAME, list(inputs), list(outputs), name=name,
                            domain=op_schema.ONNX_DOMAIN, **values)


def is_op_node(node: onnx.NodeProto) -> bool:
    return node.domain == op_schema.ONNX_DOMAIN and node.op_type == op_schema.OP_NAME


def attach_function(model: onnx.ModelProto, num_slots: int) -> onnx.ModelProto:
    """Add (or replace) the DeLeakerAttention FunctionProto and the `deleaker` opset import, in place.

    The body uses the model's default-domain opset (>= 18), so the checker sees one version.
    """
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", DEFAULT_OPSET)
    if opset < DEFAULT_OPSET:
        raise ValueError(f"the DeLeakerAttention body needs default-domain opset >= {DEFAULT_OPSET}; "
                         f"the model imports {opset}")
    keep = [f for f in model.functions if not (f.domain == op_schema.ONNX_DOMAIN and f.name == op_schema.OP_NAME)]
    del model.functions[:]
    model.functions.extend(keep + [make_function(num_slots, opset)])
    if op_schema.ONNX_DOMAIN not in opsets:
        model.opset_import.append(helper.make_opsetid(op_schema.ONNX_DOMAIN, op_schema.ONNX_OPSET_VERSION))
    return model


_ELEM = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}
_SCHEMA_ELEM = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64}  # op_schema's fixed dtypes


def make_single_op_model(num_slots: int, attrs: dict, dtype: str = "float32", opset: int = DEFAULT_OPSET,
                         plugin: bool = True, function: onnx.FunctionProto | None = None) -> onnx.ModelProto:
    """A one-node model around the op (dynamic shapes, op_schema.INPUTS as graph inputs), for tests
    and `deleaker-export verify`. attrs: op_schema.node_attributes(block_offset, blocks_per_step).

    `function`: use this FunctionProto (e.g. the one inside an exported artifact, with its
    opset) instead of building one."""
    def value_info(t: op_schema.TensorSpec):
        # the schema's shape "[B, E, T]" with the fixed sizes filled in: E = num_slots, T+I = N
        dims = [d.strip() for d in t.shape.split("]")[0].strip("[").split(",") if d.strip()]
        dims = [num_slots if d == "E" else "N" if d == "T+I" else int(d) if d.isdigit() else d for d in dims]
        return helper.make_tensor_value_info(t.name, _ELEM[dtype] if t.dtype == "float" else _SCHEMA_ELEM[t.dtype],
                                             dims)

    inputs = [value_info(t) for t in op_schema.INPUTS]  # q, k, v [B, H, N, D] ... rules [B, 6]
    outputs = [value_info(t) for t in op_schema.OUTPUTS]  # out [B, H, N, D], history_out [B, E, I]
    node = make_node([i.name for i in inputs], [o.name for o in outputs], attrs, name="deleaker_attention_0",
                     plugin=plugin)
    graph = helper.make_graph([node], "deleaker_attention_single", inputs, outputs)
    if function is not None:
        opset = next((o.version for o in function.opset_import if o.domain in ("", "ai.onnx")), opset)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="deleaker-export")
    if function is None:
        return attach_function(model, num_slots)
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid(op_schema.ONNX_DOMAIN, op_schema.ONNX_OPSET_VERSION))
    return model


def function_body_op_types(fn: onnx.FunctionProto) -> set[tuple[str, str]]:
    """(domain, op_type) of every node in the body, subgraphs included (for tests)."""
    found = set()

    def walk(nodes):
        for nd in nodes:
            found.add((nd.domain, nd.op_type))
            for at in nd.attribute:
                if at.type == onnx.AttributeProto.GRAPH:
                    walk(at.g.node)
                for g in at.graphs:
                    walk(g.node)

    walk(fn.node)
    return found


