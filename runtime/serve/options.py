"""Server options: batching, queueing, timeouts and request limits, in one dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline import MAX_STEPS

HTTP_PARSERS = ("auto", "httptools", "h11")  # auto: httptools when installed, else h11 (connections.py)
RAY_HTTP_ERROR = "--http applies to the local server; Ray Serve's proxy parses HTTP itself"


@dataclass(frozen=True)
class ServeOptions:
    # dynamic batching
    max_batch: int = 4  # images per batch (also capped by the backend's own max batch)
    max_wait_ms: float = 10.0  # how long the first queued image waits for others of its (size, steps)
    max_queue: int = 64  # images waiting (not yet running); past it: 429 + Retry-After
    timeout_s: float = 300.0  # per request, queue wait + generation; past it: 504
    drain_timeout_s: float = 120.0  # on SIGTERM/SIGINT: how long running and queued work may take to finish
    # connections (slow or idle clients must not hold the server)
    read_timeout_s: float = 15.0  # a request's headers, and then its body, must each arrive within this
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # open connections past this are closed at once
    http: str = "auto"  # HTTP/1.1 parser, one of HTTP_PARSERS
    # request limits (every violation is a 400 naming the field)
    max_body_bytes: int = 64 * 1024
    max_prompt_chars: int = 2000
    max_n: int = 4
    max_steps: int = 50
    default_steps: int | None = None  # None: the DeLeaker preset's step count
    # the operator's own image side limits, inside the model's (None: the model's rule and the memory free)
    min_size: int | None = None
    max_size: int | None = None
    default_size: str | None = None  # WIDTHxHEIGHT; None: the model card's size, else 256x256

    def validate(self) -> "ServeOptions":
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_prompt_chars", "max_n", "max_steps",
                     "min_size", "max_size", "max_connections"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("max_wait_ms",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("timeout_s", "drain_timeout_s", "read_timeout_s", "keep_alive_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.max_steps > MAX_STEPS:  # the server's cap lies inside the pipeline's one range
            raise ValueError(f"max-steps must be <= {MAX_STEPS} (the pipeline's limit), got {self.max_steps}")
        if self.http not in HTTP_PARSERS:
            raise ValueError(f"http must be one of {', '.join(HTTP_PARSERS)}, got {self.http!r}")
        if self.min_size is not None and self.max_size is not None and self.min_size > self.max_size:
            raise ValueError(f"min-size {self.min_size} is larger than max-size {self.max_size}")
        if self.default_steps is not None and not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"default steps {self.default_steps} is outside [1, max-steps={self.max_steps}]")
        return self
