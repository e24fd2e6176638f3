"""``/dashboard`` and ``/dashboard/data`` through the real app on the tiny model."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from powerserve import metrics
from powerserve.engine.torch_engine import TorchEngine
from tests.serving.tiny_app import MODEL, make_client

MCMC = {"name": "power_mcmc", "block_size": 4, "mcmc_steps": 2}


def complete(client: Any, decoder: Any, seed: int) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "decoder": decoder, "seed": seed}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    info: dict[str, Any] = r.json()["powerserve"]
    return info


def test_data_reports_each_decoder_with_the_costs_responses_reported(engine: TorchEngine) -> None:
    with make_client(engine, api_key="k") as client:
        client.headers["Authorization"] = "Bearer k"
        infos = {
            name: [complete(client, d, s) for s in range(2)]
            for name, d in [("standard", "standard"), ("power_mcmc", MCMC)]
        }
        del client.headers["Authorization"]  # the dashboard, like /metrics, needs no key
        r = client.get("/dashboard/data")
    assert r.status_code == 200
    data = r.json()
    assert data["model"] == MODEL
    assert data["engine"] == "torch"
    for name, responses in infos.items():
        row = data["decoders"][name]
        # Prometheus series are process-global: an outcome another test created shows as 0 here.
        assert {k: v for k, v in row["requests"].items() if v} == {"success": 2}
        assert row["completed"] == 2
        assert row["running"] == 0
        assert 0 < row["latency_p50"] <= row["latency_p95"] <= row["latency_p99"]
        engine_tokens = sum(i["tokens_generated"] + i["tokens_scored"] for i in responses)
        output = sum(i["self_reward"]["tokens"] for i in responses)
        assert row["engine_tokens"] == engine_tokens
        assert row["cost_multiplier"] == pytest.approx(engine_tokens / output)
        # Self-reward is a median estimated from buckets: it lies in the buckets the values fell in.
        rewards = [c["self_reward"]["mean_logprob"] for i in responses for c in i["choices"]]
        bounds = metrics.SELF_REWARD_BUCKETS
        low = max((b for b in bounds if b < min(rewards)), default=-math.inf)
        high = min((b for b in bounds if b >= max(rewards)), default=math.inf)
        assert low <= row["self_reward"] <= high
    assert data["decoders"]["standard"]["acceptance_rate"] is None
    rates = [i["decoder_stats"]["acceptance_rate"] for i in infos["power_mcmc"]]
    assert data["decoders"]["power_mcmc"]["acceptance_rate"] == pytest.approx(sum(rates) / len(rates))


def test_page_is_self_contained(engine: TorchEngine) -> None:
    with make_client(engine) as client:
        r = client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    # No external scripts, styles, fonts or images: the only URL is the SVG namespace name.
    assert re.findall(r"https?://[^\s\"'<>]+", html) == ["http://www.w3.org/2000/svg"]
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html)
    assert "@import" not in html and "url(" not in html


def test_dashboard_is_listed_in_the_openapi_schema_as_an_ops_route(engine: TorchEngine) -> None:
    with make_client(engine) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert "/dashboard/data" in paths
    assert "/dashboard" not in paths  # the HTML page is not an API
