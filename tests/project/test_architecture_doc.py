"""docs/architecture.md stays true: every file or folder it names exists, and it names the
definitions the code cites it for."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"


def named_paths(text: str) -> set[str]:
    """Backticked repository paths: `a/b.py`, `plugins/x/`, `docs/op-contract.md`."""
    return {m for m in re.findall(r"`([\w./-]+)`", text)
            if "/" in m and not m.startswith(("deleaker.", "-"))} | set(re.findall(r"\b(docs/[\w-]+\.md)", text))


def test_every_path_the_architecture_doc_names_exists():
    paths = named_paths(DOC.read_text())
    assert len(paths) >= 20  # the layer table, the concepts and the walk all name files
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_the_doc_detects_a_missing_path(tmp_path):
    # the check above can fail: a renamed module is reported
    assert "runtime/no_such_module.py" in named_paths("see `runtime/no_such_module.py` and `runtime/`")


def test_code_that_cites_the_architecture_doc_cites_an_existing_file():
    cites = [p for p in ROOT.glob("**/*") if p.suffix in {".py", ".toml", ".h", ".cu", ".cuh", ".cpp"}
             and ".venv" not in p.parts and "build" not in p.parts and p.is_file()
             and "architecture.md" in p.read_text(errors="ignore")]
    assert cites, "nothing cites docs/architecture.md"
    for p in cites:
        if p == Path(__file__):
            continue
        for m in re.finditer(r"[\w./]*architecture\.md", p.read_text(errors="ignore")):
            assert m.group(0) == "docs/architecture.md", f"{p.relative_to(ROOT)} cites {m.group(0)}"
