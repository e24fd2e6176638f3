"""Totals since start and sliding-window series, on a fake clock and a private registry."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from powerserve import metrics
from powerserve.dashboard.history import SERIES, History, summarise
from powerserve.dashboard.snapshot import Hist, Reading, family_name


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Server:
    """The subset of powerserve's series a request touches, in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("decoder", "model")
        reg = self.registry
        self.requests = Counter(family_name(metrics.REQUESTS), "", (*labels, "outcome"), registry=reg)
        self.running = Gauge(family_name(metrics.REQUESTS_RUNNING), "", labels, registry=reg)
        self.output = Counter(family_name(metrics.OUTPUT_TOKENS), "", labels, registry=reg)
        self.generated = Counter(family_name(metrics.ENGINE_TOKENS_GENERATED), "", labels, registry=reg)
        self.scored = Counter(family_name(metrics.ENGINE_TOKENS_SCORED), "", labels, registry=reg)
        self.latency = Histogram(family_name(metrics.LATENCY), "", labels, buckets=(1, 2, 4), registry=reg)

    def serve(self, decoder: str, latency: float, output: int, generated: int, scored: int = 0) -> None:
        self.requests.labels(decoder, "m", "success").inc()
        self.output.labels(decoder, "m").inc(output)
        self.generated.labels(decoder, "m").inc(generated)
        self.scored.labels(decoder, "m").inc(scored)
        self.latency.labels(decoder, "m").observe(latency)


def test_history_checks_its_intervals() -> None:
    with pytest.raises(ValueError):
        History(CollectorRegistry(), window_s=1, interval_s=2)


def test_totals_count_from_the_baseline_not_from_process_start() -> None:
    server, clock = Server(), Clock()
    server.serve("standard", 0.5, output=10, generated=10)  # before the dashboard existed
    history = History(server.registry, clock=clock)
    clock.t += 10
    server.serve("standard", 1.5, output=8, generated=8)
    server.serve("power_mcmc", 3.0, output=4, generated=12, scored=4)
    data = history.data()
    std, mcmc = data["decoders"]["standard"], data["decoders"]["power_mcmc"]
    assert data["uptime_s"] == pytest.approx(10)
    assert std["requests"] == {"success": 1}
    assert std["output_tokens"] == 8
    assert std["tokens_per_s"] == pytest.approx(0.8)
    assert std["cost_multiplier"] == pytest.approx(1.0)
    assert mcmc["cost_multiplier"] == pytest.approx(16 / 4)
    assert mcmc["latency_p50"] == pytest.approx(3.0)  # 1 observation in (2, 4]: rank 0.5 -> 3


def test_series_points_summarise_a_sliding_window() -> None:
    server, clock = Server(), Clock()
    history = History(server.registry, window_s=30, interval_s=10, clock=clock)
    # t = +10, +20, +30, +40, +50: one standard request in each of the first two intervals.
    for step in range(5):
        if step < 2:
            server.serve("standard", 1.5, output=10, generated=20)
        clock.t += 10
        history.sample()
    series = history.data()["series"]
    assert len(series["t"]) == 5
    std = series["decoders"]["standard"]
    assert set(std) == set(SERIES)
    # Windows: (0,10] 1 req, (0,20] 2, (0,30] 2, (10,40] 1, (20,50] none.
    assert std["requests_per_s"] == pytest.approx([0.1, 0.1, 2 / 30, 1 / 30, None])
    assert std["cost_multiplier"][:4] == pytest.approx([2.0] * 4)
    assert std["cost_multiplier"][4] is None


def test_samples_closer_than_the_interval_are_not_kept_and_old_ones_expire() -> None:
    server, clock = Server(), Clock()
    history = History(server.registry, window_s=10, interval_s=5, keep_s=20, clock=clock)
    clock.t += 1
    history.sample()
    assert len(history.points) == 1
    for _ in range(10):
        clock.t += 5
        history.sample()
    assert history.points[0].t == 1000.0  # the baseline stays
    assert all(clock.t - p.t <= 20 for p in list(history.points)[1:])


def test_a_decoder_first_seen_later_gets_gaps_before() -> None:
    server, clock = Server(), Clock()
    history = History(server.registry, window_s=10, interval_s=10, clock=clock)
    server.serve("standard", 0.5, output=1, generated=1)
    clock.t += 10
    history.sample()
    server.serve("temperature", 0.5, output=1, generated=1)
    clock.t += 10
    series = history.data()["series"]
    assert series["decoders"]["temperature"]["latency_p50"] == [None, pytest.approx(0.5)]


def test_summarise_without_requests_gives_nones_not_errors() -> None:
    stats = summarise(Reading(hists={"latency": Hist((1.0, float("inf")), [0, 0])}), 10)
    assert stats["latency_p95"] is None
    assert stats["cost_multiplier"] is None
    assert stats["tokens_per_s"] is None
