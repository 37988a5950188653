"""Shared by the serve tests (no tests here): run `deleaker serve` as a real process on 127.0.0.1, read metrics."""

from __future__ import annotations

import io
import os
import re
import socket
from pathlib import Path

import numpy as np

from deleaker.benchmarks.presets import EDITING_SETTINGS
from deleaker.benchmarks.serve_process import ServeProcess

# every image small and short, so the tests stay fast on two CPU cores
SIZE, STEPS = "64x64", 2
# windows open in the first steps so DeLeaker edits something even in 2 steps of the tiny model
EARLY = EDITING_SETTINGS


class ServerProcess(ServeProcess):
    """The measurement tools' server process, for the tests: one OpenMP thread, ready on creation
    (else stopped, with its log in the error), log_text(), rss_bytes() and stop() -> exit code."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, ready_timeout_s: float = 180):
        super().__init__(args, log_path, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, name="server")
        try:
            self.wait_ready(ready_timeout_s)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(f"{e}:\n{self.log_text()}") from None

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()[-4000:]

    def rss_bytes(self) -> int:
        m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{self.proc.pid}/status").read_text())
        return int(m.group(1)) * 1024

    def stop(self, timeout_s: float = 60) -> int:
        self.close(timeout_s)
        return self.proc.returncode


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text page (0 when absent), e.g. metric(t, "deleaker_images_total")."""
    key = name + (f"{{{labels}}}" if labels else "")
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def png_pixels(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return tree


def listening_addresses(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket listening in the process tree of pid (Linux /proc)."""
    inodes = set()
    for p in _descendants(pid):
        for fd in Path(f"/proc/{p}/fd").glob("*") if Path(f"/proc/{p}/fd").exists() else ():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                addr, port = cols[1].split(":")
                if width == 8:
                    ip = socket.inet_ntop(socket.AF_INET, bytes.fromhex(addr)[::-1])
                else:
                    raw = bytes.fromhex(addr)
                    ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
                found.add((ip, int(port, 16)))
    return found
