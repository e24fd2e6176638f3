"""Graceful shutdown of a real ``powerserve serve`` process (tiny checkpoint, torch engine).

On SIGTERM the server drains: ``/health`` answers 503 ``{"status": "draining"}``, new requests
get a 503 ``server_draining``, running and queued requests finish if they can within
``drain_timeout_s``; what still runs or waits then is cancelled with a 503 ``server_shutdown``
(inside a stream: an error event, then ``[DONE]``). Either way the process exits 0.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from tests.reliability.support import LONG_MCMC, assert_openai_error, metric, parse_sse

# About 2-3 s on the tiny checkpoint: long enough to be caught running, short enough to drain.
SHORT_MCMC = {"name": "power_mcmc", "alpha": 4, "block_size": 16, "mcmc_steps": 20, "proposals": 1}
NO_CEILING = ("--max-engine-tokens-per-request", str(10**9))


async def wait_one_running_one_queued(client: httpx.AsyncClient) -> None:
    """A chain weighs the whole running budget, so of two chains one runs and one waits."""
    for _ in range(400):
        text = (await client.get("/metrics")).text
        if metric(text, "powerserve_requests_running") == 1 and metric(text, "powerserve_requests_queued") == 1:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the two requests never got to run and queue")


async def stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, list[Any]]:
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        return resp.status_code, parse_sse((await resp.aread()).decode())


async def test_sigterm_drains_running_work_then_exits_0(server_factory: Any) -> None:
    srv = server_factory("--drain-timeout-s", "60", *NO_CEILING)
    async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Tell me", "max_tokens": 32, "seed": 1, "decoder": SHORT_MCMC}
        running = asyncio.create_task(client.post("/v1/completions", json=body))
        streaming = asyncio.create_task(stream(client, {**body, "stream": True}))
        await wait_one_running_one_queued(client)
        t0 = time.monotonic()
        srv.terminate()
        # Draining: the load balancer's probe fails and new work is turned away, over a new
        # connection as well as a kept-alive one.
        health = await client.get("/health")
        assert (health.status_code, health.json()) == (503, {"status": "draining"})
        fresh = httpx.AsyncClient(base_url=srv.base, timeout=10)
        async with fresh:
            for c in (client, fresh):
                for payload in ({**body, "decoder": "standard"}, {**body, "stream": True}):
                    err = assert_openai_error(await c.post("/v1/completions", json=payload), 503)
                    assert (err["type"], err["code"]) == ("service_unavailable", "server_draining")
        # The running request finishes normally, and so does the queued one after it.
        done = await running
        assert done.status_code == 200, done.text
        assert done.json()["choices"][0]["finish_reason"] in ("stop", "length")
        status, events = await streaming
        assert status == 200 and events[-1] == "[DONE]"
        assert not any("error" in e for e in events[:-1] if isinstance(e, dict))
        assert any(c.get("finish_reason") for e in events[:-1] for c in e["choices"])
    code = await asyncio.to_thread(srv.wait, 30)
    assert code == 0, srv.log_tail()
    assert time.monotonic() - t0 < 30, "the server waited out its drain time although the work was done"


async def test_work_past_the_drain_time_is_cancelled_with_503_then_exit_0(server_factory: Any) -> None:
    srv = server_factory("--drain-timeout-s", "1", *NO_CEILING)
    async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "prompt": "Tell me", "max_tokens": 32, "decoder": LONG_MCMC}
        running = asyncio.create_task(client.post("/v1/completions", json=body))
        streaming = asyncio.create_task(stream(client, {**body, "stream": True}))
        await wait_one_running_one_queued(client)
        t0 = time.monotonic()
        srv.terminate()
        err = assert_openai_error(await running, 503, "service_unavailable")
        assert err["code"] == "server_shutdown"
        status, events = await streaming
        assert status == 200 and events[-1] == "[DONE]"
        error = events[-2]["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["code"]) == ("service_unavailable", "server_shutdown")
        assert time.monotonic() - t0 < 1 + 3, "cancelled about when the drain time ran out"
    code = await asyncio.to_thread(srv.wait, 30)
    assert code == 0, srv.log_tail()
