"""A dead engine ends the server (issue 12): requests in flight get an OpenAI-shaped 503, new
ones a 503, and the process exits with status ``ENGINE_DEAD_EXIT_CODE`` so that its supervisor
(compose's restart policy, Kubernetes) starts a fresh one, instead of a zombie that answers 500.

Two levels: the watchdog in-process on the torch engine whose health check is made to fail
(fast, no vLLM), and a real ``powerserve serve --engine vllm`` whose EngineCore worker process is
killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from powerserve.app import create_app
from powerserve.engine.factory import vllm_available
from powerserve.server import ENGINE_DEAD_EXIT_CODE, DrainingServer
from powerserve.settings import Settings
from powerserve.testing import free_port
from tests.reliability.support import (
    LONG_MCMC,
    LONG_MCMC_SETTINGS,
    MODEL,
    SETTINGS,
    ServerProcess,
    assert_openai_error,
)

EXIT_BOUND_S = 30.0  # the server must be gone this long after its engine died


def test_watchdog_fails_in_flight_work_and_exits(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Torch engine, in-process: a long power_mcmc chain is running when the engine's health
    check starts failing. The chain's client gets a 503 OpenAI-shaped error, a new request a 503,
    and the server stops within EXIT_BOUND_S with ``engine_dead`` set (exit status 3 from
    ``powerserve.server.run``)."""
    port = free_port()
    app = create_app(Settings(**{**SETTINGS, **LONG_MCMC_SETTINGS, "request_timeout_s": 120}), engine=engine)
    server = DrainingServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"), app, 30.0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            body = {"model": MODEL, "prompt": "A long chain", "max_tokens": 32, "decoder": LONG_MCMC}
            running = asyncio.create_task(client.post("/v1/completions", json=body))
            await asyncio.sleep(1.5)  # the chain is running
            assert not running.done()

            async def dead() -> None:
                raise RuntimeError("engine core died")

            monkeypatch.setattr(engine, "check_health", dead)
            for _ in range(100):  # the watchdog notices within one period, then refuses new work
                if (await client.get("/health")).status_code == 503:
                    break
                await asyncio.sleep(0.02)
            late = await client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
            return await running, late

    try:
        in_flight, late = asyncio.run(scenario())
        thread.join(timeout=EXIT_BOUND_S)
        assert not thread.is_alive(), "the server did not exit after its engine died"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert server.engine_dead
    assert_openai_error(in_flight, 503, "service_unavailable")
    assert_openai_error(late, 503, "service_unavailable")


def engine_core(pid: int) -> psutil.Process:
    """vLLM's EngineCore worker: the descendant of the server process that runs the model."""
    children = psutil.Process(pid).children(recursive=True)
    named = [c for c in children if "EngineCore" in c.name() or "EngineCore" in " ".join(c.cmdline())]
    assert named, [(c.pid, c.name(), c.cmdline()[:3]) for c in children]
    return named[0]


@pytest.mark.slow
@pytest.mark.vllm
def test_killing_the_vllm_engine_core_ends_the_server(tmp_path: Any) -> None:
    """``powerserve serve --engine vllm``: SIGKILL the EngineCore process while a power_mcmc
    chain runs. The chain's client gets a 503 OpenAI-shaped error (``engine_dead`` or
    ``server_shutdown``) or its connection ends, and the server exits with
    ``ENGINE_DEAD_EXIT_CODE`` within EXIT_BOUND_S. (Before: /health said unhealthy but the
    process lived on, answering 500 to everything.)"""
    if not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh")
    args = ["--max-model-len", "512", "--enforce-eager", "--max-engine-tokens-per-request", str(10**9)]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        srv = ServerProcess(model=None, engine="vllm", extra_args=args, log_path=tmp_path / "server.log")
    try:
        srv.wait_ready(timeout_s=300)
        model = httpx.get(f"{srv.base}/v1/models", timeout=10).json()["data"][0]["id"]
        core = engine_core(srv.pid)

        async def scenario() -> httpx.Response | httpx.HTTPError:
            async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
                body = {"model": model, "prompt": "A long chain", "max_tokens": 64, "decoder": LONG_MCMC}
                running = asyncio.create_task(client.post("/v1/completions", json=body))
                await asyncio.sleep(3.0)
                assert not running.done(), "the chain ended before the engine was killed"
                core.send_signal(signal.SIGKILL)
                try:
                    return await running
                except httpx.HTTPError as exc:  # the connection ended: allowed
                    return exc

        outcome = asyncio.run(scenario())
        code = srv.wait(timeout_s=EXIT_BOUND_S)
        assert code == ENGINE_DEAD_EXIT_CODE, srv.log_tail()
        if isinstance(outcome, httpx.Response):
            err = assert_openai_error(outcome, 503, "service_unavailable")
            assert err["code"] in {"engine_dead", "server_shutdown"}, err
    finally:
        srv.kill()
