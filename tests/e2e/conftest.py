"""A real ``powerserve serve`` process on the embedded model, driven through the official
``openai`` client. The server runs on the vLLM engine (so every CI run exercises it); set
``POWERSERVE_E2E_ENGINE=torch`` to run the same tests on the torch engine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from powerserve.engine.factory import vllm_available

START_TIMEOUT_S = 300
API_KEY = "e2e-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, engine: str, log_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.engine = engine
        self.log_path = log_path
        cmd = [
            sys.executable,
            "-m",
            "powerserve.cli",
            "serve",
            "--engine",
            engine,
            "--port",
            str(self.port),
            "--api-key",
            API_KEY,
            "--max-model-len",
            "1024",
            "--log-level",
            "warning",
        ]
        if engine == "vllm":
            cmd += ["--enforce-eager"]
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"server not ready in {START_TIMEOUT_S}s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    engine = os.environ.get("POWERSERVE_E2E_ENGINE", "vllm")
    if engine == "vllm" and not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh (or set POWERSERVE_E2E_ENGINE=torch)")
    srv = Server(engine, tmp_path_factory.mktemp("server") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key=API_KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id
