"""The one rule for what a command writes: where it may write, and how a file gets there.

Every writer (deleaker generate's PNG, deleaker-export's artifact folder, deleaker eval's run
folder, deleaker-bench's results) checks its output with `check_output` before any work: never
the model or artifact folder it reads, nor inside it, nor (for a folder) around it. A file is
written under a short hidden temp name beside it (the temp name's length does not depend on the
target's, so any valid name works), flushed and fsynced, renamed into place, and the folder is
fsynced, so a crash leaves the old file or the new one, never a part.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

TEMP_PREFIX = ".deleaker-tmp-"  # + pid + random: well under any file-system name limit


class OutputError(ValueError):
    """An output path that would overwrite or write into an input; the message says which."""


def overlap(out: Path, other: Path) -> str | None:
    """How resolved `out` relates to resolved folder `other`: "is", "lies inside", "contains" or None."""
    if out == other:
        return "is"
    if other in out.parents:
        return "lies inside"
    if out in other.parents:
        return "contains"
    return None


def check_output(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], option: str = "--out",
                 folder: bool = False) -> Path:
    """The resolved output path, refused (OutputError) when it is, lies inside, or (a folder
    output) contains one of `inputs` ({option: path}; None entries are skipped)."""
    resolved = Path(out).expanduser().resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        how = overlap(resolved, Path(path).expanduser().resolve())
        if how == "contains" and not folder:
            continue  # a file cannot contain a folder
        if how:
            raise OutputError(f"{option} {resolved} {how} the {name} folder {path}; choose an {option} outside it "
                              "(a command never writes into what it reads)")
    return resolved


def temp_path(path: Path) -> Path:
    """A fresh hidden sibling name for `path`, short whatever `path`'s name is."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[object], None]) -> Path:
    """write(f) into a temp file beside `path` (opened "xb", the process umask applies), fsync it,
    rename it to `path`, fsync the folder. A failure leaves `path` as it was and no temp file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_folder(path.parent)
    return path


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (an output folder about to be renamed into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_folder(Path(dirpath))
