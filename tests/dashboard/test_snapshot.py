"""Reading the Prometheus registry: quantile estimates and per-decoder sums."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from powerserve import metrics
from powerserve.dashboard.snapshot import Hist, family_name, read

INF = math.inf


def test_quantile_interpolates_inside_the_bucket_like_promql() -> None:
    # 10 observations in (1, 2]: the median sits half-way through that bucket.
    h = Hist((1.0, 2.0, 4.0, INF), [0, 10, 10, 10], sum=15.0)
    assert h.quantile(0.5) == pytest.approx(1.5)
    assert h.quantile(0.95) == pytest.approx(1.95)
    assert h.mean() == pytest.approx(1.5)


def test_quantile_first_bucket_starts_at_zero_and_inf_bucket_returns_largest_bound() -> None:
    assert Hist((1.0, INF), [4, 4]).quantile(0.5) == pytest.approx(0.5)
    assert Hist((1.0, 2.0, INF), [0, 0, 3]).quantile(0.5) == 2.0


def test_empty_histogram_has_no_quantile_or_mean() -> None:
    h = Hist((1.0, INF), [0, 0])
    assert h.quantile(0.5) is None
    assert h.mean() is None


def test_difference_of_histograms_is_what_happened_in_between() -> None:
    old = Hist((1.0, 2.0, INF), [1, 1, 1], sum=0.5)
    new = Hist((1.0, 2.0, INF), [1, 4, 5], sum=9.0)
    d = new.minus(old)
    assert d.counts == [0, 3, 4]
    assert d.sum == pytest.approx(8.5)
    assert d.quantile(0.5) == pytest.approx(1 + 2 / 3)


def test_read_sums_models_per_decoder_and_skips_created_samples() -> None:
    reg = CollectorRegistry()
    labels = ("decoder", "model")
    requests = Counter(family_name(metrics.REQUESTS), "r", (*labels, "outcome"), registry=reg)
    tokens = Counter(family_name(metrics.OUTPUT_TOKENS), "t", labels, registry=reg)
    running = Gauge(family_name(metrics.REQUESTS_RUNNING), "g", labels, registry=reg)
    latency = Histogram(family_name(metrics.LATENCY), "l", labels, buckets=(1, 2), registry=reg)
    requests.labels("standard", "a", "success").inc(2)
    requests.labels("standard", "b", "success").inc(1)
    requests.labels("standard", "a", "error").inc()
    tokens.labels("standard", "a").inc(10)
    tokens.labels("standard", "b").inc(5)
    running.labels("power_mcmc", "a").set(3)
    latency.labels("standard", "a").observe(1.5)
    latency.labels("standard", "b").observe(0.5)

    snap = read(123.0, reg)
    assert snap.t == 123.0
    std = snap.decoders["standard"]
    assert std.requests == {"success": 3, "error": 1}
    assert std.scalars["output_tokens"] == 15
    assert std.hists["latency"].bounds == (1.0, 2.0, INF)
    assert std.hists["latency"].counts == [1, 2, 2]
    assert std.hists["latency"].sum == pytest.approx(2.0)
    assert snap.decoders["power_mcmc"].scalars["running"] == 3
