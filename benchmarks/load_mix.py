"""A mixed load on a local powerserve: every decoder, seeded and unseeded, short and long prompts.

Used by the CI load test (tests/reliability/test_vllm_load.py, a fixed number of requests at once)
and by hand for a longer run (issue 12), which starts its own vLLM server:

    VLLM_CPU_KVCACHE_SPACE=2 .venv/bin/python benchmarks/load_mix.py --start --duration 300 \\
        --concurrency 64 --max-model-len 1024

or drives a running one with ``--base-url http://127.0.0.1:8000``. It prints the counts by status
and engine restarts (the server's pid changing, or its process exiting), and p50/p95 latency per
decoder. A request is one of :data:`DECODERS` (cheap parameters: a few tokens, tiny blocks, few
particles) with a prompt of one of :data:`PROMPT_TOKENS` tokens (the longest near
``max_model_len``); even-numbered requests carry a ``seed``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MAX_DURATION_S = 3600.0
MAX_CONCURRENCY = 256

# Cheap parameters, so that a request costs at most tens of engine tokens beyond its prompt.
DECODERS: dict[str, dict[str, Any]] = {
    "standard": {"name": "standard"},
    "temperature": {"name": "temperature", "alpha": 4},
    "power_mcmc": {"name": "power_mcmc", "alpha": 4, "block_size": 4, "mcmc_steps": 1},
    "power_smc": {"name": "power_smc", "alpha": 4, "particles": 3, "resample_interval": 2, "ramp_tokens": 2},
    "power_lookahead": {
        "name": "power_lookahead",
        "alpha": 4,
        "top_k": 2,
        "rollouts": 2,
        "block_size": 2,
        "rollout_tokens": 2,
    },
}
PROMPT_TOKENS = (10, 30, 60, 120, 250)  # the near-max_model_len prompt comes on top: see RequestMix
LONG_EVERY = 12  # one request in LONG_EVERY has a prompt of max_model_len - LONG_MARGIN tokens
LONG_MARGIN = 24
BASE_TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, polished the great "
    "lens and wrote the weather, the ships and the state of the sea in a leather-bound log. "
)


def token_prompt(tokenizer: Any, n_tokens: int, salt: int) -> list[int]:
    """Exactly ``n_tokens`` token ids of English text, varied by ``salt`` (no shared prefix cache)."""
    text = f"Log {salt}. " + BASE_TEXT * (n_tokens // 20 + 2)
    ids: list[int] = tokenizer(text)["input_ids"]
    return ids[:n_tokens]


@dataclass(frozen=True, slots=True)
class RequestMix:
    """Request ``i`` of the mix: decoder ``i mod 5``, prompt length from :data:`PROMPT_TOKENS`
    (every :data:`LONG_EVERY`-th one ``max_model_len - LONG_MARGIN`` tokens), seeded when ``i``
    is even; a text prompt for two requests in three, token ids otherwise. ``max_tokens`` new
    tokens for ``standard`` and ``temperature``, 4 for the power decoders and the long prompts
    (their cost grows with both: each of their scoring calls prefills the prompt again)."""

    tokenizer: Any
    max_model_len: int
    max_tokens: int = 8

    def body(self, i: int, model: str) -> tuple[str, dict[str, Any]]:
        """(decoder name, /v1/completions body) of request ``i``."""
        name = list(DECODERS)[i % len(DECODERS)]
        long = i % LONG_EVERY == LONG_EVERY - 1
        n = self.max_model_len - LONG_MARGIN if long else PROMPT_TOKENS[(i // len(DECODERS)) % len(PROMPT_TOKENS)]
        ids = token_prompt(self.tokenizer, n, salt=i)
        prompt: str | list[int] = ids if i % 3 == 2 else self.tokenizer.decode(ids)
        if isinstance(prompt, str) and long:
            prompt = ids  # text can re-tokenise a few tokens longer; near the limit, send exact ids
        body: dict[str, Any] = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 4 if long or name.startswith("power_") else self.max_tokens,
            "decoder": DECODERS[name],
        }
        if i % 2 == 0:
            body["seed"] = 1000 + i
        return name, body


@dataclass
class LoadReport:
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)  # the first few non-200 bodies

    def record(self, decoder: str, status: int, latency_s: float, text: str) -> None:
        self.statuses[status] += 1
        if status == 200:
            self.latencies[decoder].append(latency_s)
        elif len(self.errors) < 5:
            self.errors.append(f"{status} {decoder}: {text[:300]}")

    @property
    def server_errors(self) -> int:
        """Responses with a 5xx status, plus requests that got no response at all (status 0)."""
        return sum(n for s, n in self.statuses.items() if s >= 500 or s == 0)

    def table(self) -> str:
        lines = [f"statuses: {dict(sorted(self.statuses.items()))}", "decoder          n   p50 s   p95 s"]
        for name in DECODERS:
            lat = sorted(self.latencies.get(name, []))
            if lat:
                p95 = lat[min(len(lat) - 1, int(0.95 * len(lat)))]
                lines.append(f"{name:<15} {len(lat):>3} {statistics.median(lat):>7.2f} {p95:>7.2f}")
        return "\n".join(lines + self.errors)


async def post(client: httpx.AsyncClient, mix: RequestMix, i: int, model: str, report: LoadReport) -> None:
    name, body = mix.body(i, model)
    start = time.perf_counter()
    try:
        resp = await client.post("/v1/completions", json=body)
        status, text = resp.status_code, resp.text
    except httpx.HTTPError as exc:  # no response: counted as a server error
        status, text = 0, repr(exc)
    report.record(name, status, time.perf_counter() - start, text)


async def burst(base_url: str, mix: RequestMix, n: int, model: str, timeout_s: float = 300.0) -> LoadReport:
    """``n`` requests of the mix, all at once."""
    report = LoadReport()
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(post(client, mix, i, model, report) for i in range(n)))
    return report


async def sustained(
    base_url: str, mix: RequestMix, model: str, concurrency: int, duration_s: float, timeout_s: float = 300.0
) -> LoadReport:
    """``concurrency`` workers sending requests of the mix back to back for ``duration_s``."""
    report = LoadReport()
    deadline = time.monotonic() + duration_s
    counter = iter(range(10**9))

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            await post(client, mix, next(counter), model, report)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/load_mix.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help="a running server (default: --start one)")
    p.add_argument("--start", action="store_true", help="start `powerserve serve --engine vllm` here")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--concurrency", type=int, default=64, help=f"at most {MAX_CONCURRENCY}")
    p.add_argument("--duration", type=float, default=60.0, help=f"seconds, at most {MAX_DURATION_S:g}")
    p.add_argument("--log-dir", type=Path, default=Path("load-mix-logs"))
    p.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    if not 1 <= ns.concurrency <= MAX_CONCURRENCY or not 0 < ns.duration <= MAX_DURATION_S:
        p.error("concurrency or duration out of range")
    if (ns.base_url is None) == (not ns.start):
        p.error("give exactly one of --base-url and --start")
    return ns


def main(argv: list[str] | None = None) -> int:
    """Run; exit status 1 when any request got a 5xx (or no answer) or the server restarted."""
    from transformers import AutoTokenizer

    from powerserve.model_store import ensure_embedded_checkpoint
    from powerserve.testing import ServerProcess

    ns = parse_args(argv)
    server = None
    base = ns.base_url
    if ns.start:
        ns.log_dir.mkdir(parents=True, exist_ok=True)
        args = ["--max-model-len", str(ns.max_model_len), "--enforce-eager", "--max-running-weight", "256"]
        server = ServerProcess(model=None, engine="vllm", extra_args=args, log_path=ns.log_dir / "server.log")
        server.wait_ready()
        base = server.base
    try:
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        tokenizer = AutoTokenizer.from_pretrained(str(ensure_embedded_checkpoint()))
        mix = RequestMix(tokenizer, ns.max_model_len)
        start = time.monotonic()
        report = asyncio.run(sustained(base, mix, model, ns.concurrency, ns.duration))
        elapsed = time.monotonic() - start
        exited = server is not None and server.proc.poll() is not None
        health = 0 if exited else httpx.get(f"{base}/health", timeout=10).status_code
        restarts = int(exited)
        summary = {"requests": sum(report.statuses.values()), "concurrency": ns.concurrency, "elapsed_s": elapsed}
        summary |= {"server_errors": report.server_errors, "engine_restarts": restarts, "health": health}
        if ns.json:
            print(json.dumps({**summary, "statuses": dict(report.statuses)}, indent=2))
        else:
            print(summary)
            print(report.table())
        return 1 if report.server_errors or restarts or health != 200 else 0
    finally:
        if server is not None:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
