"""`deleaker serve` connection limits and start-up faults, on a real uvicorn process on 127.0.0.1:
stalled clients are closed within --read-timeout-s while others are served, a timed-out request
stops its batch cleanly, and a bad or busy port fails in one line before the model loads."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

from deleaker.runtime.serve.client import GENERATE_PATH as GEN  # noqa: E402
from deleaker.runtime.serve.options import HTTP_PARSERS  # noqa: E402
from support.serve import SIZE, STEPS, ServerProcess, metric  # noqa: E402

READ_TIMEOUT_S = 2
FAST = {"prompt": "a cat and a dog", "entities": ["cat", "dog"], "size": SIZE, "steps": STEPS}


def _limited_server(tiny_model_dir, tmp_path_factory, http: str) -> ServerProcess:
    return ServerProcess(["--model", str(tiny_model_dir), "--max-batch", "1", "--max-wait-ms", "0", "--steps",
                          str(STEPS), "--default-size", SIZE, "--read-timeout-s", str(READ_TIMEOUT_S),
                          "--keep-alive-s", "1", "--timeout-s", "1", "--max-connections", "300", "--http", http],
                         tmp_path_factory.mktemp(f"serve-limits-{http}") / "server.log")


@pytest.fixture(scope="module", params=["httptools", "h11"])
def limited(tiny_model_dir, tmp_path_factory, request):
    """One server per HTTP parser: the header timeout and the connection cap sit on each one's protocol."""
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="httptools is not installed (the serve extra installs it)")
    s = _limited_server(tiny_model_dir, tmp_path_factory, request.param)
    assert f"queue 64, {request.param})" in s.log_text()  # the parser asked for is the one serving
    yield s
    s.stop()


@pytest.fixture(scope="module")
def limited_auto(tiny_model_dir, tmp_path_factory):
    s = _limited_server(tiny_model_dir, tmp_path_factory, "auto")
    yield s
    s.stop()


def _closed(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset); the socket is non-blocking."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_stalled_connections_are_closed_while_others_are_served(limited):
    """100 connections stall in their headers and 100 after half a body; all are closed within the
    read timeout (plus slack for a busy machine) and a normal request is served meanwhile."""
    head = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    socks = []
    t0 = time.monotonic()
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", limited.port), timeout=10)
        s.sendall(head if i % 2 else head + b"Content-Length: 200\r\n\r\n{\"prompt\": \"a ca")
        s.setblocking(False)
        socks.append(s)
    r = httpx.post(limited.url + GEN, json=FAST, timeout=60)
    assert r.status_code == 200, r.text
    assert not any(_closed(s) for s in socks[:20]), "closed before the read timeout"
    open_ = set(range(200))
    while open_ and time.monotonic() - t0 < READ_TIMEOUT_S + 8:
        open_ -= {i for i in open_ if _closed(socks[i])}
        time.sleep(0.1)
    elapsed = time.monotonic() - t0
    for s in socks:
        s.close()
    assert not open_, f"{len(open_)} stalled connections still open after {elapsed:.1f}s"
    assert elapsed >= READ_TIMEOUT_S * 0.9
    assert httpx.post(limited.url + GEN, json=FAST, timeout=60).status_code == 200


def test_stalled_body_gets_a_408(limited):
    with socket.create_connection(("127.0.0.1", limited.port), timeout=READ_TIMEOUT_S + 10) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\"")
        answer = b""
        while chunk := s.recv(4096):  # until the server closes (Connection: close)
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "did not arrive within 2s" in answer, answer


def test_connection_cap(limited):
    socks = [socket.create_connection(("127.0.0.1", limited.port), timeout=10) for _ in range(310)]
    try:
        time.sleep(0.5)
        for s in socks:
            s.setblocking(False)
        closed = sum(_closed(s) for s in socks)
        assert closed >= 10, closed  # the ones past --max-connections=300
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert httpx.post(limited.url + GEN, json=FAST, timeout=60).status_code == 200


def test_timeout_stops_the_abandoned_batch_without_stray_errors(limited_auto):
    """A request past --timeout-s gets 504; its batch (all of whose images are abandoned) stops after
    the current step instead of running its 50 steps, and nothing is logged as never retrieved.
    512x512: its 50 steps take several seconds on a fast CPU (256x256 took 1.0 s, as long as the
    timeout, so its last step could end before the timeout and the batch finish unabandoned)."""
    r = httpx.post(limited_auto.url + GEN, json={"prompt": "a cat", "size": "512x512", "steps": 50}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = httpx.get(limited_auto.url + "/metrics", timeout=10).text
        if metric(m, "deleaker_dropped_images_total", 'reason="abandoned"') == 1:
            break
        time.sleep(0.1)
    assert metric(m, "deleaker_dropped_images_total", 'reason="abandoned"') == 1, m + limited_auto.log_text()
    assert metric(m, "deleaker_running_images") == 0
    assert httpx.post(limited_auto.url + GEN, json=FAST, timeout=60).status_code == 200
    log = limited_auto.log_text()
    assert "never retrieved" not in log and "Traceback" not in log, log


def _serve_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deleaker.runtime.serve.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_bad_or_busy_port_fails_in_one_line_before_loading():
    for port in ("99999", "0", "-1"):
        r = _serve_cli("--port", port)
        assert r.returncode == 2 and r.stderr.strip() == f"deleaker serve: error: --port must be in [1, 65535], got " \
                                                         f"{port}", r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t0 = time.monotonic()
        r = _serve_cli("--port", str(port))
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Address already in use" in lines[0], r.stderr
        assert "embedded tiny" not in r.stderr  # refused before the model loads
        assert time.monotonic() - t0 < 30


def test_http_parser_is_checked_before_loading():
    r = _serve_cli("--http", "nghttp2")
    assert r.returncode == 2 and "argument --http: invalid choice: 'nghttp2'" in r.stderr, r.stderr
    r = _serve_cli("--ray", "--http", "h11")
    assert r.returncode == 2 and r.stderr.strip() == ("deleaker serve: error: --http applies to the local server; "
                                                      "Ray Serve's proxy parses HTTP itself"), r.stderr


def test_help_shows_defaults():
    r = _serve_cli("--help")
    text = " ".join(r.stdout.split())
    for option, default in (("--port", "8000"), ("--max-body-bytes", "65536"), ("--read-timeout-s", "15.0"),
                            ("--keep-alive-s", "5.0"), ("--max-connections", "512"), ("--http", "auto")):
        metavar = "{" + ",".join(HTTP_PARSERS) + "}" if option == "--http" else option.lstrip("-").upper().replace("-", "_")
        after = text.rsplit(f"{option} {metavar} ", 1)[1][:200]  # its help
        assert f"(default: {default})" in after, (option, after)
