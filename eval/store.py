"""The run folder: layout, atomic writes and append-only jsonl manifests.

RUN/run.json                 generation settings (a resumed run must use the same ones)
RUN/manifest.jsonl           one line per generated item (the last line of an id wins)
RUN/images/ID-vanilla.png    RUN/images/ID-deleaker.png
RUN/refs/ENTITY.png          reference image per entity (a prompt naming the entity alone)
RUN/judgments/JUDGE.jsonl    one line per judged item (the last line of an id wins)
RUN/report/                  table, chart, gallery
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from deleaker.runtime.outputs import write_atomic

log = logging.getLogger("deleaker.eval")


def atomic_write(path: Path, data: bytes) -> None:
    """runtime/outputs.write_atomic: short temp name beside `path`, fsync, rename, fsync the folder."""
    write_atomic(path, lambda f: f.write(data))


def append_jsonl(path: Path, obj: dict) -> None:
    """One line per call, flushed to disk, so a killed process loses at most that line."""
    line = json.dumps(obj, ensure_ascii=False, default=_plain) + "\n"
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # the last write was cut off: start a fresh line
                line = "\n" + line
        f.seek(0, os.SEEK_END)
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _plain(o):
    """numpy scalars/arrays (from judges) as plain JSON values."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def read_jsonl(path: Path) -> list[dict]:
    """All complete lines; a line cut off by a kill is reported and dropped (it is redone)."""
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                log.warning("%s line %d is incomplete (interrupted write); ignoring it", path.name, n)
    return out


def latest_by_id(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for row in rows:
        out[row["id"]] = row
    return out


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


class RunDir:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.settings = self.root / "run.json"
        self.manifest = self.root / "manifest.jsonl"
        self.images = self.root / "images"
        self.refs = self.root / "refs"
        self.judgments = self.root / "judgments"
        self.report = self.root / "report"

    def create(self) -> "RunDir":
        """Make the folders; `made` lists the ones this call made (outermost first)."""
        self.made = [p for p in (*reversed(self.root.parents), self.root) if not p.exists()]
        self.made += [d for d in (self.images, self.refs, self.judgments) if not d.exists()]
        for d in (self.root, self.images, self.refs, self.judgments):
            d.mkdir(parents=True, exist_ok=True)
        return self

    def undo_create(self) -> None:
        """Remove the folders create() made, with what was written in them (a failed start)."""
        import shutil

        for d in getattr(self, "made", [])[:]:
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
        self.made = []

    def require(self) -> "RunDir":
        if not self.manifest.exists():
            raise FileNotFoundError(f"{self.root} is not an eval run folder (no manifest.jsonl); "
                                    "make one with `deleaker eval run`")
        return self

    def image(self, item_id: str, variant: str) -> Path:
        return self.images / f"{item_id}-{variant}.png"

    def ref(self, entity: str) -> Path:
        return self.refs / f"{slug(entity)}.png"

    def judgment_file(self, judge: str) -> Path:
        return self.judgments / f"{judge}.jsonl"

    def items(self) -> dict[str, dict]:
        """Manifest entries by id (latest attempt)."""
        return latest_by_id(read_jsonl(self.manifest))

    def judged(self, judge: str) -> dict[str, dict]:
        return latest_by_id(read_jsonl(self.judgment_file(judge)))
