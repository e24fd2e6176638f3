"""Admission control over real sockets: beyond the running and queued budgets a request gets a
429 with ``Retry-After`` at once; queued requests complete when the budget frees; a
``power_mcmc`` request weighs more than a ``standard`` one; the queue and rejection series move.

The budget is held by a long ``power_mcmc`` chain whose own deadline (a few seconds) frees it.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx

from powerserve.serving.admission import Admission, Ticket
from tests.reliability.support import (
    LONG_MCMC,
    LONG_MCMC_SETTINGS,
    MODEL,
    assert_openai_error,
    live,
    metric,
    parse_sse,
)

SMALL_MCMC = {"name": "power_mcmc", "alpha": 4, "block_size": 4, "mcmc_steps": 1, "proposals": 1}


async def wait_for_metric(client: httpx.AsyncClient, name: str, value: float, **labels: str) -> None:
    for _ in range(200):
        if metric((await client.get("/metrics")).text, name, **labels) == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}{labels} never reached {value}")


def completion(decoder: Any = "standard", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "decoder": decoder, **extra}


async def test_beyond_running_and_queue_429_with_retry_after_and_queued_ones_complete(engine: Any) -> None:
    with live(engine, max_running_weight=2, max_queued_weight=2, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            before = (await client.get("/metrics")).text
            # 1. One long chain fills the running budget on its own (its weight is clamped to 2).
            long = asyncio.create_task(
                client.post("/v1/completions", json=completion(LONG_MCMC, max_tokens=32, timeout=4))
            )
            await wait_for_metric(client, "powerserve_running_weight", 2)
            # 2. Two standard requests (weight 1 each) fill the queue: one plain, one streaming.
            queued = asyncio.create_task(client.post("/v1/completions", json=completion(seed=1)))
            streamed = asyncio.create_task(_stream(client, completion(seed=2, stream=True)))
            await wait_for_metric(client, "powerserve_requests_queued", 2, decoder="standard", model=MODEL)
            # 3. Anything more is refused at once, streaming or not, cheap or not.
            for body in (completion(), completion(stream=True), completion(SMALL_MCMC)):
                resp = await client.post("/v1/completions", json=body)
                err = assert_openai_error(resp, 429, "rate_limit_error")
                assert err["code"] == "server_busy"
                assert int(resp.headers["retry-after"]) >= 1
            chat = await client.post(
                "/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
            )
            assert_openai_error(chat, 429, "rate_limit_error")
            # 4. The chain hits its deadline and frees the budget; the queued requests complete.
            assert_openai_error(await long, 504, "timeout_error")
            done = await queued
            assert done.status_code == 200, done.text
            assert done.json()["choices"][0]["finish_reason"] in ("stop", "length")
            status, events = await streamed
            assert status == 200 and events[-1] == "[DONE]"
            assert any(c.get("finish_reason") for e in events[:-1] for c in e["choices"])
            after = (await client.get("/metrics")).text

    for decoder, refused in (("standard", 3), ("power_mcmc", 1)):
        labels = {"decoder": decoder, "model": MODEL}
        rejections = "powerserve_admission_rejections_total"
        assert metric(after, rejections, **labels) - metric(before, rejections, **labels) == refused
        requests = "powerserve_requests_total"
        rejected = metric(after, requests, outcome="rejected", **labels) - metric(
            before, requests, outcome="rejected", **labels
        )
        assert rejected == refused
    assert metric(after, "powerserve_requests_queued") == 0
    assert metric(after, "powerserve_running_weight") == 0


async def test_power_mcmc_weighs_more_than_standard(engine: Any) -> None:
    """With a running budget of 2 and a queue of 2: one chain fills the running budget alone and
    one queued chain fills the queue alone, where two standard requests would fit."""
    with live(engine, max_running_weight=2, max_queued_weight=2, **LONG_MCMC_SETTINGS) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=60) as client:
            long = asyncio.create_task(
                client.post("/v1/completions", json=completion(LONG_MCMC, max_tokens=32, timeout=3))
            )
            await wait_for_metric(client, "powerserve_running_weight", 2)
            chain = asyncio.create_task(client.post("/v1/completions", json=completion(SMALL_MCMC, max_tokens=8)))
            await wait_for_metric(client, "powerserve_requests_queued", 1, decoder="power_mcmc", model=MODEL)
            # A single standard request (weight 1) no longer fits in a queue of 2.
            assert_openai_error(await client.post("/v1/completions", json=completion()), 429, "rate_limit_error")
            assert_openai_error(await long, 504, "timeout_error")
            resp = await chain
            assert resp.status_code == 200, resp.text
            assert resp.json()["powerserve"]["decoder"] == "power_mcmc"
            # With the budget free, standard requests run side by side again.
            results = await asyncio.gather(*(client.post("/v1/completions", json=completion(seed=i)) for i in range(4)))
            assert [r.status_code for r in results] == [200] * 4


async def _stream(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, list[Any]]:
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        return resp.status_code, parse_sse((await resp.aread()).decode())


async def test_an_idle_server_admits_a_full_budget_request_after_any_history() -> None:
    """Found by the soak: the running weight was kept as a float total, and adding then
    subtracting weights drifts (1 + 2/7, 1 + 15/7 and 1 + 29/7, all released, left 2.7e-15). A server idle
    with such a residue could never admit a request weighing the full budget (every large
    power_mcmc request, whose weight is clamped to the budget): it waited out its deadline, and
    every request queued behind it waited too."""
    admission = Admission(max_running=16, max_queued=64)
    labels = ("power_mcmc", MODEL)
    tickets = [admission.reserve(1 + k / 7, labels) for k in (2, 15, 29)]
    for ticket in tickets:
        assert ticket.granted.is_set()
        admission.release(ticket)
    assert admission.running_weight == 0.0
    full = admission.reserve(16, labels)
    assert full.granted.is_set() and not admission.queue
    admission.release(full)
    # The same over a long random history of overlapping requests.
    rng = random.Random(0)
    held: list[Ticket] = []
    for _ in range(5000):
        weight = 1 + rng.randrange(1, 60) / 7
        if held and (rng.random() < 0.5 or admission.running_weight + weight > 16):
            admission.release(held.pop(rng.randrange(len(held))))
        else:
            held.append(admission.reserve(weight, labels))
            assert held[-1].granted.is_set()
    for ticket in held:
        admission.release(ticket)
    assert admission.running_weight == 0.0
    assert admission.reserve(16, labels).granted.is_set()
