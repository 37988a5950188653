"""requirements/ci.lock, what CI and `make install` install (`make lock` refreshes it): it pins
everything pyproject.toml's [test] extra needs within pyproject's ranges, keeps torch at its CPU
build, and pip resolves the project against it to exactly its pins, so a stale lock fails here."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "ci.lock"
PROJECT = "deleaker"
# what the lock was resolved for (Makefile: `make lock`)
LOCK_TARGET = ("3.11", "x86_64", "Linux")


def pins() -> dict[str, str]:
    """{canonical name: version} of the lock's `name==version` lines."""
    out = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"{LOCK.name}: not a pin: {line!r}"
            out[canonicalize_name(name)] = version.strip()
    return out


def project_requirements(extra: str = "test") -> list[Requirement]:
    """pyproject.toml's dependencies plus `extra`, with the project's own extras (deleaker[bench]) expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    reqs, todo, seen = [Requirement(r) for r in project["dependencies"]], [extra], set()
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        for r in map(Requirement, optional[e]):
            if canonicalize_name(r.name) == PROJECT:
                todo.extend(r.extras)
            else:
                reqs.append(r)
    return reqs


def test_lock_pins_every_requirement_within_pyprojects_ranges():
    locked = pins()
    missing = [str(r) for r in project_requirements() if canonicalize_name(r.name) not in locked]
    assert not missing, f"{LOCK.name} lacks {missing}: run `make lock`"
    outside = [f"{r} (locked {locked[canonicalize_name(r.name)]})" for r in project_requirements()
               if not r.specifier.contains(Version(locked[canonicalize_name(r.name)]), prereleases=True)]
    assert not outside, f"{LOCK.name} pins outside pyproject.toml's ranges: {outside}: run `make lock`"


def test_lock_keeps_torch_at_its_cpu_build():
    locked = pins()
    assert Version(locked["torch"]).local == "cpu", f"torch is locked at {locked['torch']}, not a CPU build"
    cuda = sorted(n for n in locked if n.startswith("nvidia-") or n == "triton")
    assert not cuda, f"{LOCK.name} pulls CUDA wheels: {cuda}"


def _registry_unreachable() -> str | None:
    try:
        urllib.request.urlopen(urllib.request.Request("https://pypi.org/simple/pip/", method="HEAD"), timeout=15)
    except (urllib.error.URLError, OSError) as e:
        return f"the package registry is unreachable ({e})"
    return None


def test_pip_resolves_the_project_to_the_lock(tmp_path):
    """pip, as `make install` runs it, resolves the project with its [test] extra against the lock to
    exactly the lock's pins: nothing unpinned joins, nothing pinned is dropped or moved."""
    here = (f"{sys.version_info.major}.{sys.version_info.minor}", platform.machine(), platform.system())
    if here != LOCK_TARGET:
        pytest.skip(f"the lock is resolved for CPython {LOCK_TARGET[0]} on {LOCK_TARGET[1]} {LOCK_TARGET[2]}, "
                    f"this is {here[0]} on {here[1]} {here[2]}")
    if why := _registry_unreachable():
        pytest.skip(why)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                           "--report", str(report), "-c", str(LOCK), "-e", f"{ROOT}[test]", "pip"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"pip cannot install the project with {LOCK.name}: {proc.stderr[-3000:]}"
    resolved = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert resolved.pop(PROJECT) == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    locked = pins()
    assert sorted(set(resolved) - set(locked)) == [], "pip installs packages the lock does not pin: run `make lock`"
    assert sorted(set(locked) - set(resolved)) == [], "the lock pins packages nothing needs: run `make lock`"
    moved = {n: (locked[n], v) for n, v in resolved.items() if Version(v) != Version(locked[n])}
    assert not moved, f"pip resolved other versions than the lock's (locked, resolved): {moved}"
