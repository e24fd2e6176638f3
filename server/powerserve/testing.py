"""Servers for tests and benchmarks: ``powerserve serve`` as a subprocess, or the app in this
process under uvicorn, each on a free loopback port and ready once ``/health`` answers 200.

It lives in the installed package (not under ``tests/``) so that tests and benchmark scripts
import it the same way, ``from powerserve.testing import ServerProcess``, with no ``sys.path``
tricks; and beside the server rather than in ``powerserve_client``, because it starts the
server's own CLI and app, which a client-only install does not have. Importing it loads
neither FastAPI nor an engine (``LiveServer`` imports them when built).

Every helper here only listens on and talks to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
# LiveServer's default caps: small, so that tests on a tiny model stay cheap (overridable).
SMALL_SETTINGS: dict[str, Any] = {"max_n": 2, "default_max_tokens": 8, "max_tokens_limit": 32}
POLL_S = 0.25  # between two /health probes while a server starts


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago, below the OS's ephemeral range.

    A port the OS picks (bind to port 0) comes from the ephemeral range, where the OS may hand
    it out again before the server binds it: vLLM's engine picks its own internal ports that
    way, and once took the one chosen for the server while the engine started ("address already
    in use"). Below that range the OS assigns nothing by itself.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything tried was taken: let the OS pick
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (vLLM runs its engine core in a child process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
    return out


def wait_healthy(base: str, timeout_s: float, alive: Callable[[], str | None] = lambda: None) -> None:
    """Poll ``{base}/health`` every ``POLL_S`` until it answers 200.

    ``alive()`` returns a reason when the server can no longer come up (its process exited);
    that raises ``RuntimeError`` at once. Past ``timeout_s``: ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (reason := alive()) is not None:
            raise RuntimeError(reason)
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(POLL_S)
    raise TimeoutError(f"{base} not healthy in {timeout_s:g} s")


class ServerProcess:
    """``powerserve serve`` on 127.0.0.1 in its own process group, its output in ``log_path``.

    ``python -m powerserve.cli`` with this interpreter, so the server runs the same code as the
    caller (``PYTHONPATH`` included). Use as a context manager (ready on entry, stopped on exit)
    or call :meth:`wait_ready` and :meth:`kill` yourself."""

    def __init__(
        self,
        *,
        engine: str,
        log_path: Path,
        model: str | None = None,
        extra_args: Sequence[str] = (),
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.engine = engine
        self.log_path = log_path
        self.api_key = api_key
        cmd = [sys.executable, "-m", "powerserve.cli", "serve", "--engine", engine, "--host", HOST]
        cmd += ["--port", str(self.port), "--log-level", "warning"]
        if model is not None:
            cmd += ["--model", model]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        cmd += list(extra_args)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in kill)
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    @property
    def headers(self) -> dict[str, str]:
        """The ``Authorization`` header this server wants (none without an API key)."""
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        """Block until ``/health`` is 200; if the process exits or the time runs out, stop it and
        raise with the log's tail."""

        def alive() -> str | None:
            code = self.proc.poll()
            return None if code is None else f"server exited with {code}:\n{self.log_tail()}"

        try:
            wait_healthy(self.base, timeout_s, alive)
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"server not ready in {timeout_s:g} s:\n{self.log_tail()}") from None
        except RuntimeError:
            self.kill()
            raise

    def terminate(self) -> None:
        """SIGTERM: the server drains, then exits."""
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def kill(self, grace_s: float = 30.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL of its process group after ``grace_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class LiveServer:
    """The real app under uvicorn in a background thread of this process, on a free port: for
    tests that need a socket (a browser, the load generator, deadlines) yet read this process's
    gauges or substitute its engine. ``settings`` are ``Settings`` fields, over
    ``SMALL_SETTINGS``."""

    def __init__(self, engine: Any, **settings: Any) -> None:
        import uvicorn

        from powerserve.app import create_app
        from powerserve.settings import Settings

        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        app = create_app(Settings(**{**SMALL_SETTINGS, **settings}), engine=engine)
        self.server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
