"""Markdown code blocks of the docs, as tests/project/test_docs.py runs them (and other tests read them)."""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GPU_MARK = "<!-- gpu-only -->"
OUTPUT_LANG = "output"  # a block fenced ```output shows what the code block before it prints


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass
class Block:
    doc: Path
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    gpu_only: bool
    output: "Block | None" = None  # the ```output block right after this one: what it prints

    @property
    def where(self) -> str:
        return f"{rel(self.doc)}:{self.line}"


_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def code_blocks(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # closing fence
        block = Block(doc, lang, start + 1, textwrap.dedent("\n".join(body)), prev == GPU_MARK)
        if lang == OUTPUT_LANG and blocks and prev.startswith(("```", "~~~")):  # right after a code block
            blocks[-1].output = block
        else:
            blocks.append(block)
    return blocks
