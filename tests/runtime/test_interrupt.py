"""Ctrl-C: `deleaker generate` interrupted while loading and while denoising prints one line,
exits 130 and leaves no file (a real process and a real SIGINT)."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deleaker.runtime.errors import INTERRUPTED_EXIT_CODE


def _run_until(args, marker: bytes, timeout: float = 240) -> tuple[int, str]:
    """Start the command, send SIGINT once `marker` appears on its stderr; (exit code, stderr)."""
    # the child takes Ctrl-C as a terminal's process does, whatever the runner inherited (a runner
    # started in the background ignores SIGINT, and an ignored signal stays ignored across exec)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    buf = bytearray()

    def read():
        while chunk := proc.stderr.read1(4096):
            buf.extend(chunk)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while marker not in buf:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"never saw {marker!r} (exit {proc.poll()}): {bytes(buf).decode(errors='replace')}")
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    return rc, bytes(buf).decode(errors="replace")


@pytest.mark.parametrize("phase", ["loading", "denoising"])
def test_sigint_is_one_line_exit_130_no_file(tiny_model_dir, tmp_path, phase):
    out = tmp_path / "x.png"
    args = [str(Path(sys.executable).parent / "deleaker"), "generate", "--model", str(tiny_model_dir),
            "--prompt", "a cat and a cheetah in a field", "--out", str(out)]
    if phase == "loading":
        # the one-entity warning is logged after the options are checked, before the model loads
        args += ["--entities", "cat"]
        marker = b"it is plain attention"
    else:
        args += ["--entities", "cat,cheetah", "--steps", "400", "--height", "128", "--width", "128"]
        marker = b"denoise"  # the progress bar: the loop is running
    rc, err = _run_until(args, marker)
    assert rc == INTERRUPTED_EXIT_CODE == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.rstrip().splitlines()[-1].endswith("deleaker: interrupted"), err
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())
