"""A real `deleaker serve` process on 127.0.0.1 for the measurement tools (the bad-input audit,
the server-vs-in-process protocol): started at once, wait_ready() until /health answers 200,
close() by SIGTERM (the server drains), then SIGKILL if it does not stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deleaker_bin() -> list[str]:
    """The `deleaker` command of this Python (its module where no script is installed)."""
    exe = Path(sys.executable).parent / "deleaker"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "deleaker.runtime.cli"]


class ServeProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, name: str = "the server",
                 append: bool = False):
        """args: `deleaker serve` options other than --port (a free port is chosen); append: add to
        log_path (one log for several servers) instead of starting it anew."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.name = name
        self._log = open(log_path, "a" if append else "w")  # noqa: SIM115  (closed in close)
        self.proc = subprocess.Popen([*deleaker_bin(), "serve", "--port", str(self.port), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float) -> int:
        """Block until /health answers 200; returns the port. RuntimeError if the server exits first
        or is not ready within timeout_s."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_path.read_text()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.port
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready in {timeout_s:g}s; see {self.log_path}")
            time.sleep(0.3)

    def close(self, timeout_s: float = 60) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
