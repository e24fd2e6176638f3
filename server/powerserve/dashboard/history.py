"""The dashboard's data: totals since start and a short history of sliding-window statistics.

The server keeps no timer for this: a snapshot of the registry is taken when the page asks for
data, kept if at least ``interval_s`` passed since the last kept one, and dropped after
``keep_s``. Each chart point at time t summarises the window (t - window_s, t], computed from
the difference of two snapshots, so a point stays meaningful however irregular the polling.

Quantiles (latency, time to first token, self-reward) and the streamed fraction come from the
exact recent observations of :class:`powerserve.metrics.Recent` when the history has one (the
server's does): the totals use the last ``recent.keep`` observations per decoder ("exact, last
N"), a chart point the observations of its window while none of them has been pushed out.
Otherwise they are estimated from the histogram buckets, as PromQL's ``histogram_quantile``
does (``"quantiles": "buckets"`` in the data).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from powerserve.dashboard.snapshot import Reading, Snapshot, read
from powerserve.metrics import EXACT, Recent

# The statistics the page charts over time, per decoder (keys of ``summarise``).
SERIES = (
    "latency_p50",
    "latency_p95",
    "ttft_p50",
    "streamed_fraction",
    "tokens_per_s",
    "requests_per_s",
    "cost_multiplier",
)


def exact_quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of ``values`` with linear interpolation between order statistics
    (numpy's default): position q * (n - 1) in the sorted values."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarise(r: Reading, seconds: float, exact: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """Per-decoder statistics of ``r`` (cumulative or a window) over ``seconds``.

    cost_multiplier = (engine tokens generated + scored) / output tokens, the same ratio the
    response's ``powerserve.cost_multiplier`` reports for one request; self_reward is the median
    of the per-choice mean log p per token (estimated from the buckets: prometheus_client does
    not export a ``_sum`` for a histogram with negative buckets, so there is no mean);
    acceptance_rate is the mean per-choice MCMC acceptance rate; streamed_fraction the mean share
    of a choice's tokens sent before its decoder's work ended. Values with nothing to average
    are ``None``. ``exact`` (key of ``metrics.EXACT`` -> observations) replaces the bucket
    estimates of latency, TTFT and self-reward quantiles and of the streamed fraction wherever
    it holds values.
    """
    latency = r.hists.get("latency")
    ttft = r.hists.get("ttft")
    output = r.scalars.get("output_tokens", 0.0)
    engine = r.scalars.get("engine_tokens_generated", 0.0) + r.scalars.get("engine_tokens_scored", 0.0)
    completed = latency.count if latency else 0.0
    proposed = r.scalars.get("tokens_proposed", 0.0)
    reward = r.hists.get("self_reward")
    acceptance = r.hists.get("acceptance_rate")
    streamed = r.hists.get("streamed_fraction")
    out = {
        "requests": {k: round(v) for k, v in sorted(r.requests.items())},
        "running": round(r.scalars.get("running", 0.0)),
        "completed": round(completed),
        "latency_p50": latency.quantile(0.5) if latency else None,
        "latency_p95": latency.quantile(0.95) if latency else None,
        "latency_p99": latency.quantile(0.99) if latency else None,
        "latency_mean": latency.mean() if latency else None,
        "ttft_p50": ttft.quantile(0.5) if ttft else None,
        "ttft_p95": ttft.quantile(0.95) if ttft else None,
        "output_tokens": round(output),
        "engine_tokens": round(engine),
        "tokens_per_s": output / seconds if seconds > 0 and completed else None,
        "requests_per_s": completed / seconds if seconds > 0 and completed else None,
        "cost_multiplier": engine / output if output > 0 else None,
        "self_reward": reward.quantile(0.5) if reward else None,
        "acceptance_rate": acceptance.mean() if acceptance else None,
        "token_acceptance": r.scalars.get("tokens_accepted", 0.0) / proposed if proposed > 0 else None,
        "streamed_fraction": streamed.mean() if streamed else None,
    }
    exact = exact or {}
    for key, quantiles in _EXACT_FIELDS.items():
        values = exact.get(key)
        if values:
            out.update({name: exact_quantile(values, q) for name, q in quantiles})
    if exact.get("streamed_fraction"):
        out["streamed_fraction"] = math.fsum(exact["streamed_fraction"]) / len(exact["streamed_fraction"])
    return out


# Which fields of ``summarise`` each exact series gives, with their quantile.
_EXACT_FIELDS = {
    "latency": (("latency_p50", 0.5), ("latency_p95", 0.95), ("latency_p99", 0.99)),
    "ttft": (("ttft_p50", 0.5), ("ttft_p95", 0.95)),
    "self_reward": (("self_reward", 0.5),),
}


@dataclass
class History:
    """Snapshots of ``registry`` since ``start``; the first one is the baseline that "since
    start" totals are measured from."""

    registry: CollectorRegistry = REGISTRY
    window_s: float = 60.0
    interval_s: float = 2.0
    keep_s: float = 900.0
    clock: Callable[[], float] = time.time
    recent: Recent | None = None  # exact recent observations (same clock as ``clock``)
    points: deque[Snapshot] = field(default_factory=deque)

    def __post_init__(self) -> None:
        if not (0 < self.interval_s <= self.window_s <= self.keep_s):
            raise ValueError("need 0 < interval_s <= window_s <= keep_s")
        self.points.append(read(self.clock(), self.registry))

    @property
    def baseline(self) -> Snapshot:
        return self.points[0]

    def sample(self) -> Snapshot:
        """Read the registry now; keep the reading if ``interval_s`` passed since the last."""
        now = read(self.clock(), self.registry)
        if now.t - self.points[-1].t >= self.interval_s:
            self.points.append(now)
            # Drop old points, but never the baseline.
            while len(self.points) > 2 and now.t - self.points[1].t > self.keep_s:
                del self.points[1]
        return now

    def data(self) -> dict[str, Any]:
        """The JSON body of ``/dashboard/data``: totals since start, and per-decoder series."""
        now = self.sample()
        uptime = now.t - self.baseline.t
        totals = {
            name: summarise(r, uptime, self._exact(name, self.baseline.t, now.t))
            for name, r in sorted(now.minus(self.baseline).items())
        }
        return {
            "time": now.t,
            "uptime_s": uptime,
            "window_s": self.window_s,
            "interval_s": self.interval_s,
            "quantiles": "exact" if self.recent is not None else "buckets",
            "exact_last": self.recent.keep if self.recent is not None else None,
            "decoders": totals,
            "series": self._series(),
        }

    def _exact(self, decoder: str, since: float, until: float, whole: bool = False) -> dict[str, list[float]]:
        """Kept observations of ``decoder`` in (since, until]; with ``whole``, only series that
        still hold every observation of that span (others are left to the bucket estimate)."""
        if self.recent is None:
            return {}
        recent = self.recent
        return {
            key: recent.values(key, decoder, since, until)
            for key in EXACT
            if not whole or recent.covers(key, decoder, since)
        }

    def _series(self) -> dict[str, Any]:
        points = list(self.points)
        times: list[float] = []
        per_decoder: dict[str, dict[str, list[float | None]]] = {}
        start = 0  # index of the newest point at or before the current window's start
        for i in range(1, len(points)):
            point = points[i]
            while start + 1 < i and points[start + 1].t <= point.t - self.window_s:
                start += 1
            older = points[start]
            window = point.minus(older)
            for name, reading in window.items():
                stats = summarise(reading, point.t - older.t, self._exact(name, older.t, point.t, whole=True))
                columns = per_decoder.setdefault(name, {s: [None] * len(times) for s in SERIES})
                for s in SERIES:
                    columns[s].append(stats[s])
            times.append(point.t)
            for columns in per_decoder.values():  # decoders absent at this point get a gap
                for s in SERIES:
                    if len(columns[s]) < len(times):
                        columns[s].append(None)
        return {"t": times, "decoders": dict(sorted(per_decoder.items()))}
