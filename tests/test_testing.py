"""``powerserve.testing``: the one way tests and benchmarks start a server. The subprocess path
is exercised end to end by tests/e2e, tests/eval and tests/reliability; these are its failure
paths, which those never reach."""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from powerserve.testing import ServerProcess, free_port, wait_healthy


def test_free_port_can_be_bound_and_is_not_one_the_os_hands_out() -> None:
    """The port binds, and lies below the ephemeral range, where the OS picks ports for other
    binds to port 0 (vLLM's internal ones): 20 picks, all below it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        port = free_port()
        assert 10_000 <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    t0 = time.monotonic()
    srv = ServerProcess(engine="no-such-engine", log_path=tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="server exited with") as info:
        srv.wait_ready(timeout_s=120)
    assert time.monotonic() - t0 < 60, "waited for the timeout instead of noticing the exit"
    assert "no-such-engine" in str(info.value)  # the CLI's complaint, from the log
    assert srv.proc.poll() is not None and srv._log.closed


def test_wait_healthy_waits_for_200_and_times_out_otherwise() -> None:
    status = {"code": 503}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        with pytest.raises(TimeoutError):
            wait_healthy(base, timeout_s=1.0)  # 503 is not ready
        with pytest.raises(RuntimeError, match="gone"):
            wait_healthy(base, timeout_s=10.0, alive=lambda: "gone")
        threading.Timer(0.5, lambda: status.update(code=200)).start()
        t0 = time.monotonic()
        wait_healthy(base, timeout_s=10.0)
        assert time.monotonic() - t0 < 5
    finally:
        httpd.shutdown()


def test_the_server_runs_this_interpreter(tmp_path: Path) -> None:
    srv = ServerProcess(engine="no-such-engine", log_path=tmp_path / "server.log")
    try:
        assert srv.proc.args[0] == sys.executable  # type: ignore[index]
    finally:
        srv.kill()
