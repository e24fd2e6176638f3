"""A bounded load generator for a local powerserve: a mix of decoders at a set concurrency for
a set time, then latency and cost per decoder.

    python -m powerserve_client.loadgen --base-url http://127.0.0.1:8000/v1 \\
        --decoder standard --decoder temperature:alpha=4 --decoder power_mcmc:alpha=4,block_size=32 \\
        --concurrency 4 --duration 30 --max-requests 200

Requests cycle through the ``--decoder`` list (repeat one to weight it). The run is bounded
twice: no request starts after ``--duration`` seconds or once ``--max-requests`` have started,
and each request is cut off after ``--request-timeout``. Only loopback servers are accepted
(127.0.0.0/8, ::1, localhost): this is a test tool, not a way to load someone else's host.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import itertools
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from openai import AsyncOpenAI

from powerserve_client.cost import read_cost
from powerserve_client.decoders import decoder_label, parse_decoder

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 256
DEFAULT_PROMPT = "Write a short story about a lighthouse keeper."


def check_loopback(base_url: str) -> None:
    """Refuse any server that is not on this machine's loopback interface."""
    host = urlparse(base_url).hostname
    if host is None:
        raise ValueError(f"{base_url!r}: no host")
    if host.lower() == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False  # a DNS name: not resolved, so not trusted
    if not loopback:
        raise ValueError(f"refusing {host!r}: the load generator only targets loopback servers (127.0.0.1, ::1)")


@dataclass(frozen=True, slots=True)
class LoadSpec:
    base_url: str
    decoders: tuple[str, ...]  # "name:key=value,..." specs
    model: str | None = None  # None: the server's first model
    concurrency: int = 4
    duration_s: float = 30.0
    max_requests: int = 200
    max_tokens: int = 64
    prompt: str = DEFAULT_PROMPT
    chat: bool = False
    api_key: str | None = None
    request_timeout_s: float = 300.0
    seed: int | None = 0  # request i uses seed + i, so a run is reproducible

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        if not self.decoders:
            raise ValueError("give at least one decoder")
        for spec in self.decoders:
            parse_decoder(spec)
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}")
        if not 0 < self.duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must be in 1..{MAX_REQUESTS}")
        if self.max_tokens < 1 or self.request_timeout_s <= 0:
            raise ValueError("max_tokens and request_timeout must be positive")


@dataclass(slots=True)
class DecoderStats:
    """What one decoder's requests measured."""

    latencies_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    engine_tokens: int = 0
    self_rewards: list[float] = field(default_factory=list)
    acceptance_rates: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        lat = sorted(self.latencies_s)
        return {
            "requests": len(lat),
            "errors": self.errors,
            "latency_p50_s": _percentile(lat, 0.50),
            "latency_p95_s": _percentile(lat, 0.95),
            "latency_p99_s": _percentile(lat, 0.99),
            "latency_mean_s": statistics.fmean(lat) if lat else None,
            "output_tokens": self.completion_tokens,
            "output_tokens_per_s": self.completion_tokens / elapsed_s if elapsed_s > 0 else None,
            "cost_multiplier": self.engine_tokens / self.completion_tokens if self.completion_tokens else None,
            "self_reward": statistics.fmean(self.self_rewards) if self.self_rewards else None,
            "acceptance_rate": statistics.fmean(self.acceptance_rates) if self.acceptance_rates else None,
            "first_error": self.first_error,
        }


@dataclass(slots=True)
class Report:
    model: str
    elapsed_s: float
    per_decoder: dict[str, DecoderStats]

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "elapsed_s": self.elapsed_s,
            "decoders": {k: v.summary(self.elapsed_s) for k, v in self.per_decoder.items()},
        }

    def table(self) -> str:
        head = ("decoder", "ok", "err", "p50 s", "p95 s", "p99 s", "tok/s", "cost x", "reward", "accept")
        rows = [head]
        for name, s in self.as_dict()["decoders"].items():
            rows.append(
                (
                    name,
                    str(s["requests"]),
                    str(s["errors"]),
                    *(_fmt(s[k]) for k in ("latency_p50_s", "latency_p95_s", "latency_p99_s")),
                    _fmt(s["output_tokens_per_s"]),
                    _fmt(s["cost_multiplier"]),
                    _fmt(s["self_reward"]),
                    _fmt(s["acceptance_rate"]),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"model {self.model}, {self.elapsed_s:.1f} s"]
        for row in rows:
            cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
            lines.append("  ".join(cells))
        errors = [(n, s.first_error) for n, s in self.per_decoder.items() if s.first_error]
        lines += [f"first error for {n}: {e}" for n, e in errors]
        return "\n".join(lines)


async def run(spec: LoadSpec, client: AsyncOpenAI | None = None) -> Report:
    """Drive the server as ``spec`` says and collect per-decoder statistics."""
    check_loopback(str(client.base_url) if client is not None else spec.base_url)
    own = client is None
    if client is None:
        client = AsyncOpenAI(
            base_url=spec.base_url, api_key=spec.api_key or "none", max_retries=0, timeout=spec.request_timeout_s
        )
    try:
        model = spec.model or (await client.models.list()).data[0].id
        bodies = [parse_decoder(d) for d in spec.decoders]
        labels = [decoder_label(b) for b in bodies]
        stats = {label: DecoderStats() for label in labels}
        started = time.perf_counter()
        deadline = started + spec.duration_s
        counter = itertools.count()

        async def worker() -> None:
            while True:
                i = next(counter)
                if i >= spec.max_requests or time.perf_counter() >= deadline:
                    return
                k = i % len(bodies)
                await _one(client, spec, model, bodies[k], i, stats[labels[k]])

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        return Report(model, time.perf_counter() - started, stats)
    finally:
        if own:
            await client.close()


async def _one(
    client: AsyncOpenAI, spec: LoadSpec, model: str, body: dict[str, Any], i: int, stats: DecoderStats
) -> None:
    seed = None if spec.seed is None else spec.seed + i
    t0 = time.perf_counter()
    try:
        response: Any
        if spec.chat:
            response = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": spec.prompt}],
                max_tokens=spec.max_tokens,
                seed=seed,
                extra_body=body,
                timeout=spec.request_timeout_s,
            )
        else:
            response = await client.completions.create(
                model=model,
                prompt=spec.prompt,
                max_tokens=spec.max_tokens,
                seed=seed,
                extra_body=body,
                timeout=spec.request_timeout_s,
            )
    except Exception as exc:  # counted and reported, the run goes on
        stats.errors += 1
        stats.first_error = stats.first_error or f"{type(exc).__name__}: {exc}"
        return
    stats.latencies_s.append(time.perf_counter() - t0)
    cost = read_cost(response)
    completion = response.usage.completion_tokens if response.usage else 0
    stats.completion_tokens += completion
    if cost is not None:
        stats.engine_tokens += cost.engine_tokens
        if cost.self_reward.mean_logprob is not None:
            stats.self_rewards.append(cost.self_reward.mean_logprob)
        if cost.acceptance_rate is not None:
            stats.acceptance_rates.append(cost.acceptance_rate)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def parse_args(argv: list[str] | None = None) -> tuple[LoadSpec, bool]:
    """The run's spec and whether to print JSON."""
    p = argparse.ArgumentParser(prog="python -m powerserve_client.loadgen", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="a loopback server's /v1 URL")
    p.add_argument("--decoder", action="append", dest="decoders", help="name[:key=value,...]; repeat for a mix")
    p.add_argument("--model", help="default: the server's first model")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--duration", type=float, default=30.0, help=f"seconds, at most {MAX_DURATION_S:g}")
    p.add_argument("--max-requests", type=int, default=200, help=f"at most {MAX_REQUESTS}")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    p.add_argument("--api-key", help="if the server was started with --api-key")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    ns = p.parse_args(argv)
    try:
        spec = LoadSpec(
            base_url=ns.base_url,
            decoders=tuple(ns.decoders or ["standard"]),
            model=ns.model,
            concurrency=ns.concurrency,
            duration_s=ns.duration,
            max_requests=ns.max_requests,
            max_tokens=ns.max_tokens,
            prompt=ns.prompt,
            chat=ns.chat,
            api_key=ns.api_key,
            request_timeout_s=ns.request_timeout,
            seed=ns.seed,
        )
    except ValueError as exc:
        p.error(str(exc))
    return spec, bool(ns.json)


def main(argv: list[str] | None = None) -> int:
    """Run, print the report; exit status 1 when no request succeeded."""
    spec, as_json = parse_args(argv)
    report = asyncio.run(run(spec))
    print(json.dumps(report.as_dict(), indent=2) if as_json else report.table())
    return 1 if all(not s.latencies_s for s in report.per_decoder.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
