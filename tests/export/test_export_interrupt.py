"""An interrupted `deleaker-export onnx` (real subprocess on the tiny model) leaves nothing behind:
the temp folder of a killed export is removed by the next export to the same --out (which says
so), and Ctrl-C removes the export's own temp folder and exits 130 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from deleaker.export.out_folder import clean_stale

pytestmark = pytest.mark.slow  # two export subprocesses, each stopped in its first seconds of work


def _start(model, out, log):
    cmd = [sys.executable, "-m", "deleaker.export.cli", "onnx", "--model", str(model), "--out", str(out),
           "--height", "64", "--width", "64"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "w"), env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _temps(out):
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _wait_for(proc, log, text, timeout=300.0):  # start-up alone can take minutes on a busy machine
    """Wait until the export's stderr shows `text` (it is then inside the export work)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if text in log.read_text():
            return
        assert proc.poll() is None, f"export ended early ({proc.returncode}): {log.read_text()}"
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {text!r} within {timeout}s: {log.read_text()}")


def test_ctrl_c_and_kill_leave_no_temp_folder(tiny_model_dir, tmp_path):
    out = tmp_path / "art"
    log = tmp_path / "export.log"

    # kill -9 during the export: nothing can clean up then ...
    proc = _start(tiny_model_dir, out, log)
    _wait_for(proc, log, "[1/4] transformer")
    proc.kill()
    proc.wait(timeout=30)
    stale = _temps(out)
    assert len(stale) == 1 and not out.exists()

    # ... so the next export to the same --out removes the dead export's folder and says so;
    # Ctrl-C during that export: its own temp folder removed, one line, exit 130
    proc = _start(tiny_model_dir, out, log)
    _wait_for(proc, log, "exporting transformer.onnx")  # inside torch.onnx.export
    text = log.read_text()
    assert "removed 1 temp folder(s) of interrupted exports" in text and stale[0] in text, text
    assert stale[0] not in _temps(out) and len(_temps(out)) == 1  # only its own, being written
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    lines = log.read_text().splitlines()
    assert lines[-1] == "deleaker-export: interrupted" and "Traceback" not in log.read_text(), lines
    assert not out.exists() and _temps(out) == []


def test_clean_stale_keeps_live_exports_and_restores_a_replaced_artifact(tmp_path):
    out = tmp_path / "art"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live_tmp = tmp_path / f".art.tmp-{os.getpid()}-abc"  # this process: alive
    dead_tmp = tmp_path / f".art.tmp-{dead.pid}-abc"
    dead_old = tmp_path / f".art.old-{dead.pid}-xyz"
    other = tmp_path / f".artwork.tmp-{dead.pid}-abc"  # another --out's folder
    for p in (live_tmp, dead_tmp, other):
        p.mkdir()
    (dead_old / "x").mkdir(parents=True)
    (dead_old / "x" / "manifest.json").write_text("{}")  # killed between the two renames of publish
    removed = clean_stale(out)
    assert sorted(p.name for p in removed) == sorted([dead_tmp.name, dead_old.name])
    assert live_tmp.is_dir() and other.is_dir()
    assert (out / "manifest.json").read_text() == "{}"  # the previous artifact is back in place
