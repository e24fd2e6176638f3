"""The event-loop watchdog (issue 13): while hostile requests are in flight, a probe polls
``/health`` every 100 ms and every answer must come within 1 s.

The hostile requests are built from what the server itself publishes, so a new field or
decoder parameter is covered without editing this file: every integer and number field of both
request models (from ``/openapi.json``) and every numeric parameter of every decoder (from
``/v1/decoders``) set to 0, -1, 2^31, 2^63, 1e12, 1e308, -1e308, NaN, +Infinity and -Infinity
(JSON has no NaN or Infinity; Python's parser, which the server uses, accepts them); every string
field as a string of 10^5 characters and every list field as a list of 10^5 elements; the
request of the issue (``mcmc_steps: 1e12``); and long outputs at the server's largest ``n``
scanned for 16 stop strings of the longest allowed length. Small bodies are sent by 6 clients
at once, the large ones and the long outputs one at a time.

Each request must end in a 4xx (OpenAI-shaped) or a complete answer within 5 s, and a normal
request is served afterwards. The server is a ``powerserve serve`` subprocess on the tiny
checkpoint (torch engine), so the probe measures the server's loop, not this process's.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from powerserve.protocol import MAX_STOP, MAX_STOP_CHARS

EXTREMES: list[Any] = [0, -1, 2**31, 2**63, 1e12, 1e308, -1e308, float("nan"), float("inf"), float("-inf")]
BIG = 10**5
PROBE_EVERY_S = 0.1
PROBE_LIMIT_S = 1.0
REQUEST_LIMIT_S = 5.0
CONCURRENCY = 6
TEXT = ("hello world, " * (BIG // 13 + 1))[:BIG]
STOPS = [f"{i:02d}" + "\u2603" * (MAX_STOP_CHARS - 2) for i in range(MAX_STOP)]  # never produced


def _base(path: str, model: str) -> dict[str, Any]:
    if path == "/v1/completions":
        return {"model": model, "prompt": "Hello", "max_tokens": 4}
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def _kinds(schema: dict[str, Any], defs: dict[str, Any]) -> set[str]:
    """JSON types a (possibly anyOf / $ref) property accepts."""
    if "$ref" in schema:
        return _kinds(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    kinds = {schema["type"]} if "type" in schema else set()
    for member in schema.get("anyOf", []):
        kinds |= _kinds(member, defs)
    return kinds


def hostile_requests(spec: dict[str, Any], decoders: list[dict[str, Any]], model: str) -> list[tuple[str, str, bytes]]:
    """(label, path, JSON body) of every hostile request."""
    defs = spec["components"]["schemas"]
    out: list[tuple[str, str, dict[str, Any]]] = []
    for path, name in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        for field, schema in defs[name]["properties"].items():
            kinds = _kinds(schema, defs)
            if kinds & {"integer", "number"}:
                out += [(f"{path} {field}={v!r}", path, {**_base(path, model), field: v}) for v in EXTREMES]
            if "string" in kinds:
                out.append((f"{path} {field}: 10^5 chars", path, {**_base(path, model), field: TEXT}))
            if "array" in kinds:
                items: list[Any] = list(range(BIG)) if field == "prompt" else ["a"] * BIG
                out.append((f"{path} {field}: 10^5 items", path, {**_base(path, model), field: items}))
            if "object" in kinds and field in ("logit_bias", "decoder"):
                big_object: dict[str, Any] = {str(i): 1 for i in range(BIG)}
                if field == "decoder":
                    big_object["name"] = "power_mcmc"
                out.append((f"{path} {field}: 10^5 keys", path, {**_base(path, model), field: big_object}))
    chat_path = "/v1/chat/completions"
    chat = _base(chat_path, model)
    parts = [{"type": "text", "text": "a"}] * BIG
    out += [
        ("chat content: 10^5 chars", chat_path, {**chat, "messages": [{"role": "user", "content": TEXT}]}),
        ("chat: 10^5 messages", chat_path, {**chat, "messages": [{"role": "user", "content": "hi"}] * BIG}),
        ("chat: 10^5 parts", chat_path, {**chat, "messages": [{"role": "user", "content": parts}]}),
        ("chat name: 10^5 chars", chat_path, {**chat, "messages": [{"role": "user", "content": "hi", "name": TEXT}]}),
    ]
    completion = _base("/v1/completions", model)
    out += [
        ("prompt: 10^5 strings", "/v1/completions", {**completion, "prompt": ["a"] * BIG}),
        ("prompt: 10^5 lists", "/v1/completions", {**completion, "prompt": [[1]] * BIG}),
        ("stop: 10^5-char string", "/v1/completions", {**completion, "stop": TEXT}),
        ("decoder name: 10^5 chars", "/v1/completions", {**completion, "decoder": {"name": TEXT}}),
    ]
    for card in decoders:
        for param, schema in card["parameters"].get("properties", {}).items():
            if _kinds(schema, card["parameters"].get("$defs", {})) & {"integer", "number"}:
                out += [
                    (
                        f"decoder {card['name']}.{param}={v!r}",
                        "/v1/completions",
                        {**completion, "decoder": {"name": card["name"], param: v}},
                    )
                    for v in EXTREMES
                ]
    out.append(
        (
            "the request of issue 13",
            "/v1/completions",
            {"model": model, "prompt": "x", "max_tokens": 2, "decoder": {"name": "power_mcmc", "mcmc_steps": 1e12}},
        )
    )
    return [(label, path, json.dumps(body).encode()) for label, path, body in out]


def long_stop_requests(model: str, max_n: int) -> list[tuple[str, str, bytes]]:
    """Long outputs at the largest n, scanned for 16 stop strings of the longest length: these
    must succeed (200) and still leave the loop free."""
    common = {"model": model, "prompt": "Once upon a time", "max_tokens": 64, "n": max_n, "stop": STOPS, "seed": 1}
    bodies = [
        (
            "stops, power_mcmc whole answer at once",
            {**common, "decoder": {"name": "power_mcmc", "block_size": 64, "mcmc_steps": 0}},
        ),
        ("stops, standard", common),
        ("stops, standard streamed", {**common, "stream": True}),
    ]
    return [(label, "/v1/completions", json.dumps(body).encode()) for label, body in bodies]


class Probe(threading.Thread):
    """GET /health every 100 ms from its own thread; records every answer's latency."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    status = client.get("/health").status_code
                    if status != 200:
                        self.failures.append(f"status {status}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - t0)
                self.stop_event.wait(PROBE_EVERY_S)


def judge(label: str, body: bytes, status: int, text: str, elapsed: float) -> str | None:
    """None when the answer is acceptable, else what is wrong with it."""
    if elapsed > REQUEST_LIMIT_S:
        return f"{label}: {elapsed:.1f} s"
    if 400 <= status < 500:
        try:
            err = json.loads(text)["error"]
        except (ValueError, KeyError):
            return f"{label}: {status} not OpenAI-shaped: {text[:200]}"
        return None if {"message", "type", "param", "code"} <= set(err) else f"{label}: {err}"
    if status != 200:
        return f"{label}: status {status}: {text[:300]}"
    n = json.loads(body).get("n", 1)
    if text.startswith("data:") or "\ndata:" in text[:100]:
        done = text.rstrip().endswith("data: [DONE]") and '"error"' not in text
        return None if done else f"{label}: stream did not finish cleanly: {text[-300:]}"
    choices = json.loads(text)["choices"]
    ok = len(choices) == n and all(c["finish_reason"] in ("stop", "length") for c in choices)
    return None if ok else f"{label}: incomplete answer {text[:300]}"


def test_hostile_requests_never_stall_the_loop(server_factory: Any) -> None:
    srv = server_factory()
    with httpx.Client(base_url=srv.base, timeout=30) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        spec = client.get("/openapi.json").json()
        decoders = [c for c in client.get("/v1/decoders").json()["data"] if c["available"]]
    max_n = 8  # the server's default max_n
    requests = hostile_requests(spec, decoders, model) + long_stop_requests(model, max_n)
    numeric = sum("=" in label for label, _, _ in requests)
    assert numeric >= 10 * 30, numeric  # >= 30 numeric fields and parameters, 10 values each

    probe = Probe(srv.base)
    probe.start()
    problems: list[str] = []
    statuses: dict[int, int] = {}

    def send(item: tuple[str, str, bytes]) -> None:
        label, path, body = item
        t0 = time.perf_counter()
        try:
            with httpx.Client(base_url=srv.base, timeout=REQUEST_LIMIT_S + 5) as c:
                resp = c.post(path, content=body, headers={"content-type": "application/json"})
        except httpx.HTTPError as exc:
            problems.append(f"{label}: {exc!r}")
            return
        statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        if (problem := judge(label, body, resp.status_code, resp.text, time.perf_counter() - t0)) is not None:
            problems.append(problem)

    # Small bodies go 6 at a time; the 10^5-element bodies (whose JSON parsing, 1 to 3 MB, is
    # the one thing left on the loop) and the long outputs one at a time, so that the probe
    # measures each of them, not a pile-up on two shared cores.
    small = [r for r in requests if len(r[2]) < 10_000 and not r[0].startswith("stops")]
    single = [r for r in requests if r not in small]
    try:
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(send, small))
        for item in single:
            send(item)
    finally:
        probe.stop_event.set()
        probe.join(timeout=15)
    print(
        f"{len(requests)} hostile requests, statuses {statuses}; /health polled {len(probe.latencies)} times, "
        f"slowest {max(probe.latencies):.3f} s"
    )
    assert not problems, problems[:10]
    assert not probe.failures, probe.failures[:5]
    assert len(probe.latencies) >= 10
    assert max(probe.latencies) < PROBE_LIMIT_S, sorted(probe.latencies)[-5:]
    assert statuses.get(200, 0) >= 3 and sum(v for k, v in statuses.items() if 400 <= k < 500) >= 300, statuses
    ok = httpx.post(
        f"{srv.base}/v1/completions", json={"model": model, "prompt": "still there?", "max_tokens": 2}, timeout=30
    )
    assert ok.status_code == 200, ok.text
