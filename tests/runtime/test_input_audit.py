"""The bad-input audit (tests/support/input_audit.py) run once over every area: each case must be
clean (exit 2 / 4xx JSON, one line, no traceback, nothing left behind)."""

from __future__ import annotations

import json

import pytest

from support import input_audit

def _param(area, name):
    return pytest.param(area, name, id=f"{area}: {name}")


@pytest.fixture(scope="module")
def outcomes(tiny_model_dir):
    # a refused input answers within seconds; 10 s bounds the cases that are (still) accepted
    return {(o.area, o.name): o for o in input_audit.audit(str(tiny_model_dir), case_timeout=10.0)}


@pytest.mark.slow
@pytest.mark.parametrize("area, name", [_param(a, n) for a, n in input_audit.case_names()])
def test_case_is_clean(outcomes, area, name):
    o = outcomes[(area, name)]
    assert o.clean, f"{o.verdict}: {o.detail}"


def test_script_writes_json_and_counts(tmp_path, tiny_model_dir, capsys):
    """The entry point on one area: a table, the counts line and the JSON file."""
    out = tmp_path / "audit.json"
    rc = input_audit.main(["--model", str(tiny_model_dir), "--only", "generate", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["counts"]["tried"] == len(input_audit.case_names(("generate",))) == len(data["outcomes"])
    assert rc == (0 if data["counts"]["clean"] == data["counts"]["tried"] else 1)
    printed = capsys.readouterr().out
    assert "| generate | --steps 0 | clean |" in printed and f"{data['counts']['tried']} bad inputs tried" in printed
    with pytest.raises(SystemExit) as exc:
        input_audit.main(["--only", "nope"])
    assert exc.value.code == 2


def test_readme_counts_match_the_committed_audit():
    """README's tried / clean table is the committed raw audit, which covers today's case list."""
    from collections import Counter
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    raw = json.loads((root / "results/input-audit/input_audit.json").read_text())
    tried = Counter(o["area"] for o in raw["outcomes"])
    clean = Counter(o["area"] for o in raw["outcomes"] if o["verdict"] == "clean")
    assert sorted((o["area"], o["name"]) for o in raw["outcomes"]) == sorted(input_audit.case_names())
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")[1:]]
             for line in (root / "README.md").read_text().splitlines() if line.startswith("| tried") or
             line.startswith("| clean") or line.startswith("| area | generate")}
    areas = lines["area"][:-1]
    assert sorted(areas) == sorted(input_audit.AREAS)
    assert lines["tried"] == [str(tried[a]) for a in areas] + [str(raw["counts"]["tried"])]
    assert lines["clean"] == [str(clean[a]) for a in areas] + [str(raw["counts"]["clean"])]
