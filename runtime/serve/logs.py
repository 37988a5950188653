"""The server's log: start-up phases, one access line per request, text or JSON lines.

    deleaker: loading model toyworld (torch backend, cpu)
    deleaker: POST /v1/images/generations 200 812.4 ms images=2 id=5f0c2a9b1e7d
    {"time": "2026-12-07T10:00:00.123Z", "level": "info", "logger": "deleaker.access", "message": "POST ...",
     "method": "POST", "path": "/v1/images/generations", "status": 200, "ms": 812.4, "images": 2, "id": "..."}

Every request gets an id: the client's X-Request-Id when it sends a short printable one, else a
random one; the answer carries it back in X-Request-Id, so a client's report finds its log line.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time

access_log = logging.getLogger("deleaker.access")
PROCESS_START = time.perf_counter()  # about when a server process started: `deleaker serve` imports this first

LOG_FORMATS = ("text", "json")
REQUEST_ID_HEADER = "X-Request-Id"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")  # what a client's id may be, else the server makes one
ACCESS_FIELDS = ("method", "path", "status", "ms", "images", "id")
TEXT_FORMAT = "deleaker: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, the access fields when present,
    and the traceback of an exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                       + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str, fmt: str = "text") -> None:
    """The root logger for a server process: every logger (uvicorn's too) writes through it."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id(given: str | None) -> str:
    """The client's id when it is a short printable one, else a new random one."""
    return given if given is not None and _CLIENT_ID.match(given) else secrets.token_hex(6)


def log_access(method: str, path: str, status: int, ms: float, images: int, rid: str) -> None:
    """One line per answered request (4xx and 5xx included)."""
    access_log.info("%s %s %d %.1f ms images=%d id=%s", method, path, status, ms, images, rid,
                    extra={"method": method, "path": path, "status": status, "ms": round(ms, 1),
                           "images": images, "id": rid})
