"""Progress of long export stages: a start line, then an elapsed-time line every few seconds
until the stage ends (torch.onnx.export and AOTInductor say nothing for minutes)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

log = logging.getLogger("deleaker")

HEARTBEAT_S = 15.0  # seconds between "still ..." lines


@contextlib.contextmanager
def stage(what: str, every: float = HEARTBEAT_S):
    """Log `what ...` now and `... still WHAT (Ns)` every `every` seconds while the block runs."""
    log.info("%s ...", what)
    t0 = time.perf_counter()
    done = threading.Event()

    def beat():
        while not done.wait(every):
            log.info("  ... still %s (%.0fs)", what, time.perf_counter() - t0)

    thread = threading.Thread(target=beat, name="export-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
