"""Soak test: every decoder the server lists, at a set concurrency for a set time, with clients
that walk away mid-request, against a powerserve on this machine's loopback interface.

    .venv/bin/python benchmarks/soak.py --start --engine torch --duration 300 --concurrency 6

``--start`` runs ``powerserve serve`` itself (the embedded model, or ``--model DIR``); without it
the script drives ``--base-url`` and reads memory from ``--pid`` if given. Each request picks a
decoder from ``GET /v1/decoders`` (cheap parameters), completions or chat, streaming or not,
n of 1 or 2; a share of them (``--abandon``) is dropped by the client after a random delay.

Targets, checked at the end (exit status 1 when one is missed):

1. no 5xx and no ``internal_error`` event inside a stream;
2. no lost response: every request the client did not drop ends in a complete answer (JSON
   with every choice finished; a stream whose choices all finish, then ``[DONE]``) or in an
   OpenAI-shaped error; a transport error, a client timeout or a stream without ``[DONE]`` is lost;
3. nothing left behind: once the clients are gone the server's running and queued gauges and
   its running weight return to 0, and it still answers;
4. resident memory (VmRSS of the server and its children) grows less than 10% from the end
   of the warm-up to the end of the run. The warm-up lasts ``--warmup`` seconds and then goes
   on in 5-s chunks until memory grew less than 2% over the last chunk (at most
   ``--plateau-wait`` more seconds): the server's memory climbs for the first few hundred
   requests (allocator arenas, torch's and the tokenizer's caches) and then stays flat, so
   growth is measured from the plateau (the 10-minute curve is in docs/reliability.md).

The run is bounded in time (``--duration``, ``--warmup``) and count (``--max-requests``), and
only loopback servers are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from powerserve.testing import ServerProcess, process_tree
from powerserve_client.loadgen import check_loopback

MAX_DURATION_S = 3600.0
MAX_REQUESTS = 100_000
MAX_CONCURRENCY = 64
MEMORY_GROWTH_LIMIT = 0.10
PLATEAU_CHUNK_S = 5.0
PLATEAU_TOLERANCE = 0.02  # growth over one chunk below which memory counts as settled
SETTLE_S = 15.0  # how long the server may take to wind down the dropped requests' work

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers:",
    "Once upon a time",
    "Explain what a hash table is.",
]


# --- the server process ------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    """VmRSS of one process, in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in process_tree(pid))


# --- the workload ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SoakSpec:
    base_url: str  # the server's root, e.g. http://127.0.0.1:8000
    duration_s: float = 60.0
    warmup_s: float = 10.0
    concurrency: int = 4
    max_requests: int = 10_000
    max_tokens: int = 16
    abandon: float = 0.15  # share of requests the client drops mid-way
    seed: int = 0
    api_key: str | None = None
    pid: int | None = None  # the server's process, for its resident memory
    request_timeout_s: float = 300.0
    plateau_wait_s: float = 120.0  # longest extension of the warm-up while memory still grows
    rss_every_s: float = 5.0  # seconds between two memory samples

    def __post_init__(self) -> None:
        check_loopback(self.base_url)
        if not 0 <= self.plateau_wait_s <= MAX_DURATION_S:
            raise ValueError(f"plateau_wait must be in [0, {MAX_DURATION_S:g}] s")
        if not 0 < self.duration_s <= MAX_DURATION_S or not 0 <= self.warmup_s <= MAX_DURATION_S:
            raise ValueError(f"duration and warm-up must be at most {MAX_DURATION_S:g} s")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be in 1..{MAX_CONCURRENCY}")
        if not 1 <= self.max_requests <= MAX_REQUESTS:
            raise ValueError(f"max_requests must be in 1..{MAX_REQUESTS}")
        if not 0.1 <= self.rss_every_s <= 60:
            raise ValueError("rss_every must be in [0.1, 60] s")
        if not 0 <= self.abandon < 1 or self.max_tokens < 1 or self.request_timeout_s <= 0:
            raise ValueError("abandon must be in [0, 1); max_tokens and request_timeout positive")


@dataclass(frozen=True, slots=True)
class Call:
    """One request of the mix."""

    decoder: str
    path: str
    body: dict[str, Any]
    stream: bool
    n: int
    drop_after_s: float | None  # the client walks away after this long (None: it waits)


@dataclass(slots=True)
class Tally:
    """What the clients saw."""

    sent: int = 0
    complete: int = 0
    dropped: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)  # "200", "429 rate_limit_error", ...
    lost: Counter[str] = field(default_factory=Counter)
    server_errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=dict)
    rss_samples_kib: list[int] = field(default_factory=list)
    first_problem: str | None = None

    def problem(self, kind: str, counter: Counter[str], detail: str) -> None:
        counter[kind] += 1
        self.first_problem = self.first_problem or f"{kind}: {detail[:300]}"


def decoder_bodies(listing: dict[str, Any]) -> dict[str, Any]:
    """Decoder name -> the ``decoder`` field the soak sends, for every available decoder."""
    out: dict[str, Any] = {}
    for card in listing["data"]:
        if not card.get("available", True):
            continue
        name = card["name"]
        # Each decoder's cheap parameters come from its card; a server without them runs defaults.
        known = set(card.get("parameters", {}).get("properties", {}))
        params = {k: v for k, v in (card.get("cheap_params") or {}).items() if k in known}
        out[name] = {"name": name, **params} if params else name
    return out


def make_call(rng: random.Random, model: str, decoders: dict[str, Any], spec: SoakSpec) -> Call:
    name = rng.choice(sorted(decoders))
    chat = rng.random() < 0.5
    stream = rng.random() < 0.5
    n = 2 if rng.random() < 0.2 else 1
    body: dict[str, Any] = {
        "model": model,
        "decoder": decoders[name],
        "max_tokens": rng.randint(1, spec.max_tokens),
        "n": n,
        "seed": rng.randrange(2**31),
        "stream": stream,
    }
    prompt = rng.choice(PROMPTS)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if rng.random() < 0.2:
        body["stop"] = [".", "\n"]
    drop = rng.uniform(0.0, 2.0) if rng.random() < spec.abandon else None
    return Call(name, "/v1/chat/completions" if chat else "/v1/completions", body, stream, n, drop)


async def one_call(client: httpx.AsyncClient, call: Call, tally: Tally) -> None:
    tally.sent += 1
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(call.drop_after_s):
            if call.stream:
                async with client.stream("POST", call.path, json=call.body) as resp:
                    status = resp.status_code
                    raw = (await resp.aread()).decode("utf-8", errors="replace")
            else:
                resp = await client.post(call.path, json=call.body)
                status, raw = resp.status_code, resp.text
    except TimeoutError:
        tally.dropped += 1
        return
    except httpx.TimeoutException as exc:
        tally.problem("client timeout", tally.lost, f"{call.path} {exc!r}")
        return
    except httpx.HTTPError as exc:
        tally.problem(f"transport {type(exc).__name__}", tally.lost, f"{call.path} {exc!r}")
        return
    elapsed = time.perf_counter() - t0
    kind = judge(call, status, raw, tally)
    tally.outcomes[kind] += 1
    if kind == "200":
        tally.complete += 1
        tally.latencies.setdefault(call.decoder, []).append(elapsed)


def judge(call: Call, status: int, raw: str, tally: Tally) -> str:
    """Classify a response the client read to the end; count it as lost or a server error when it is."""
    if status != 200:
        try:
            err = json.loads(raw)["error"]
            kind = f"{status} {err['type']}"
            shaped = {"message", "type", "param", "code"} <= set(err)
        except (ValueError, KeyError, TypeError):
            kind, shaped = f"{status} (not OpenAI-shaped)", False
        if status >= 500:
            tally.problem(kind, tally.server_errors, raw)
        elif not shaped:
            tally.problem(kind, tally.lost, raw)
        return kind
    if not call.stream:
        try:
            choices = json.loads(raw)["choices"]
            finished = {c["index"] for c in choices if c.get("finish_reason") in ("stop", "length")}
        except (ValueError, KeyError, TypeError):
            tally.problem("unparseable JSON", tally.lost, raw)
            return "200 unparseable"
        if finished != set(range(call.n)):
            tally.problem("choices missing", tally.lost, raw)
            return "200 incomplete"
        return "200"
    events = []
    for line in raw.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            try:
                events.append(payload if payload == "[DONE]" else json.loads(payload))
            except ValueError:
                tally.problem("bad SSE event", tally.lost, payload)
                return "200 bad event"
    if not events or events[-1] != "[DONE]":
        tally.problem("stream without [DONE]", tally.lost, raw[-300:])
        return "200 no [DONE]"
    errors = [e["error"] for e in events[:-1] if isinstance(e, dict) and "error" in e]
    if errors:
        kind = f"stream {errors[0].get('type')}"
        if errors[0].get("type") == "internal_error":
            tally.problem(kind, tally.server_errors, json.dumps(errors[0]))
        return kind
    finished = {
        c["index"] for e in events[:-1] if isinstance(e, dict) for c in e.get("choices", []) if c.get("finish_reason")
    }
    if finished != set(range(call.n)):
        tally.problem("stream choices unfinished", tally.lost, raw[-300:])
        return "200 incomplete stream"
    return "200"


async def drive(
    client: httpx.AsyncClient,
    spec: SoakSpec,
    model: str,
    decoders: dict[str, Any],
    seconds: float,
    tally: Tally,
    rng: random.Random,
) -> float:
    """Run the mix for ``seconds`` (or until ``max_requests`` have been sent); return the time it took."""
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < deadline and tally.sent < spec.max_requests:
            await one_call(client, make_call(rng, model, decoders, spec), tally)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
    return time.perf_counter() - t0


async def sample_memory(pid: int | None, into: list[int], every_s: float = 5.0) -> None:
    """Append the server's resident memory to ``into`` every ``every_s`` seconds until cancelled."""
    while pid:
        await asyncio.sleep(every_s)
        into.append(tree_rss_kib(pid))


async def server_gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    sums = {"powerserve_requests_running": 0.0, "powerserve_requests_queued": 0.0, "powerserve_running_weight": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
    return sums


async def settle(client: httpx.AsyncClient) -> dict[str, float]:
    """Wait until no work is left on the server; return the gauges as last read."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        gauges = await server_gauges(client)
        if all(v == 0 for v in gauges.values()) or time.monotonic() > deadline:
            return gauges
        await asyncio.sleep(0.25)


# --- the run -----------------------------------------------------------------------------------


@dataclass(slots=True)
class SoakReport:
    model: str
    decoders: dict[str, Any]
    elapsed_s: float
    tally: Tally
    leftover: dict[str, float]
    still_answers: bool
    rss_start_kib: int | None
    rss_end_kib: int | None
    warmup_rss_kib: list[int] = field(default_factory=list)  # at the end of each warm-up chunk

    @property
    def memory_growth(self) -> float | None:
        if not self.rss_start_kib or self.rss_end_kib is None:
            return None
        return self.rss_end_kib / self.rss_start_kib - 1.0

    def targets(self) -> dict[str, bool]:
        growth = self.memory_growth
        return {
            "no 5xx": not self.tally.server_errors,
            "no lost response": not self.tally.lost,
            "no work left behind": all(v == 0 for v in self.leftover.values()) and self.still_answers,
            "memory growth < 10%": growth is None or growth < MEMORY_GROWTH_LIMIT,
        }

    @property
    def passed(self) -> bool:
        return all(self.targets().values())

    def as_dict(self) -> dict[str, Any]:
        t = self.tally
        per_decoder = {}
        for name in sorted(self.decoders):
            lat = sorted(t.latencies.get(name, []))
            per_decoder[name] = {
                "complete": len(lat),
                "p50_s": percentile(lat, 0.50),
                "p95_s": percentile(lat, 0.95),
            }
        return {
            "model": self.model,
            "decoders": self.decoders,
            "elapsed_s": round(self.elapsed_s, 1),
            "sent": t.sent,
            "complete": t.complete,
            "dropped_by_client": t.dropped,
            "outcomes": dict(t.outcomes),
            "server_errors": dict(t.server_errors),
            "lost": dict(t.lost),
            "first_problem": t.first_problem,
            "per_decoder": per_decoder,
            "leftover_after_settle": self.leftover,
            "still_answers": self.still_answers,
            "rss_start_kib": self.rss_start_kib,
            "rss_end_kib": self.rss_end_kib,
            "memory_growth": self.memory_growth,
            "rss_samples_mib": [round(k / 1024) for k in t.rss_samples_kib],
            "warmup_rss_mib": [round(k / 1024) for k in self.warmup_rss_kib],
            "targets": self.targets(),
            "passed": self.passed,
        }

    def table(self) -> str:
        d = self.as_dict()
        lines = [
            f"model {self.model}: {d['sent']} requests in {d['elapsed_s']} s, {d['complete']} complete, "
            f"{d['dropped_by_client']} dropped by the client",
            "outcomes: " + ", ".join(f"{k} x{v}" for k, v in sorted(d["outcomes"].items())),
            f"{'decoder':<18}{'complete':>9}{'p50 s':>9}{'p95 s':>9}",
        ]
        for name, row in d["per_decoder"].items():
            lines.append(f"{name:<18}{row['complete']:>9}{_fmt(row['p50_s']):>9}{_fmt(row['p95_s']):>9}")
        if self.rss_start_kib is not None:
            growth = self.memory_growth
            lines.append(
                f"resident memory: {self.rss_start_kib / 1024:.0f} MiB after warm-up, "
                f"{(self.rss_end_kib or 0) / 1024:.0f} MiB at the end"
                + (f" ({100 * growth:+.1f}%)" if growth is not None else "")
            )
        if self.warmup_rss_kib:
            lines.append(
                "memory at the end of the warm-up and of each plateau chunk (MiB): " + _mib(self.warmup_rss_kib)
            )
        if self.tally.rss_samples_kib:
            lines.append("memory while measured (MiB): " + _mib(self.tally.rss_samples_kib))
        lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in self.targets().items()]
        if d["first_problem"]:
            lines.append(f"first problem: {d['first_problem']}")
        return "\n".join(lines)


async def soak(spec: SoakSpec) -> SoakReport:
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    limits = httpx.Limits(max_connections=spec.concurrency + 4, max_keepalive_connections=spec.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=spec.base_url, headers=headers, timeout=spec.request_timeout_s, limits=limits
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        decoders = decoder_bodies((await client.get("/v1/decoders")).json())
        rng = random.Random(spec.seed)
        warmup_rss: list[int] = []
        if spec.warmup_s > 0:
            await drive(client, spec, model, decoders, spec.warmup_s, Tally(), rng)
            if spec.pid:
                warmup_rss = await warm_to_plateau(client, spec, model, decoders, rng)
            await settle(client)
        rss_start = tree_rss_kib(spec.pid) if spec.pid else None
        tally = Tally()
        sampler = asyncio.create_task(sample_memory(spec.pid, tally.rss_samples_kib, spec.rss_every_s))
        try:
            elapsed = await drive(client, spec, model, decoders, spec.duration_s, tally, rng)
        finally:
            sampler.cancel()
        try:
            leftover = await settle(client)
            probe = await client.post("/v1/completions", json={"model": model, "prompt": "ok", "max_tokens": 1})
            health = await client.get("/health")
            still_answers = probe.status_code == 200 and health.status_code == 200
        except httpx.HTTPError as exc:
            tally.problem(f"server gone after the run: {type(exc).__name__}", tally.lost, repr(exc))
            leftover, still_answers = {"unreachable": 1.0}, False
        rss_end = tree_rss_kib(spec.pid) if spec.pid else None
    return SoakReport(model, decoders, elapsed, tally, leftover, still_answers, rss_start, rss_end, warmup_rss)


async def warm_to_plateau(
    client: httpx.AsyncClient, spec: SoakSpec, model: str, decoders: dict[str, Any], rng: random.Random
) -> list[int]:
    """Go on with the mix in chunks of PLATEAU_CHUNK_S until the server's resident memory grew
    less than PLATEAU_TOLERANCE over the last chunk, or for at most ``spec.plateau_wait_s``;
    return the memory at the end of the warm-up and of each chunk (KiB)."""
    assert spec.pid is not None
    samples = [tree_rss_kib(spec.pid)]
    deadline = time.monotonic() + spec.plateau_wait_s
    while time.monotonic() < deadline:
        await drive(client, spec, model, decoders, PLATEAU_CHUNK_S, Tally(), rng)
        samples.append(tree_rss_kib(spec.pid))
        if samples[-1] <= samples[-2] * (1 + PLATEAU_TOLERANCE):
            break
    return samples


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def _mib(samples_kib: list[int]) -> str:
    return " ".join(str(round(k / 1024)) for k in samples_kib)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loopback server's root URL")
    p.add_argument("--start", action="store_true", help="start `powerserve serve` on a free loopback port")
    p.add_argument("--model", help="with --start: a checkpoint directory (default: the embedded model)")
    p.add_argument("--engine", default="torch", choices=("auto", "vllm", "torch"), help="with --start")
    p.add_argument("--server-arg", action="append", default=[], help="with --start: extra `serve` option (repeat)")
    p.add_argument("--pid", type=int, help="without --start: the server's process id, for its memory")
    p.add_argument("--duration", type=float, default=60.0, help=f"seconds measured, at most {MAX_DURATION_S:g}")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of the same mix before measuring")
    p.add_argument(
        "--plateau-wait", type=float, default=120.0, help="longest extension of the warm-up while memory still grows"
    )
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between two memory samples")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-requests", type=int, default=10_000)
    p.add_argument("--max-tokens", type=int, default=16, help="each request asks for 1..this many tokens")
    p.add_argument("--abandon", type=float, default=0.15, help="share of requests the client drops mid-way")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key")
    p.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    server: ServerProcess | None = None
    base_url, pid = ns.base_url, ns.pid
    check_loopback(base_url)
    if ns.start:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"powerserve-soak-{os.getpid()}.log"
        args = list(ns.server_arg) + (["--api-key", ns.api_key] if ns.api_key else [])
        server = ServerProcess(model=ns.model, engine=ns.engine, extra_args=args, log_path=log)
        print(f"starting powerserve ({ns.engine}) on {server.base}, log {log}", file=sys.stderr)
        server.wait_ready()
        base_url, pid = server.base, server.pid
    try:
        spec = SoakSpec(
            base_url=base_url,
            duration_s=ns.duration,
            warmup_s=ns.warmup,
            concurrency=ns.concurrency,
            max_requests=ns.max_requests,
            max_tokens=ns.max_tokens,
            abandon=ns.abandon,
            seed=ns.seed,
            api_key=ns.api_key,
            pid=pid,
            plateau_wait_s=ns.plateau_wait,
            rss_every_s=ns.rss_every,
        )
        report = asyncio.run(soak(spec))
    finally:
        if server is not None:
            server.kill()
    print(report.table())
    if ns.json is not None:
        ns.json.write_text(json.dumps(report.as_dict(), indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
