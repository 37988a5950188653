"""The C side of runtime/op_schema.py: renders the generated headers of plugins/.

- plugins/deleaker_attention/include/deleaker_settings.h (included by deleaker_attention.h):
  the settings column enums and widths, the op's input and attribute lists and the settings
  list the kernels' Settings struct and loader are expanded from;
- plugins/tensorrt/deleaker_fields.h: the TensorRT plugin's names, I/O order, dtypes, ranks and
  attribute fields.

    python -m deleaker.runtime.op_schema_c          # rewrite both headers
    python -m deleaker.runtime.op_schema_c --check  # exit 1 if a committed header is stale

tests/modeling/test_op_schema_c.py fails when a committed header differs from render().
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import op_schema as s

REPO = Path(__file__).resolve().parents[1]
SETTINGS_HEADER = Path("plugins/deleaker_attention/include/deleaker_settings.h")
FIELDS_HEADER = Path("plugins/tensorrt/deleaker_fields.h")
COMMAND = "python -m deleaker.runtime.op_schema_c"
_BANNER = [f"/* Generated from runtime/op_schema.py: do not edit. Regenerate with `{COMMAND}`. */"]
# dtype class of a tensor in op_schema -> the TensorRT header's kind constant
_KINDS = {"float": "DL_KIND_ATTN", "float32": "DL_KIND_F32", "int64": "DL_KIND_I64"}
# setting type -> how the kernels load it (common.cuh: DL_LOAD_<kind>)
_LOAD_KINDS = {"int": "I64", "float": "F32", "bool": "FLAG"}


def _ident(name: str) -> str:
    return name.upper()


def column_macro(spec: s.SettingSpec) -> str:
    return f"DL_{_ident(spec.tensor)}_{_ident(spec.name)}"


def _xmacro(name: str, items: list[str]) -> list[str]:
    return [f"#define {name}(X) \\"] + [f"  {it} \\" for it in items[:-1]] + [f"  {items[-1]}"]


def render_settings() -> str:
    lines = _BANNER + ["#ifndef DELEAKER_SETTINGS_H", "#define DELEAKER_SETTINGS_H", "",
                       "/* Columns of the per-sample settings inputs (DL_<TENSOR>_<SETTING>); DL_<TENSOR>_WIDTH: "
                       "columns per sample. */"]
    for t in s.SETTINGS_TENSORS:
        lines.append("enum {")
        lines += [f"  {column_macro(c)} = {c.index}, /* {c.doc} */" for c in s.settings_of(t)]
        lines += [f"  DL_{_ident(t)}_WIDTH = {s.settings_width(t)}", "};"]
    lines += ["", "/* The op's inputs and attributes, in order (the torch adapter's parameter lists). */"]
    lines += _xmacro("DL_OP_TENSORS", [f"X({n})" for n in s.INPUT_NAMES])
    lines += _xmacro("DL_OP_ATTRS", [f"X({n})" for n in s.ATTRIBUTE_NAMES])
    lines += ["", "/* Every setting as X(tensor, column, width, kernel field, kind): kind I64 (int64 window), F32",
              " * (float knob) or FLAG (0/1 rule); the kernels' Settings struct and loader expand it. */"]
    lines += _xmacro("DL_SETTINGS", [f"X({c.tensor}, {column_macro(c)}, DL_{_ident(c.tensor)}_WIDTH, {c.kernel}, "
                                     f"{_LOAD_KINDS[c.type]})"
                                     for c in s.settings_by_column()])
    lines += ["", "#endif /* DELEAKER_SETTINGS_H */"]
    return "\n".join(lines) + "\n"


def _rank(shape: str) -> int:
    """Rank of a symbolic op_schema shape: "[B, H, T+I, D]" -> 4, "[] (scalar)" -> 0."""
    inner = shape[shape.index("[") + 1:shape.index("]")]
    return len([d for d in inner.split(",") if d.strip()])


def render_fields() -> str:
    for a in s.ATTRIBUTES:
        if a.type != "int":  # the plugin keeps attributes as int64; a float one needs plugin code
            raise ValueError(f"attribute {a.name} has type {a.type!r}; the TensorRT plugin supports int only")
    for t in s.INPUTS + s.OUTPUTS:
        if t.dtype not in _KINDS:
            raise ValueError(f"tensor {t.name} has dtype {t.dtype!r}, unknown to the TensorRT plugin")

    def enum(prefix: str, names, count: str) -> list[str]:
        return ["enum {"] + [f"  {prefix}{_ident(n)} = {i}," for i, n in enumerate(names)] + \
            [f"  {count} = {len(names)}", "};"]

    def strings(ctype: str, names) -> str:
        return f"static const char* const {ctype}[] = {{" + ", ".join(f'"{n}"' for n in names) + "};"

    def ints(ctype: str, count: str, values) -> str:
        return f"static const int {ctype}[{count}] = {{" + ", ".join(str(v) for v in values) + "};"

    outputs = [t.name for t in s.OUTPUTS]
    lines = _BANNER + [
        "#ifndef DELEAKER_TRT_FIELDS_H",
        "#define DELEAKER_TRT_FIELDS_H",
        "",
        f'#define DL_TRT_PLUGIN_NAME "{s.PLUGIN_NAME}"',
        f'#define DL_TRT_PLUGIN_NAMESPACE "{s.PLUGIN_NAMESPACE}"',
        f'#define DL_TRT_PLUGIN_VERSION "{s.PLUGIN_VERSION}"',
        f"#define DL_TRT_OP_VERSION {s.ONNX_OPSET_VERSION}",
        "",
        "/* dtype class of each input/output: q's type (fp16 or bf16), float32, int64 */",
        "enum { DL_KIND_ATTN = 0, DL_KIND_F32 = 1, DL_KIND_I64 = 2 };",
        "",
        "/* inputs, in op order (the settings inputs' widths: deleaker_settings.h) */",
        *enum("DL_IN_", s.INPUT_NAMES, "DL_NUM_INPUTS"),
        strings("kDlInputNames", s.INPUT_NAMES),
        ints("kDlInputKinds", "DL_NUM_INPUTS", (_KINDS[t.dtype] for t in s.INPUTS)),
        ints("kDlInputRanks", "DL_NUM_INPUTS", (_rank(t.shape) for t in s.INPUTS)),
        "",
        "/* outputs, in op order */",
        *enum("DL_OUT_", outputs, "DL_NUM_OUTPUTS"),
        strings("kDlOutputNames", outputs),
        ints("kDlOutputKinds", "DL_NUM_OUTPUTS", (_KINDS[t.dtype] for t in s.OUTPUTS)),
        ints("kDlOutputRanks", "DL_NUM_OUTPUTS", (_rank(t.shape) for t in s.OUTPUTS)),
        "",
        "/* attributes = PluginFields (int64, one value each), in op order */",
        *enum("DL_ATTR_", s.ATTRIBUTE_NAMES, "DL_NUM_ATTRS"),
        strings("kDlAttrNames", s.ATTRIBUTE_NAMES),
        "",
        "#endif /* DELEAKER_TRT_FIELDS_H */",
    ]
    return "\n".join(lines) + "\n"


def render() -> dict[Path, str]:
    """{path relative to the repository: text} of every generated header."""
    return {SETTINGS_HEADER: render_settings(), FIELDS_HEADER: render_fields()}


def stale(root: Path = REPO) -> list[Path]:
    """Generated headers under `root` that differ from render()."""
    out = []
    for rel, text in render().items():
        path = root / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare with the committed headers")
    p.add_argument("--root", type=Path, default=REPO, help="repository root (default: %(default)s)")
    args = p.parse_args(argv)
    if not (args.root / "plugins").is_dir():
        print(f"{COMMAND}: no plugins/ folder under {args.root} (run it from a source checkout)", file=sys.stderr)
        return 2
    if args.check:
        bad = stale(args.root)
        for rel in bad:
            print(f"{rel} is stale: run {COMMAND}", file=sys.stderr)
        return 1 if bad else 0
    for rel, text in render().items():
        (args.root / rel).write_text(text, encoding="utf-8")
        print(f"wrote {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
