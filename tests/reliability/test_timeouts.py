"""Deadlines: the server's ``request_timeout_s`` and a request's tighter ``timeout`` end a long
``power_mcmc`` chain with a 504 ``timeout_error`` (inside a stream: an error event, then
``[DONE]``), and the engine work stops with it. A per-request ``timeout`` larger than the
server's does not extend it; a request that times out while queued leaves the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.reliability.support import (
    LONG_MCMC,
    LONG_MCMC_SETTINGS,
    MODEL,
    assert_openai_error,
    live,
    metric,
    parse_sse,
)

SLACK_S = 5.0  # scheduling slack on a loaded two-core machine (6 s seen at load average 13)


class GenerateProbe:
    """Counts the engine's live ``generate`` calls and the tokens they have produced, and keeps
    each call's prompt ids."""

    def __init__(self) -> None:
        self.live = 0
        self.tokens = 0
        self.prompts: list[tuple[int, ...]] = []


@pytest.fixture
def probe(engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[GenerateProbe]:
    counts = GenerateProbe()
    original = engine.generate

    async def generate(prompt_ids: Any, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        counts.prompts.append(tuple(prompt_ids))
        counts.live += 1
        try:
            async for step in original(prompt_ids, *args, **kwargs):
                counts.tokens += 1
                yield step
        finally:
            counts.live -= 1

    monkeypatch.setattr(engine, "generate", generate)
    yield counts


def long_chain(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 32, "decoder": LONG_MCMC, **extra}


async def assert_work_stopped(client: httpx.AsyncClient, probe: GenerateProbe) -> None:
    """No engine call is left and no token is produced afterwards; the gauges are back to 0."""
    for _ in range(40):
        if probe.live == 0:
            break
        await asyncio.sleep(0.05)
    assert probe.live == 0
    tokens = probe.tokens
    await asyncio.sleep(0.5)
    assert probe.tokens == tokens, "the engine kept generating after the deadline"
    text = (await client.get("/metrics")).text
    assert metric(text, "powerserve_requests_running", decoder="power_mcmc", model=MODEL) == 0
    assert metric(text, "powerserve_running_weight") == 0


async def timed_post(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    resp = await client.post("/v1/completions", json=body)
    return resp, time.perf_counter() - t0


async def test_server_deadline_stops_a_long_chain(engine: Any, probe: GenerateProbe) -> None:
    with live(engine, request_timeout_s=2, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            before = (await client.get("/metrics")).text
            resp, elapsed = await timed_post(client, long_chain())
            err = assert_openai_error(resp, 504, "timeout_error")
            assert err["code"] == "request_timeout" and "2 s" in err["message"]
            assert 2 <= elapsed < 2 + SLACK_S
            assert probe.tokens > 0
            await assert_work_stopped(client, probe)
            after = (await client.get("/metrics")).text
            labels = {"decoder": "power_mcmc", "model": MODEL, "outcome": "timeout"}
            assert metric(after, "powerserve_requests_total", **labels) == (
                metric(before, "powerserve_requests_total", **labels) + 1
            )


async def test_request_timeout_tightens_but_never_extends(engine: Any, probe: GenerateProbe) -> None:
    with live(engine, **LONG_MCMC_SETTINGS) as srv:  # server deadline: the default 600 s
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            resp, elapsed = await timed_post(client, long_chain(timeout=1))
            assert_openai_error(resp, 504, "timeout_error")
            assert 1 <= elapsed < 1 + SLACK_S
            await assert_work_stopped(client, probe)
    with live(engine, request_timeout_s=1.5, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            resp, elapsed = await timed_post(client, long_chain(timeout=100))
            err = assert_openai_error(resp, 504, "timeout_error")
            assert "1.5 s" in err["message"]
            assert 1.5 <= elapsed < 1.5 + SLACK_S
            await assert_work_stopped(client, probe)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_stream_deadline_is_an_error_event_then_done(engine: Any, probe: GenerateProbe, path: str) -> None:
    with live(engine, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            body = long_chain(timeout=1, stream=True)
            if path.endswith("chat/completions"):
                body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            t0 = time.perf_counter()
            async with client.stream("POST", path, json=body) as resp:
                assert resp.status_code == 200
                events = parse_sse((await resp.aread()).decode())
            assert time.perf_counter() - t0 < 1 + SLACK_S
            assert events[-1] == "[DONE]"
            err = events[-2]["error"]
            assert set(err) == {"message", "type", "param", "code"}
            assert (err["type"], err["code"]) == ("timeout_error", "request_timeout")
            await assert_work_stopped(client, probe)


async def test_deadline_while_queued_leaves_the_queue(engine: Any, probe: GenerateProbe) -> None:
    """A request that times out in the queue leaves it without reaching the engine and without
    disturbing the chain that holds the budget: the chain's tokens keep growing across the
    queued request's 0.5 s wait (a strict increase: a chain at ~100 tokens/s on the tiny model
    makes tens of tokens in that time), and stop growing once the chain's own 3 s deadline
    passes (``assert_work_stopped``: two samples 0.5 s apart after the last call ended)."""
    with live(engine, max_running_weight=2, max_queued_weight=4, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            chain = asyncio.create_task(timed_post(client, long_chain(timeout=3)))
            for _ in range(100):
                if metric((await client.get("/metrics")).text, "powerserve_running_weight") == 2:
                    break
                await asyncio.sleep(0.05)
            for _ in range(100):  # the chain's first engine call names its prompt
                if probe.prompts:
                    break
                await asyncio.sleep(0.05)
            assert probe.prompts, "the chain never reached the engine"
            chain_prompt = probe.prompts[0]
            tokens_before = probe.tokens
            resp, elapsed = await timed_post(
                client, {"model": MODEL, "prompt": "queued", "max_tokens": 4, "timeout": 0.5}
            )
            assert_openai_error(resp, 504, "timeout_error")
            assert 0.5 <= elapsed < 0.5 + SLACK_S
            text = (await client.get("/metrics")).text
            assert metric(text, "powerserve_requests_queued", decoder="standard", model=MODEL) == 0
            # Every engine call extends the chain's prompt (its proposals continue a prefix of it).
            strangers = [p for p in probe.prompts if p[: len(chain_prompt)] != chain_prompt]
            assert not strangers, "the queued request reached the engine"
            assert probe.tokens > tokens_before, "the chain stalled while another request waited in the queue"
            resp, _ = await chain
            assert_openai_error(resp, 504, "timeout_error")
            await assert_work_stopped(client, probe)
