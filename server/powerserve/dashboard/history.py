"""The dashboard's data: totals since start and a short history of sliding-window statistics.

The server keeps no timer for this: a snapshot of the registry is taken when the page asks for
data, kept if at least ``interval_s`` passed since the last kept one, and dropped after
``keep_s``. Each chart point at time t summarises the window (t - window_s, t], computed from
the difference of two snapshots, so a point stays meaningful however irregular the polling.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from powerserve.dashboard.snapshot import Reading, Snapshot, read

# The statistics the page charts over time, per decoder (keys of ``summarise``).
SERIES = ("latency_p50", "latency_p95", "ttft_p50", "tokens_per_s", "requests_per_s", "cost_multiplier")


def summarise(r: Reading, seconds: float) -> dict[str, Any]:
    """Per-decoder statistics of ``r`` (cumulative or a window) over ``seconds``.

    cost_multiplier = (engine tokens generated + scored) / output tokens, the same ratio the
    response's ``powerserve.cost_multiplier`` reports for one request; self_reward is the median
    of the per-choice mean log p per token (estimated from the buckets: prometheus_client does
    not export a ``_sum`` for a histogram with negative buckets, so there is no mean);
    acceptance_rate is the mean per-choice MCMC acceptance rate. Values with nothing to average
    are ``None``.
    """
    latency = r.hists.get("latency")
    ttft = r.hists.get("ttft")
    output = r.scalars.get("output_tokens", 0.0)
    engine = r.scalars.get("engine_tokens_generated", 0.0) + r.scalars.get("engine_tokens_scored", 0.0)
    completed = latency.count if latency else 0.0
    proposed = r.scalars.get("tokens_proposed", 0.0)
    reward = r.hists.get("self_reward")
    acceptance = r.hists.get("acceptance_rate")
    return {
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
        totals = {name: summarise(r, uptime) for name, r in sorted(now.minus(self.baseline).items())}
        return {
            "time": now.t,
            "uptime_s": uptime,
            "window_s": self.window_s,
            "interval_s": self.interval_s,
            "decoders": totals,
            "series": self._series(),
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
                stats = summarise(reading, point.t - older.t)
                columns = per_decoder.setdefault(name, {s: [None] * len(times) for s in SERIES})
                for s in SERIES:
                    columns[s].append(stats[s])
            times.append(point.t)
            for columns in per_decoder.values():  # decoders absent at this point get a gap
                for s in SERIES:
                    if len(columns[s]) < len(times):
                        columns[s].append(None)
        return {"t": times, "decoders": dict(sorted(per_decoder.items()))}
