"""Connections of the local server: the listening socket, the HTTP parser (httptools or h11), a
header-read timeout and a connection cap on uvicorn's protocol for it, and the keep-alive timeout.

uvicorn closes idle keep-alive connections (timeout_keep_alive) but waits forever for a request's
headers, and its limit_concurrency still accepts every connection. The body-read timeout is in
the ASGI layer (app.py), where the body is read.
"""

from __future__ import annotations

import socket

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .options import ServeOptions

PORT_RANGE = (1, 65535)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_port(port: int) -> None:
    lo, hi = PORT_RANGE
    if not lo <= port <= hi:
        raise ValueError(f"--port must be in [{lo}, {hi}], got {port}")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so a busy port fails in one line."""
    check_port(port)
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} does not resolve: {e.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may rebind at once
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror} (is another server running there?)"
                         ) from None
    sock.set_inheritable(True)
    return sock


def _httptools_available() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


def parser_name(choice: str) -> str:
    """--http (one of HTTP_PARSERS): auto picks httptools (C, llhttp) when it is installed, else h11
    (pure Python)."""
    if choice == "auto":
        return "httptools" if _httptools_available() else "h11"
    if choice == "httptools" and not _httptools_available():
        raise ValueError("--http httptools: the httptools package is not installed (pip install httptools)")
    return choice


class _Limits:
    """Mixed into a uvicorn HTTP protocol: --max-connections and a header-read timer, armed when a
    connection opens and again after each response. The protocol says whether a request head is
    still awaited (awaiting_head)."""

    parser: str  # httptools or h11
    header_timeout_s: float
    cap: int
    _header_timer = None

    def awaiting_head(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.cap:
            self.logger.warning("over --max-connections=%d: closing a new connection", self.cap)
            transport.close()
            return
        self._arm_header_timer()

    def connection_lost(self, exc) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_timer()  # the next request on this connection gets the same limit

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        if self.awaiting_head() and not self.transport.is_closing():
            self.transport.close()


def _httptools_awaiting_head(self) -> bool:
    # a request whose head arrived has a cycle until its response is done, or waits in the pipeline
    return (self.cycle is None or self.cycle.response_complete) and not self.pipeline


def _h11_awaiting_head(self) -> bool:
    return self.conn.their_state is h11.IDLE  # past IDLE once a complete request head arrived


def protocol_class(options: ServeOptions, parser: str = "auto") -> type:
    """uvicorn's HTTP protocol (httptools or h11, see parser_name) with --read-timeout-s for
    headers and --max-connections."""
    name = parser_name(parser)
    if name == "httptools":  # imports httptools, which may be missing
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
        awaiting_head = _httptools_awaiting_head
    else:
        base, awaiting_head = H11Protocol, _h11_awaiting_head
    return type(f"Limited{base.__name__}", (_Limits, base),
                {"parser": name, "header_timeout_s": options.read_timeout_s, "cap": options.max_connections,
                 "awaiting_head": awaiting_head})


def uvicorn_limits(options: ServeOptions) -> dict:
    """uvicorn.Config keyword arguments for the HTTP parser and the connection limits."""
    return {"http": protocol_class(options, options.http), "timeout_keep_alive": options.keep_alive_s}
