"""Point-in-time readings of powerserve's Prometheus series, per decoder.

The dashboard reads the same registry that ``/metrics`` exports, so the page and
Prometheus/Grafana always agree and there is no second bookkeeping. A reading holds cumulative
values; the difference of two readings describes what happened between them, the way
Prometheus' ``increase()`` does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.samples import Sample

from powerserve import metrics

# Short key -> the series it is read from. Counters and the gauge are plain numbers.
SCALARS: dict[str, MetricWrapperBase] = {
    "running": metrics.REQUESTS_RUNNING,
    "output_tokens": metrics.OUTPUT_TOKENS,
    "prompt_tokens": metrics.PROMPT_TOKENS,
    "engine_tokens_generated": metrics.ENGINE_TOKENS_GENERATED,
    "engine_tokens_scored": metrics.ENGINE_TOKENS_SCORED,
    "engine_calls": metrics.ENGINE_CALLS,
    "tokens_proposed": metrics.TOKENS_PROPOSED,
    "tokens_accepted": metrics.TOKENS_ACCEPTED,
}
HISTOGRAMS: dict[str, MetricWrapperBase] = {
    "latency": metrics.LATENCY,
    "ttft": metrics.TTFT,
    "self_reward": metrics.SELF_REWARD,
    "cost_multiplier": metrics.COST_MULTIPLIER,
    "acceptance_rate": metrics.ACCEPTANCE_RATE,
    "streamed_fraction": metrics.STREAMED_FRACTION,
}
GAUGES = frozenset({"running"})  # not cumulative: a difference keeps the newer value


def family_name(metric: MetricWrapperBase) -> str:
    """The family name a collector registers (counters without their ``_total``)."""
    (family,) = metric.describe()
    name: str = family.name
    return name


@dataclass(slots=True)
class Hist:
    """A cumulative histogram: ``counts[i]`` observations were <= ``bounds[i]``; the last
    bound is +inf, so ``counts[-1]`` is the number of observations."""

    bounds: tuple[float, ...]
    counts: list[float]
    sum: float = 0.0

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def minus(self, older: Hist | None) -> Hist:
        if older is None or older.bounds != self.bounds:
            return Hist(self.bounds, list(self.counts), self.sum)
        return Hist(self.bounds, [a - b for a, b in zip(self.counts, older.counts, strict=True)], self.sum - older.sum)

    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile the way PromQL's ``histogram_quantile`` does.

        1. rank = q * count; find the first bucket whose cumulative count reaches it.
        2. Inside that bucket interpolate linearly between its lower and upper bound:
           lower + (upper - lower) * (rank - count_below) / count_in_bucket.
        3. A rank in the +inf bucket returns the largest finite bound; the first bucket's lower
           bound is 0 when its upper bound is positive.
        """
        total = self.count
        if total <= 0 or not self.bounds:
            return None
        rank = q * total
        for i, (upper, cumulative) in enumerate(zip(self.bounds, self.counts, strict=True)):
            if cumulative < rank:
                continue
            if math.isinf(upper):
                finite = [b for b in self.bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            below = self.counts[i - 1] if i > 0 else 0.0
            lower = self.bounds[i - 1] if i > 0 else min(0.0, upper)
            in_bucket = cumulative - below
            if in_bucket <= 0:
                return upper
            return lower + (upper - lower) * (rank - below) / in_bucket
        return None


@dataclass(slots=True)
class Reading:
    """Cumulative values of one decoder's series (summed over models)."""

    scalars: dict[str, float] = field(default_factory=dict)
    hists: dict[str, Hist] = field(default_factory=dict)
    requests: dict[str, float] = field(default_factory=dict)  # outcome -> count

    def minus(self, older: Reading | None) -> Reading:
        """What happened since ``older`` (a missing reading counts as all zeros)."""
        if older is None:
            return Reading(dict(self.scalars), dict(self.hists), dict(self.requests))
        scalars = {k: v if k in GAUGES else v - older.scalars.get(k, 0.0) for k, v in self.scalars.items()}
        hists = {k: h.minus(older.hists.get(k)) for k, h in self.hists.items()}
        requests = {k: v - older.requests.get(k, 0.0) for k, v in self.requests.items()}
        return Reading(scalars, hists, requests)


@dataclass(slots=True)
class Snapshot:
    t: float  # unix time of the reading
    decoders: dict[str, Reading]

    def minus(self, older: Snapshot) -> dict[str, Reading]:
        return {name: r.minus(older.decoders.get(name)) for name, r in self.decoders.items()}


def read(t: float, registry: CollectorRegistry = REGISTRY) -> Snapshot:
    """Read every powerserve series of ``registry`` into a snapshot keyed by decoder."""
    scalar_families = {family_name(m): key for key, m in SCALARS.items()}
    hist_families = {family_name(m): key for key, m in HISTOGRAMS.items()}
    requests_family = family_name(metrics.REQUESTS)
    decoders: dict[str, Reading] = {}
    # Histogram buckets arrive as separate samples: gather them per (decoder, key) first.
    buckets: dict[tuple[str, str], dict[float, float]] = {}
    sums: dict[tuple[str, str], float] = {}

    for family in registry.collect():
        name = family.name
        if name not in scalar_families and name not in hist_families and name != requests_family:
            continue
        for sample in _live(family.samples):
            decoder = sample.labels.get("decoder")
            if decoder is None:
                continue
            reading = decoders.setdefault(decoder, Reading())
            if name == requests_family:
                outcome = sample.labels.get("outcome", "unknown")
                reading.requests[outcome] = reading.requests.get(outcome, 0.0) + sample.value
            elif name in scalar_families:
                key = scalar_families[name]
                reading.scalars[key] = reading.scalars.get(key, 0.0) + sample.value
            else:
                key = hist_families[name]
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    per_bound = buckets.setdefault((decoder, key), {})
                    per_bound[le] = per_bound.get(le, 0.0) + sample.value
                elif sample.name.endswith("_sum"):
                    sums[(decoder, key)] = sums.get((decoder, key), 0.0) + sample.value

    for (decoder, key), per_bound in buckets.items():
        bounds = tuple(sorted(per_bound))
        decoders[decoder].hists[key] = Hist(bounds, [per_bound[b] for b in bounds], sums.get((decoder, key), 0.0))
    return Snapshot(t, decoders)


def _live(samples: Iterable[Sample]) -> Iterable[Sample]:
    """Samples without the ``_created`` timestamps prometheus_client adds to counters and
    histograms."""
    return (s for s in samples if not s.name.endswith("_created"))
