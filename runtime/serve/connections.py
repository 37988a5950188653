"""Connection limits of the local server: the listening socket, a header-read timeout and a
connection cap on uvicorn's h11 protocol, and the keep-alive timeout.

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


def protocol_class(options: ServeOptions) -> type[H11Protocol]:
    """uvicorn's h11 protocol with --read-timeout-s for headers and --max-connections."""
    header_timeout_s, cap = options.read_timeout_s, options.max_connections

    class LimitedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > cap:
                self.logger.warning("over --max-connections=%d: closing a new connection", cap)
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
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _header_timeout(self) -> None:
            # IDLE: no complete request head yet (a request whose head arrived is past this state)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return LimitedH11Protocol


def uvicorn_limits(options: ServeOptions) -> dict:
    """uvicorn.Config keyword arguments for the connection limits."""
    return {"http": protocol_class(options), "timeout_keep_alive": options.keep_alive_s}
