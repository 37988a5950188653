"""One op schema: the C header and the torch adapter of the fused CUDA op follow runtime/op_schema.py.

Parses plugins/deleaker_attention/include/deleaker_attention.h (settings column enums, the
dl_params_t fields) and plugins/torch_adapter/deleaker_torch.cpp (the op's input and attribute
lists, the settings tensors it hands to the library, the op it registers its CUDA kernel for) and
compares them with op_schema. Each checker is also run on deliberately edited copies, which it
must reject.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from deleaker.runtime import op_schema, op_schema_c

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "plugins" / "deleaker_attention" / "include" / "deleaker_attention.h"
SETTINGS_HEADER = REPO / op_schema_c.SETTINGS_HEADER
ADAPTER = REPO / "plugins" / "torch_adapter" / "deleaker_torch.cpp"
KERNEL_SETTINGS = REPO / "plugins" / "deleaker_attention" / "src" / "common.cuh"  # load_settings

C_TYPES = {"int64": "int64_t", "float32": "float"}  # settings tensor dtype -> element type in C
SCALAR_TYPES = {"int": "int64_t", "float": "float", "bool": "int"}  # batch-wide fallback fields
TORCH_TYPES = {"int64": "Long", "float32": "Float"}


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _column_macro(s) -> str:
    return f"DL_{s.tensor.upper()}_{s.name.upper()}"


def _params_fields(header: str) -> list[tuple[str, str]]:
    """(type, name) of every dl_params_t field in order; pointers as 'T*'."""
    m = re.search(r"typedef struct \{(.*?)\}\s*dl_params_t;", header, flags=re.S)
    assert m, "dl_params_t not found"
    fields = []
    for decl in m.group(1).split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        dm = re.match(r"(?:const )?(\w+)\s*(.*)", decl)
        base, rest = dm.group(1), dm.group(2)
        for part in rest.split(","):
            part = part.strip()
            star = "*" if part.startswith("*") else ""
            name = re.match(r"\**\s*(\w+)", part).group(1)
            fields.append((base + star, name))
    return fields


def check_header(path: Path, settings: Path = SETTINGS_HEADER) -> list[str]:
    """Problems of the C header (and its generated settings header) against op_schema (empty: consistent)."""
    text = _strip_comments(path.read_text() + settings.read_text())
    problems = []
    enums = {name: int(val) for name, val in re.findall(r"\b(DL_(?:WINDOWS|KNOBS|RULES)_\w+)\s*=\s*(\d+)", text)}
    want = {_column_macro(s): s.index for s in op_schema.SETTINGS}
    want.update({f"DL_{t.upper()}_WIDTH": op_schema.settings_width(t) for t in op_schema.SETTINGS_TENSORS})
    for name, idx in want.items():
        if enums.get(name) != idx:
            problems.append(f"header: {name} is {enums.get(name)}, op_schema says {idx}")
    for name in sorted(set(enums) - set(want)):
        problems.append(f"header: {name} is not a setting column of op_schema")

    fields = _params_fields(text)
    names = [n for _, n in fields]
    types = dict((n, t) for t, n in fields)
    # structural attributes, consecutive, in ATTRIBUTES order
    attrs = list(op_schema.ATTRIBUTE_NAMES)
    if attrs[0] not in names or names[names.index(attrs[0]):names.index(attrs[0]) + len(attrs)] != attrs:
        problems.append(f"header: dl_params_t attribute fields are not {attrs} in this order")
    for a in attrs:
        if types.get(a) != "int64_t":
            problems.append(f"header: attribute {a} should be int64_t, is {types.get(a)}")
    # settings tensors: one device pointer each, in SETTINGS_TENSORS order, of the schema's dtype
    ptrs = [n for n in names if n in op_schema.SETTINGS_TENSORS]
    if ptrs != list(op_schema.SETTINGS_TENSORS):
        problems.append(f"header: settings pointers {ptrs}, op_schema has {list(op_schema.SETTINGS_TENSORS)}")
    for t in op_schema.SETTINGS_TENSORS:
        want_t = C_TYPES[op_schema._SETTINGS_DTYPES[t].__name__] + "*"
        if types.get(t) != want_t:
            problems.append(f"header: {t} should be {want_t}, is {types.get(t)}")
    # the settings travel as the three arrays only: no scalar per-setting field
    scalar = [n for n in names if n in op_schema.SETTING_NAMES]
    if scalar:
        problems.append(f"header: dl_params_t has scalar setting fields {scalar}; the settings are the arrays")
    return problems


def _xmacro(text: str, macro: str) -> list[str] | None:
    m = re.search(rf"#define {macro}\(X\)((?:[^\n]*\\\n)*[^\n]*)", text)
    return re.findall(r"X\((\w+)\)", m.group(1)) if m else None


def check_adapter(path: Path) -> list[str]:
    """Problems of the torch adapter against op_schema (empty: consistent)."""
    own = _strip_comments(path.read_text())
    text = _strip_comments(SETTINGS_HEADER.read_text()) + own
    problems = []
    tensors, attrs = _xmacro(text, "DL_OP_TENSORS"), _xmacro(text, "DL_OP_ATTRS")
    if tensors != list(op_schema.INPUT_NAMES):
        problems.append(f"adapter: DL_OP_TENSORS {tensors}, op_schema INPUTS {list(op_schema.INPUT_NAMES)}")
    if attrs != list(op_schema.ATTRIBUTE_NAMES):
        problems.append(f"adapter: DL_OP_ATTRS {attrs}, op_schema ATTRIBUTES {list(op_schema.ATTRIBUTE_NAMES)}")
    # every settings tensor goes to the library with the header's width and the schema's dtype
    calls = re.findall(r'settings_tensor\((\w+),\s*"(\w+)",\s*B,\s*DL_(\w+)_WIDTH,\s*at::k(\w+)', text)
    seen = [c[0] for c in calls]
    if seen != list(op_schema.SETTINGS_TENSORS):
        problems.append(f"adapter: settings tensors passed {seen}, op_schema has {list(op_schema.SETTINGS_TENSORS)}")
    for var, label, width, dtype in calls:
        if var in op_schema.SETTINGS_TENSORS:
            want = TORCH_TYPES[op_schema._SETTINGS_DTYPES[var].__name__]
            if label != var or width != var.upper() or dtype != want:
                problems.append(f"adapter: {var} checked as {label!r} [B, DL_{width}_WIDTH] at::k{dtype}, "
                                f"want {var!r} [B, DL_{var.upper()}_WIDTH] at::k{want}")
    # the settings travel as tensors: no per-setting name (a hand-written duplicate list) in the adapter
    dup = [n for n in op_schema.SETTING_NAMES if re.search(rf"\b{n}\b", own)]
    if dup:
        problems.append(f"adapter: names settings one by one ({', '.join(dup)}); pass the settings tensors")
    # its CUDA kernel is registered for the op the reference defines
    ns, op = op_schema.TORCH_OP.split("::")
    if not re.search(rf'TORCH_LIBRARY_IMPL\({ns},\s*CUDA,\s*m\)\s*\{{[^}}]*m\.impl\("{op}"', text):
        problems.append(f"adapter: no TORCH_LIBRARY_IMPL({ns}, CUDA, m) registering m.impl(\"{op}\", ...)")
    return problems


def test_header_matches_op_schema():
    assert check_header(HEADER) == []


def test_adapter_matches_op_schema():
    assert check_adapter(ADAPTER) == []


def test_kernels_read_every_settings_column():
    """load_settings expands the generated DL_SETTINGS list, which names every column with its
    tensor's width (a column added to the schema is read by the kernels once regenerated)."""
    text = _strip_comments(KERNEL_SETTINGS.read_text())
    body = text[text.index("load_settings(const Args& a, int b)"):]
    body = body[:body.index("\n}\n")]
    assert "DL_SETTINGS(DL_LOAD_SETTING_)" in body
    entries = re.findall(r"X\((\w+), (\w+), (\w+), (\w+), (\w+)\)", SETTINGS_HEADER.read_text())
    assert [(t, c, w) for t, c, w, _, _ in entries] == [
        (s.tensor, _column_macro(s), f"DL_{s.tensor.upper()}_WIDTH") for s in op_schema.settings_by_column()]


def _edited(tmp_path: Path, src: Path, old: str, new: str) -> Path:
    text = src.read_text()
    assert old in text, f"edit target {old!r} not in {src.name} (update this test with the file)"
    out = tmp_path / src.name
    out.write_text(text.replace(old, new, 1))
    return out


@pytest.mark.parametrize("old,new,expect", [
    # two rule columns swapped
    ("DL_RULES_DO_IMAGE_IMAGE = 4", "DL_RULES_DO_IMAGE_IMAGE = 5", "DL_RULES_DO_IMAGE_IMAGE"),
    # a width that does not match the schema
    ("DL_KNOBS_WIDTH = 3", "DL_KNOBS_WIDTH = 4", "DL_KNOBS_WIDTH"),
    # knobs passed as double
    ("const float* knobs;", "const double* knobs;", "knobs should be float*"),
    # attributes reordered
    ("  int64_t block_offset;\n  int64_t blocks_per_step;", "  int64_t blocks_per_step;\n  int64_t block_offset;",
     "attribute fields"),
    # a scalar setting field added back
    ("  const int64_t* rules; /* 0/1 */", "  const int64_t* rules;\n  float k_strength;", "scalar setting fields"),
])
def test_header_check_rejects_edits(tmp_path, old, new, expect):
    if old in SETTINGS_HEADER.read_text():
        problems = check_header(HEADER, _edited(tmp_path, SETTINGS_HEADER, old, new))
    else:
        problems = check_header(_edited(tmp_path, HEADER, old, new))
    assert any(expect in p for p in problems), problems


@pytest.mark.parametrize("old,new,expect", [
    ('"knobs", B, DL_KNOBS_WIDTH, at::kFloat', '"knobs", B, DL_KNOBS_WIDTH, at::kDouble', "knobs checked"),
    ('"rules", B, DL_RULES_WIDTH', '"rules", B, DL_WINDOWS_WIDTH', "rules checked"),
    ('m.impl("attention", &attention); }', 'm.impl("attention_fused", &attention); }', "TORCH_LIBRARY_IMPL"),
    ("  p.rules = rul.data_ptr<int64_t>();", "  p.rules = rul.data_ptr<int64_t>();\n  p.k_strength = 1.2f;",
     "names settings one by one"),
])
def test_adapter_check_rejects_edits(tmp_path, old, new, expect):
    problems = check_adapter(_edited(tmp_path, ADAPTER, old, new))
    assert any(expect in p for p in problems), problems


def test_generated_headers_are_current():
    """The committed generated headers equal what op_schema renders now (no drift)."""
    for rel, text in op_schema_c.render().items():
        assert (REPO / rel).read_text(encoding="utf-8") == text, f"{rel} is stale: run {op_schema_c.COMMAND}"


def test_no_hand_copy_of_a_setting_default_in_the_library():
    """dl_params_init sets no setting: the settings (and their defaults) live in op_schema only."""
    api = _strip_comments((REPO / "plugins" / "deleaker_attention" / "src" / "api.cu").read_text())
    assert [n for n in op_schema.SETTING_NAMES if re.search(rf"\b{n}\b", api)] == []
