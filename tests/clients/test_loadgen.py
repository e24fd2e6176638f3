"""The load generator: its bounds and loopback rule (checked before any traffic), and a short
run against a live server on 127.0.0.1 with two decoders."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest

from powerserve.engine.torch_engine import TorchEngine
from powerserve.testing import LiveServer
from powerserve_client.loadgen import LoadSpec, Report, check_loopback, main, run

MCMC = "power_mcmc:alpha=2,block_size=4,mcmc_steps=2"


@pytest.fixture(scope="module")
def server(engine: TorchEngine) -> Iterator[LiveServer]:
    with LiveServer(engine) as live:
        yield live


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://127.3.2.1/v1", "http://localhost:1/v1", "http://[::1]:8000/v1"]
)
def test_loopback_servers_are_accepted(url: str) -> None:
    check_loopback(url)


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.5:8000/v1", "http://192.168.1.2/v1", "https://api.example.com/v1", "http://0.0.0.0/v1", "/v1"],
)
def test_other_hosts_are_refused_before_any_request(url: str) -> None:
    with pytest.raises(ValueError):
        LoadSpec(base_url=url, decoders=("standard",))


@pytest.mark.parametrize(
    "bad",
    [
        {"concurrency": 0},
        {"concurrency": 10_000},
        {"duration_s": 0},
        {"duration_s": 1e9},
        {"max_requests": 0},
        {"max_requests": 10**9},
        {"decoders": ()},
        {"decoders": ("power_mcmc:alpha",)},
    ],
)
def test_runs_are_bounded(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"base_url": "http://127.0.0.1:1/v1", "decoders": ("standard",), **bad}
    with pytest.raises(ValueError):
        LoadSpec(**args)  # type: ignore[arg-type]


def test_cli_refuses_a_remote_host(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--base-url", "http://203.0.113.7:8000/v1", "--duration", "1"])
    assert exit_info.value.code == 2
    assert "loopback" in capsys.readouterr().err


def test_a_mix_of_decoders_reports_latency_and_cost_per_decoder(server: LiveServer) -> None:
    spec = LoadSpec(
        base_url=f"{server.base}/v1", decoders=("standard", MCMC), concurrency=2, max_requests=6, max_tokens=8
    )
    report: Report = asyncio.run(run(spec))
    data = report.as_dict()
    standard, mcmc = data["decoders"]["standard"], data["decoders"]["power_mcmc(alpha=2,block_size=4,mcmc_steps=2)"]
    for s in (standard, mcmc):
        assert s["requests"] == 3 and s["errors"] == 0
        assert 0 < s["latency_p50_s"] <= s["latency_p95_s"] <= s["latency_p99_s"]
        assert s["output_tokens"] > 0 and s["output_tokens_per_s"] > 0
    assert standard["cost_multiplier"] == pytest.approx(1.0)
    assert mcmc["cost_multiplier"] > 1.0
    assert standard["acceptance_rate"] is None and 0 <= mcmc["acceptance_rate"] <= 1
    table = report.table()
    assert "standard" in table and "power_mcmc" in table and "cost x" in table


def test_the_duration_bounds_a_run_with_many_requests_allowed(server: LiveServer) -> None:
    spec = LoadSpec(
        base_url=f"{server.base}/v1",
        decoders=("standard",),
        concurrency=1,
        duration_s=0.5,
        max_requests=100_000,
        max_tokens=8,
    )
    t0 = time.perf_counter()
    report = asyncio.run(run(spec))
    assert time.perf_counter() - t0 < 5
    stats = report.as_dict()["decoders"]["standard"]
    assert stats["errors"] == 0, stats["first_error"]
    assert 0 < stats["requests"] < 100_000


def test_cli_prints_json(server: LiveServer, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--base-url", f"{server.base}/v1", "--decoder", "temperature:alpha=2", "--chat"]
    assert main([*argv, "--max-requests", "2", "--concurrency", "1", "--max-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["decoders"]["temperature(alpha=2)"]["requests"] == 2
