"""Writes deleaker_fields.h (the TensorRT plugin's names, I/O order, dtypes and attribute fields)
from runtime/op_schema.py, so the plugin and the op contract cannot drift apart.

    python plugins/tensorrt/gen_fields.py          # rewrite the header
    python plugins/tensorrt/gen_fields.py --check  # exit 1 if the committed header is stale

tests/test_tensorrt_plugin.py checks that the committed header equals render().
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HEADER = Path(__file__).resolve().with_name("deleaker_fields.h")
# dtype class of a tensor in op_schema -> the header's kind constant
_KINDS = {"float": "DL_KIND_ATTN", "float32": "DL_KIND_F32", "int64": "DL_KIND_I64"}


def _schema():
    try:
        from deleaker.runtime import op_schema
    except ImportError:  # a source checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
        from runtime import op_schema  # type: ignore[no-redef]
    return op_schema


def _rank(shape: str) -> int:
    """Rank of a symbolic op_schema shape: "[B, H, T+I, D]" -> 4, "[] (scalar)" -> 0."""
    inner = shape[shape.index("[") + 1:shape.index("]")]
    return len([d for d in inner.split(",") if d.strip()])


def _ident(name: str) -> str:
    return name.upper()


def render() -> str:
    s = _schema()
    for a in s.ATTRIBUTES:
        if a.type != "int":  # the plugin keeps attributes as int64; a float one needs plugin code
            raise ValueError(f"attribute {a.name} has type {a.type!r}; the TensorRT plugin supports int only")
    for t in s.INPUTS + s.OUTPUTS:
        if t.dtype not in _KINDS:
            raise ValueError(f"tensor {t.name} has dtype {t.dtype!r}, unknown to the TensorRT plugin")

    def enum(prefix: str, names, count: str) -> list[str]:
        return [f"enum {{"] + [f"  {prefix}{_ident(n)} = {i}," for i, n in enumerate(names)] + \
            [f"  {count} = {len(names)}", "};"]

    def strings(ctype: str, names) -> str:
        return f"static const char* const {ctype}[] = {{" + ", ".join(f'"{n}"' for n in names) + "};"

    def ints(ctype: str, count: str, values) -> str:
        return f"static const int {ctype}[{count}] = {{" + ", ".join(str(v) for v in values) + "};"

    lines = [
        "/* Generated from runtime/op_schema.py by plugins/tensorrt/gen_fields.py: do not edit.",
        " * Regenerate with `python plugins/tensorrt/gen_fields.py`. */",
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
        "/* inputs, in op order */",
        *enum("DL_IN_", s.INPUT_NAMES, "DL_NUM_INPUTS"),
        strings("kDlInputNames", s.INPUT_NAMES),
        ints("kDlInputKinds", "DL_NUM_INPUTS", (_KINDS[t.dtype] for t in s.INPUTS)),
        ints("kDlInputRanks", "DL_NUM_INPUTS", (_rank(t.shape) for t in s.INPUTS)),
        "",
        "/* outputs, in op order */",
        *enum("DL_OUT_", [t.name for t in s.OUTPUTS], "DL_NUM_OUTPUTS"),
        strings("kDlOutputNames", [t.name for t in s.OUTPUTS]),
        ints("kDlOutputKinds", "DL_NUM_OUTPUTS", (_KINDS[t.dtype] for t in s.OUTPUTS)),
        ints("kDlOutputRanks", "DL_NUM_OUTPUTS", (_rank(t.shape) for t in s.OUTPUTS)),
        "",
        "/* columns of the per-sample settings inputs */",
        *(f"#define DL_{_ident(n)}_WIDTH {s.settings_width(n)}" for n in s.SETTINGS_TENSORS),
        "",
        "/* attributes = PluginFields (int64, one value each), in op order */",
        *enum("DL_ATTR_", s.ATTRIBUTE_NAMES, "DL_NUM_ATTRS"),
        strings("kDlAttrNames", s.ATTRIBUTE_NAMES),
        "",
        "#endif /* DELEAKER_TRT_FIELDS_H */",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only compare with the committed header")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = HEADER.read_text(encoding="utf-8") if HEADER.is_file() else ""
        if current != text:
            print(f"{HEADER} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        print(f"{HEADER.name} is current")
        return 0
    HEADER.write_text(text, encoding="utf-8")
    print(f"wrote {HEADER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
