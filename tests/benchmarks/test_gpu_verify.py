"""`python -m deleaker.benchmarks.gpu_verify`: the dry run on the CPU (every stage in order, the
ones that need CUDA skipped, the others proving their work), a stage past its time limit, a
GPU run on a machine without one failing rather than dry-running, and the device script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from deleaker.benchmarks import gpu_verify as G

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _verify(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "deleaker.benchmarks.gpu_verify", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-verify")
    r = _verify("--out", out, "--dry-run")
    return r, out, {row["stage"]: row for row in json.loads((out / "summary.json").read_text())["stages"]}


def test_dry_run_runs_every_stage_and_proves_the_work(dry_run):
    r, out, rows = dry_run
    assert r.returncode == 0, r.stdout + r.stderr
    assert list(rows) == [s.name for s in G.STAGES]
    for name, row in rows.items():
        assert row["status"] in ("passed", "skipped"), row
        assert row["seconds"] <= row["budget_s"]
        assert (out / name / "output.log").is_file() and (out / name / "result.json").is_file()
    assert rows["env"]["numbers"]["gpu"] == "no GPU"
    assert rows["pytest_gpu"]["status"] == "skipped" and rows["pytest_gpu"]["numbers"]["gpu_tests"] > 0
    assert rows["aoti"]["status"] == "skipped" and "no GPU" in rows["aoti"]["reason"]
    ob = rows["op_bench"]["numbers"]
    for e in (2, 3):  # the reference op edited inside the window, not after it
        assert ob[f"E{e} inside masked rows"] > 0 and ob[f"E{e} after masked rows"] == 0
    an = rows["anchor"]["numbers"]
    assert rows["anchor"]["status"] == "passed" and "graph: no GPU" in rows["anchor"]["reason"]
    assert an["256 eager edited blocks"] > 0 and min(an["256 eager coverage"]) > 0
    gen = rows["generate"]["numbers"]
    for b in (1, 2, 4):
        assert gen[f"b{b} vanilla img/s"] > 0 and gen[f"b{b} deleaker img/s"] > 0
    lines = (out / "generate" / "rows.jsonl").read_text().splitlines()
    assert all(min(json.loads(x)["mask_coverage"]) > 0 for x in lines if '"variant": "deleaker"' in x)
    # the table: printed and written
    for name in rows:
        assert re.search(rf"^\| {name} \| (passed|skipped)", r.stdout, re.M), r.stdout
    assert (out / "summary.md").read_text() in r.stdout


def test_only_reruns_a_stage_and_keeps_the_other_rows(dry_run, tmp_path):
    _, out, before = dry_run
    r = _verify("--out", out, "--dry-run", "--only", "env")
    assert r.returncode == 0, r.stderr
    rows = json.loads((out / "summary.json").read_text())["stages"]
    assert [x["stage"] for x in rows] == list(before)
    assert {x["stage"]: x for x in rows}["op_bench"] == before["op_bench"]


def test_a_gpu_run_without_a_gpu_fails_its_stages_and_goes_on(tmp_path):
    r = _verify("--out", tmp_path, "--only", "env,op_bench")
    assert r.returncode == 1
    rows = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [(x["stage"], x["status"]) for x in rows] == [("env", "failed"), ("op_bench", "failed")]
    assert all("no CUDA GPU" in x["reason"] for x in rows)


def test_a_stage_past_its_limit_is_killed_and_reported(tmp_path):
    row = G.run_stage(G.BY_NAME["env"], tmp_path, dry_run=True, budget_s=0.2)
    assert row["status"] == "failed" and row["reason"].startswith("timeout: killed after")
    assert row["seconds"] < 10


def test_bad_stage_name_is_a_one_line_error(tmp_path):
    r = _verify("--out", tmp_path, "--only", "env,nope")
    assert r.returncode == 2 and "unknown stage(s) nope" in r.stderr and "Traceback" not in r.stderr


def test_budget_table_fits_eight_minutes_and_the_docs_state_it():
    assert G.GPU_TOTAL_S < 8 * 60
    doc = (REPO / "docs" / "performance.md").read_text()
    for s in G.STAGES:
        assert re.search(rf"^\| `{s.name}` \| {s.budget_s} \|", doc, re.M), s.name
    assert f"| total | {G.GPU_TOTAL_S} |" in doc


def test_device_script_runs_the_gpu_mode_unless_asked_for_the_dry_run(tmp_path):
    script = REPO / "benchmarks" / "gpu_verify.sh"
    env = {**ENV, "PYTHON": sys.executable, "OUT": str(tmp_path / "gpu")}
    r = subprocess.run([str(script), "run", "--only", "env"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr  # no GPU here: the GPU run fails, it does not dry-run
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["dry_run"] is False and summary["stages"][0]["status"] == "failed"
    assert sorted(p.name for p in (tmp_path / "gpu").iterdir()) == ["gpu-verify.tar.gz", "summary.json", "summary.md"]
    env["OUT"] = str(tmp_path / "dry")
    r = subprocess.run([str(script), "run", "--dry-run", "--only", "env"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "dry" / "summary.json").read_text())["stages"][0]["status"] == "passed"
    r = subprocess.run([str(script), "bogus"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage:" in r.stderr
