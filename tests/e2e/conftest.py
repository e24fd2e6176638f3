"""A real ``powerserve serve`` process on the embedded model, driven through the official
``openai`` client. The server runs on the vLLM engine (so every CI run exercises it); set
``POWERSERVE_E2E_ENGINE=torch`` to run the same tests on the torch engine. Tests read the API
key and the engine from the ``server`` fixture (``server.api_key``, ``server.headers``,
``server.engine``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from openai import OpenAI

from powerserve.engine.factory import vllm_available
from powerserve.testing import ServerProcess

START_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    engine = os.environ.get("POWERSERVE_E2E_ENGINE", "vllm")
    if engine == "vllm" and not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh (or set POWERSERVE_E2E_ENGINE=torch)")
    args = ["--max-model-len", "1024", *(["--enforce-eager"] if engine == "vllm" else [])]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(engine=engine, extra_args=args, log_path=log_path, api_key="e2e-key")
    try:
        srv.wait_ready(timeout_s=START_TIMEOUT_S)
        yield srv
    finally:
        srv.kill(grace_s=60)


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0, timeout=300)


@pytest.fixture(scope="session")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id
