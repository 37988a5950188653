"""The --out folder of an export: checked before any work (runtime/outputs.py's rule, shared by
every command that writes), written in a temp folder beside it, fsynced and renamed into place
at the end, so an artifact is either complete or absent.

Temp folders are named `.NAME.tmp-PID-XXXX` (the export being written) and `.NAME.old-PID-XXXX`
(the artifact being replaced), NAME cut to its first 48 bytes so any valid --out name fits; the
PID lets the next export to the same --out remove the ones of exports that were killed (a
folder of a live process is left alone).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from deleaker.runtime.artifact import MANIFEST
from deleaker.runtime.outputs import check_output, fsync_folder, fsync_tree

log = logging.getLogger("deleaker")


class OutFolderError(ValueError):
    """--out cannot be written as asked; the message says why."""


def check_out(out: str | Path, inputs: dict[str, str | Path], force: bool) -> Path:
    """The resolved --out after refusing what would lose data: an --out that is, contains or lies
    inside one of `inputs` ({option: path}, e.g. {"--model": DIR}), a file, a non-empty folder
    without `force`, or (even with it) a non-empty folder that is not an artifact."""
    try:
        out = check_output(out, dict(inputs), folder=True)
    except ValueError as e:
        raise OutFolderError(str(e)) from None
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


_OWNER = "out-name"  # in an .old- folder: the full --out name it belongs to
_STEM_BYTES = 48  # of --out's name in a temp folder's name: short enough beside any valid name


def _stem(out: Path) -> str:
    return out.name.encode("utf-8", "surrogateescape")[:_STEM_BYTES].decode("utf-8", "ignore")


def _pattern(out: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(_stem(out))}\.(tmp|old)-(\d+)-[^/]*$")


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
        owner = p / _OWNER
        mine = not owner.is_file() or owner.read_text(encoding="utf-8", errors="replace") == out.name
        if m.group(1) == "old" and kept.is_dir() and not out.exists() and mine:
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the artifact gets normal permissions
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move a finished artifact folder into place (replacing an old one only once the new one is
    complete); its files and folders are fsynced first and the parent folder after the rename."""
    fsync_tree(tmp)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.old-{os.getpid()}-", dir=out.parent))
        (old / _OWNER).write_text(out.name, encoding="utf-8", errors="surrogateescape")  # names share a stem
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_folder(out.parent)
