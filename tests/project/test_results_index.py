"""results/ holds the measured data behind the docs, and only that: every file there is cited by a
doc or by results/README.md (the index), every results path a doc cites exists (and every earlier
run a doc quotes as `git show COMMIT:PATH` resolves), each claim's folder says how its files were
made, and data stays at most a quarter of the tracked files."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
INDEX = RESULTS / "README.md"
DOCS = [ROOT / "README.md", ROOT / "plugins" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_DATA_SHARE = 0.25  # results/ files over all tracked files

# a results path as docs write it: `results/x/y`, `../results/x/y` (not `benchmarks/results/`)
DOC_PATH = re.compile(r"(?<![\w/.-])(?:\.\./)?results/([\w./-]*[\w/])")
# a path relative to results/ as the index writes it: folder/file
INDEX_PATH = re.compile(r"(?<![\w/.-])([\w.-]+(?:/[\w.-]+)+)")
GIT_SHOW = re.compile(r"git show ([0-9a-f]{7,40}):([\w./-]*[\w/])")


def _files() -> list[str]:
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*") if p.is_file())


def _doc_paths() -> dict[str, list[str]]:
    """results-relative path -> the docs that cite it."""
    cited: dict[str, list[str]] = {}
    for doc in DOCS:
        for m in DOC_PATH.finditer(doc.read_text()):
            cited.setdefault(m.group(1).rstrip("/"), []).append(str(doc.relative_to(ROOT)))
    return cited


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def _in_git_checkout() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"


def test_every_results_file_is_cited_by_a_doc_or_the_index():
    cited = set(_doc_paths()) | {m.group(1) for m in INDEX_PATH.finditer(INDEX.read_text())}
    uncited = [f for f in _files() if f != "README.md" and f not in cited]
    assert not uncited, f"results/ files no doc or results/README.md cites: {uncited}"


def test_every_results_path_a_doc_cites_exists():
    missing = {path: docs for path, docs in _doc_paths().items() if not (RESULTS / path).exists()}
    assert not missing, f"results paths cited by docs that do not exist: {missing}"
    index = INDEX.read_text()
    assert not [m.group(1) for m in INDEX_PATH.finditer(index)
                if m.group(1).split("/")[0] in {p.name for p in RESULTS.iterdir()}
                and not (RESULTS / m.group(1)).exists()]


def test_each_claim_folder_names_the_command_that_made_its_files():
    """A folder's README or .sh (its command) names every file in it."""
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        how = [p for p in folder.iterdir() if p.name == "README.md" or p.suffix == ".sh"]
        assert how, f"results/{folder.name} has no README.md or .sh saying how its files were made"
        text = "".join(p.read_text() for p in how)
        for f in folder.rglob("*"):
            if f.is_file() and f not in how:
                assert f.name in text, f"results/{folder.name}: {f.relative_to(folder)} is not described there"


def test_earlier_runs_quoted_from_history_resolve():
    if not _in_git_checkout():
        pytest.skip("not a git checkout")
    quoted = {(m.group(1), m.group(2)) for doc in [*DOCS, INDEX, *RESULTS.glob("*/README.md")]
              for m in GIT_SHOW.finditer(doc.read_text())}
    assert quoted, "no doc quotes an earlier run"  # the pattern still finds the docs' history citations
    commits = {c for c, _ in quoted}
    if any(_git("cat-file", "-e", f"{c}^{{commit}}").returncode for c in commits):
        pytest.skip("this checkout lacks the history the docs quote (a shallow clone)")
    # a path with a placeholder (`.../NAME/table.md`, `.../FILE`) must at least name an existing folder
    bad = [f"{c}:{p}" for c, p in sorted(quoted)
           if _git("cat-file", "-e", f"{c}:{re.split(r'/(?:NAME|FILE)(?:/|$)', p)[0].rstrip('/')}").returncode]
    assert not bad, f"git show targets that do not exist: {bad}"


def test_data_is_at_most_a_quarter_of_the_tracked_files():
    if not _in_git_checkout():
        pytest.skip("not a git checkout")
    tracked = _git("ls-files").stdout.split()
    data = [f for f in tracked if f.startswith("results/")]
    assert data, "git ls-files lists nothing under results/"
    assert len(data) <= MAX_DATA_SHARE * len(tracked), (
        f"results/ holds {len(data)} of {len(tracked)} tracked files ({len(data) / len(tracked):.0%}), "
        f"more than {MAX_DATA_SHARE:.0%}: delete superseded runs (history keeps them)")
