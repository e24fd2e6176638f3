"""``power_mcmc`` through the HTTP app: cost fields, limits, streaming, cancellation, metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from powerserve.engine.torch_engine import TorchEngine
from powerserve.protocol import CompletionRequest
from powerserve.serving.completions import stream_completion
from powerserve.serving.state import ServerState
from powerserve.settings import Settings
from tests.serving.http_client import assert_openai_error, post, sse_events
from tests.serving.tiny_app import MODEL, make_client

MCMC = {"name": "power_mcmc", "alpha": 4, "block_size": 4, "mcmc_steps": 3}


def test_power_mcmc_completion_reports_its_cost(client: TestClient) -> None:
    body = post(
        client, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 8, "seed": 1, "decoder": MCMC}
    ).json()
    info = body["powerserve"]
    assert info["decoder"] == "power_mcmc"
    assert (info["params"]["alpha"], info["params"]["block_size"], info["params"]["mcmc_steps"]) == (4.0, 4, 3)
    stats = info["decoder_stats"]
    n_out = body["usage"]["completion_tokens"]
    assert stats["proposals"] >= 3  # at least mcmc_steps per block that ran
    assert stats["candidates"] == 8 * stats["proposals"]  # the default K = 8 per step
    assert stats["mh_steps_done"] == stats["mh_steps_total"] == stats["proposals"]
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["tokens_proposed"] >= n_out
    assert info["tokens_generated"] >= stats["tokens_proposed"]
    assert info["cost_multiplier"] > 1.0
    assert info["self_reward"]["tokens"] == n_out
    again = post(
        client, "/v1/completions", {"model": MODEL, "prompt": "Once", "max_tokens": 8, "seed": 1, "decoder": MCMC}
    ).json()
    assert again["choices"][0]["text"] == body["choices"][0]["text"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"alpha": 0.5}, "decoder.alpha"),
        ({"block_size": 0}, "decoder.block_size"),
        ({"mcmc_steps": -1}, "decoder.mcmc_steps"),
        ({"mcmc_steps": 1e12}, "decoder.mcmc_steps"),
        ({"mcmc_steps": 65}, "decoder.mcmc_steps"),
        ({"proposals": 65}, "decoder.proposals"),
        ({"proposals": 0}, "decoder.proposals"),
        ({"block_size": 10**9}, "decoder.block_size"),
        ({"parallel_proposals": 4}, "decoder.parallel_proposals"),
        ({"steps": 3}, "decoder.steps"),
    ],
)
def test_power_mcmc_bad_parameters(client: TestClient, params: dict[str, Any], param: str) -> None:
    resp = post(
        client,
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "max_tokens": 4, "decoder": {"name": "power_mcmc", **params}},
    )
    assert_openai_error(resp, 400, param)


def test_engine_token_ceiling(engine: TorchEngine) -> None:
    with make_client(engine, max_engine_tokens_per_request=5000) as c:
        resp = post(
            c,
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 64,
                "decoder": {"name": "power_mcmc", "block_size": 8, "mcmc_steps": 64, "proposals": 8},
            },
        )
        err = assert_openai_error(resp, 400, "max_tokens")
        assert err["code"] == "engine_token_limit" and "5000" in err["message"]
        ok = post(
            c,
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 8,
                "decoder": {"name": "power_mcmc", "block_size": 8, "mcmc_steps": 2},
            },
        )
        assert ok.status_code == 200


def test_power_mcmc_streams_its_final_answer(client: TestClient) -> None:
    req = {"model": MODEL, "prompt": "Stream", "max_tokens": 8, "seed": 2, "stream": True, "decoder": MCMC}
    with client.stream("POST", "/v1/completions", json=req) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    text = "".join(c["choices"][0]["text"] for c in events[:-1] if c["choices"])
    plain = post(client, "/v1/completions", {k: v for k, v in req.items() if k != "stream"}).json()
    assert text == plain["choices"][0]["text"]
    assert events[-2]["powerserve"]["decoder"] == "power_mcmc"


def test_power_mcmc_metrics(client: TestClient) -> None:
    post(client, "/v1/completions", {"model": MODEL, "prompt": "m", "max_tokens": 6, "decoder": MCMC})
    labels = {"decoder": "power_mcmc", "model": MODEL}
    assert (REGISTRY.get_sample_value("powerserve_mcmc_acceptance_rate_count", labels) or 0) >= 1
    assert (REGISTRY.get_sample_value("powerserve_proposal_tokens_proposed_total", labels) or 0) >= 6
    assert (REGISTRY.get_sample_value("powerserve_cost_multiplier_count", labels) or 0) >= 1


async def test_cancelling_a_chain_stops_it_within_a_second(engine: TorchEngine) -> None:
    """A stream whose consumer goes away (client disconnect) cancels the chain: the cancellation
    completes within 1 s, the request counts as cancelled and nothing keeps running."""
    state = ServerState.build(Settings(max_engine_tokens_per_request=10**7), engine, MODEL)
    body = CompletionRequest(
        model=MODEL,
        prompt="long",
        max_tokens=64,
        stream=True,
        decoder={"name": "power_mcmc", "block_size": 16, "mcmc_steps": 64, "proposals": 64},
    )  # type: ignore[arg-type]
    labels = {"decoder": "power_mcmc", "model": MODEL, "outcome": "cancelled"}
    before = REGISTRY.get_sample_value("powerserve_requests_total", labels) or 0.0

    async def consume() -> None:
        async for _ in await stream_completion(state, body):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(1.0)
    assert not task.done(), "the chain should still be running"
    t0 = time.perf_counter()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, elapsed
    assert (REGISTRY.get_sample_value("powerserve_requests_total", labels) or 0.0) == before + 1
    running = REGISTRY.get_sample_value("powerserve_requests_running", {"decoder": "power_mcmc", "model": MODEL})
    assert running == 0
