"""The --out folder of an export: checked before any work, written in a temp folder beside it and
renamed into place at the end, so an artifact is either complete or absent.

Temp folders are named `.NAME.tmp-PID-XXXX` (the export being written) and `.NAME.old-PID-XXXX`
(the artifact being replaced); the PID lets the next export to the same --out remove the ones
of exports that were killed (a folder of a live process is left alone).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from deleaker.runtime.artifact import MANIFEST

log = logging.getLogger("deleaker")


class OutFolderError(ValueError):
    """--out cannot be written as asked; the message says why."""


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_out(out: str | Path, inputs: dict[str, str | Path], force: bool) -> Path:
    """The resolved --out after refusing what would lose data: an --out that is, contains or lies
    inside one of `inputs` ({option: path}, e.g. {"--model": DIR}), a file, a non-empty folder
    without `force`, or (even with it) a non-empty folder that is not an artifact."""
    out = Path(out).expanduser().resolve()
    for option, path in inputs.items():
        how = _overlap(out, Path(path).expanduser().resolve())
        if how:
            raise OutFolderError(f"--out {out} {how} the {option} folder {path}; choose an --out outside it")
    if out.exists() and not out.is_dir():
        raise OutFolderError(f"--out {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise OutFolderError(f"--out {out} exists and is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise OutFolderError(f"--out {out} is not an artifact folder (no {MANIFEST}); --force only replaces "
                                 "artifacts: choose a new or empty --out")
    existing = next(p for p in out.parents if p.exists())  # the folder the new ones are made in
    if not existing.is_dir():
        raise OutFolderError(f"--out {out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutFolderError(f"--out {out}: {existing} is not writable")
    return out


def _pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)-[^/]*$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the temp folders beside `out` left by dead exports; returns what was removed. An
    `.old-` folder holding the previous artifact while `out` is missing (killed mid-rename) is
    moved back to `out` instead."""
    if not out.parent.is_dir():
        return []
    pattern = _pattern(out)
    removed = []
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or _alive(int(m.group(2))):
            continue
        kept = p / "x"
        if m.group(1) == "old" and kept.is_dir() and not out.exists():
            os.replace(kept, out)
            log.info("restored %s from %s (an export was killed while replacing it)", out, p.name)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if removed:
        log.info("removed %d temp folder(s) of interrupted exports beside %s: %s", len(removed), out,
                 ", ".join(p.name for p in removed))
    return removed


def temp_folder(out: Path) -> Path:
    """A fresh temp folder beside `out` (after removing dead exports' ones)."""
    clean_stale(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets normal permissions
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move a finished artifact folder into place (replacing an old one only once the new one is complete)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
