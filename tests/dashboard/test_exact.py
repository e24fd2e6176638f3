"""Numbers that tell decoders apart: the finer Prometheus buckets and the dashboard's exact
recent quantiles, on a private registry and a fake clock.

Two decoders whose per-token self-reward differs by 0.05 (-0.40 and -0.35, 50 observations each,
spread evenly over +-0.02 around the centre) must show medians that differ by more than 0.03
on both the PromQL-style bucket estimate and the dashboard, each within 0.02 of the true median.
With the old 0.25-wide buckets both estimates were the same number (checked below, so the test
shows what it guards against). Latencies of 7.9 s and 5.1 s (the issue's example) likewise.
"""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from powerserve import metrics
from powerserve.dashboard.history import History, exact_quantile
from powerserve.dashboard.snapshot import family_name, read

OLD_SELF_REWARD_BUCKETS = (-8, -6, -4, -3, -2, -1.5, -1, -0.75, -0.5, -0.25, -0.1, -0.05, 0)
OLD_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
CENTRES = {"power_smc": -0.40, "power_lookahead": -0.35}
LATENCY = {"power_mcmc": 7.9, "power_lookahead": 5.1}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def served(
    reward_buckets: tuple[float, ...], latency_buckets: tuple[float, ...], recent: metrics.Recent | None
) -> CollectorRegistry:
    """A private registry with the self-reward and latency observations of the docstring."""
    reg = CollectorRegistry()
    labels = ("decoder", "model")
    requests = Counter(family_name(metrics.REQUESTS), "", (*labels, "outcome"), registry=reg)
    reward = Histogram(family_name(metrics.SELF_REWARD), "", labels, buckets=reward_buckets, registry=reg)
    latency = Histogram(family_name(metrics.LATENCY), "", labels, buckets=latency_buckets, registry=reg)
    for decoder, centre in CENTRES.items():
        for v in centre + np.linspace(-0.02, 0.02, 50):
            requests.labels(decoder, "m", "success").inc()
            reward.labels(decoder, "m").observe(float(v))
            if recent is not None:
                recent.add("self_reward", decoder, float(v))
    for decoder, seconds in LATENCY.items():
        latency.labels(decoder, "m").observe(seconds)
        if recent is not None:
            recent.add("latency", decoder, seconds)
    return reg


def bucket_medians(reg: CollectorRegistry, key: str, names: dict[str, float]) -> dict[str, float | None]:
    snapshot = read(0.0, reg)
    return {name: snapshot.decoders[name].hists[key].quantile(0.5) for name in names}


def test_prometheus_buckets_tell_self_rewards_0_05_apart() -> None:
    medians = bucket_medians(served(metrics.SELF_REWARD_BUCKETS, metrics.LATENCY_BUCKETS, None), "self_reward", CENTRES)
    a, b = medians["power_smc"], medians["power_lookahead"]
    assert a is not None and b is not None
    assert b - a > 0.03, medians
    assert a == pytest.approx(-0.40, abs=0.02) and b == pytest.approx(-0.35, abs=0.02)
    old = bucket_medians(served(OLD_SELF_REWARD_BUCKETS, OLD_LATENCY_BUCKETS, None), "self_reward", CENTRES)
    assert old["power_smc"] == old["power_lookahead"]  # what the 0.25-wide buckets showed


def test_prometheus_buckets_tell_the_issue_latencies_apart() -> None:
    medians = bucket_medians(served(metrics.SELF_REWARD_BUCKETS, metrics.LATENCY_BUCKETS, None), "latency", LATENCY)
    for name, seconds in LATENCY.items():
        assert medians[name] == pytest.approx(seconds, rel=0.1), medians
    old = bucket_medians(served(OLD_SELF_REWARD_BUCKETS, OLD_LATENCY_BUCKETS, None), "latency", LATENCY)
    assert old["power_mcmc"] == old["power_lookahead"] == 7.5  # the issue's 7.50 s for both


def test_dashboard_quantiles_are_exact_over_the_last_observations() -> None:
    clock = Clock()
    recent = metrics.Recent(keep=100, clock=clock)
    registry = CollectorRegistry()
    history = History(registry, clock=clock, recent=recent)
    clock.t += 5
    # Coarse buckets on purpose: the dashboard must not depend on them.
    reg = served(OLD_SELF_REWARD_BUCKETS, OLD_LATENCY_BUCKETS, recent)
    history.registry = reg
    data = history.data()
    assert data["quantiles"] == "exact" and data["exact_last"] == 100
    rows = data["decoders"]
    assert rows["power_smc"]["self_reward"] == pytest.approx(-0.40, abs=1e-9)
    assert rows["power_lookahead"]["self_reward"] == pytest.approx(-0.35, abs=1e-9)
    assert rows["power_mcmc"]["latency_p50"] == pytest.approx(7.9)
    assert rows["power_lookahead"]["latency_p50"] == pytest.approx(5.1)


def test_recent_keeps_the_last_n_and_says_when_a_window_is_incomplete() -> None:
    clock = Clock()
    recent = metrics.Recent(keep=3, clock=clock)
    for v in range(5):
        clock.t += 1
        recent.add("latency", "d", float(v))
    assert recent.values("latency", "d") == [2.0, 3.0, 4.0]
    assert recent.values("latency", "d", since=1003.0) == [3.0, 4.0]
    assert recent.covers("latency", "d", since=1003.0)  # 1004 and 1005 are both kept
    assert not recent.covers("latency", "d", since=1001.0)  # 1002 was pushed out
    assert recent.covers("latency", "other", since=0.0)


def test_exact_quantile_interpolates_like_numpy() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=37).tolist()
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        assert exact_quantile(values, q) == pytest.approx(float(np.quantile(values, q)))
    assert exact_quantile([], 0.5) is None
