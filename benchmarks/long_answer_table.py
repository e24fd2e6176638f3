"""The long-answer benchmark's records and its table (``bench_power_mcmc.py``): pure, untimed.

A row is a list of :class:`Measured` requests. Per row (n requests, returned lengths l_i,
latencies w_i; in flight, the batches' wall times W_b):

    wall s / request  = mean_i w_i
    tokens/s          = sum_i l_i / sum_i w_i             (one request at a time)
                      = sum_i l_i / sum_b W_b             (in flight: batches, each counted once)
    engine tokens     = mean_i (generated_i + other_i)     (other: scored, or prefilled again)
    self-reward       = mean_i (mean log p per token of request i)
    x baseline        = tokens/s / baseline's tokens/s
    N vs 1            = tokens/s of ``label @N`` / tokens/s of ``label @1`` (the same requests
                        one at a time) when the row exists, else of ``label``

:func:`in_flight_bound`: what the model's own cost of decoding rows side by side allows N
requests in flight to gain over the same requests one at a time.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Measured:
    """One request: its prompt and output, wall time and work (``other``: tokens scored by the
    engine, or prefilled again by an outside chain). ``batch_wall`` is set when it ran in flight
    with others (the wall time of its whole batch)."""

    prompt: list[int]
    output: list[int]
    wall: float
    generated: int
    other: int
    acceptance: float = float("nan")
    batch_wall: float | None = None
    self_reward: float | None = None

    def record(self) -> dict[str, Any]:
        """JSON-ready, without the token lists' contents (their lengths only)."""
        return {
            "prompt_tokens": len(self.prompt),
            "output_tokens": len(self.output),
            "wall_s": self.wall,
            "batch_wall_s": self.batch_wall,
            "generated": self.generated,
            "other": self.other,
            "acceptance": None if math.isnan(self.acceptance) else self.acceptance,
            "self_reward": self.self_reward,
        }


def seconds(runs: Sequence[Measured]) -> float:
    """Wall seconds the row took: sum of latencies, or of its batches (same ``batch_wall``,
    consecutive) each counted once when it ran in flight."""
    if runs and runs[0].batch_wall is not None:
        walls: list[float] = []
        for r in runs:
            if not walls or r.batch_wall != walls[-1]:
                walls.append(r.batch_wall or 0.0)
        return sum(walls)
    return sum(r.wall for r in runs)


def tokens_per_second(runs: Sequence[Measured]) -> float:
    """Returned tokens over :func:`seconds`."""
    total = seconds(runs)
    return sum(len(r.output) for r in runs) / total if total > 0 else float("nan")


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.fmean(kept) if kept else float("nan")


def _fmt(value: float, spec: str, unit: str = "") -> str:
    return "-" if math.isnan(value) else format(value, spec) + unit


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else float("nan")


def markdown_table(results: Mapping[str, Sequence[Measured]], baseline: str, n_flight: int) -> list[str]:
    """One line per row of ``results`` (formulas in the module docstring); rows named
    ``label @N`` ran N in flight and get the N-vs-1 ratio against ``label``."""
    base = tokens_per_second(results[baseline]) if results.get(baseline) else float("nan")
    lines = [
        "| row | in flight | wall s / request | tokens/s | s / generated token | engine tokens / request "
        "(generated + scored or prefilled) | self-reward (log p / token) | acceptance | x baseline | "
        f"{n_flight} vs 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, runs in results.items():
        if not runs:
            continue
        name, _, flight = label.partition(" @")
        tps = tokens_per_second(runs)
        generated = sum(r.generated for r in runs)
        per_gen = _ratio(seconds(runs), generated)
        rewards = [r.self_reward for r in runs if r.self_reward is not None]
        alone = results.get(f"{name} @1") or results.get(name)
        gain = _fmt(_ratio(tps, tokens_per_second(alone)), ".2f", "x") if flight not in ("", "1") and alone else ""
        where = f"1 (the {n_flight} in flight's requests)" if flight == "1" else flight or "1"
        lines.append(
            f"| {name} | {where} | {_mean([r.wall for r in runs]):.2f} | {_fmt(tps, '.2f')} | "
            f"{_fmt(per_gen * 1e3, '.1f', ' ms')} | "
            f"{_mean([r.generated for r in runs]):.0f} + {_mean([r.other for r in runs]):.0f} | "
            f"{_fmt(_mean(rewards), '.3f')} | {_fmt(_mean([r.acceptance for r in runs]), '.2f')} | "
            f"{_fmt(_ratio(tps, base), '.2f', 'x')} | {gain} |"
        )
    return lines


def in_flight_bound(work: Sequence[float], rows_per_request: int, step_cost: Mapping[int, float]) -> float:
    """What ``len(work)`` requests in flight can gain, by the model's own cost, over the same
    requests one at a time: a bound for K = 1, an estimate for K > 1 (below).

    Request i needs ``work[i]`` engine tokens and keeps ``rows_per_request`` (K) rows busy, so
    it needs w_i / K decode steps. Alone, it costs (w_i / K) c(K); in flight, step s carries
    r_s = K #{i : w_i / K > s} rows and costs c(r_s), however the engine schedules them: the
    longest request's steps are sequential. ``step_cost`` maps row counts (1 among them, and
    the largest r_s) to measured costs of a step; c is interpolated linearly between them,
    which under-states a cost concave in r (the in-flight side, so the bound errs high). With
    K > 1, (w_i / K) c(K) under-states a request alone whose K rows do not all run on every
    step (candidates that end early run fewer, dearer rows), so a measurement can beat it.

        bound = sum_i (w_i / K) c(K) / sum_s c(r_s)
    """
    k = rows_per_request
    points = sorted(step_cost.items())

    def c(r: int) -> float:
        for (r0, c0), (r1, c1) in itertools.pairwise(points):
            if r0 <= r <= r1:
                return c0 + (c1 - c0) * (r - r0) / (r1 - r0)
        if r == points[0][0]:
            return points[0][1]
        raise ValueError(f"no measured cost around {r} rows")

    steps = [w / k for w in work]
    together = sum(c(k * sum(1 for n in steps if n > s)) for s in range(math.ceil(max(steps))))
    return sum(steps) * c(k) / together
