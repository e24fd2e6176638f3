"""Hand-written hostile and edge-case requests over a real socket: huge bodies, deep nesting,
invalid UTF-8 and lone surrogates, prompts at and past the context, ``n`` and ``max_tokens`` at
their caps, stop-string counts, and concurrent requests with one seed. Every refusal is a 4xx
with an OpenAI-shaped error, and the server keeps answering afterwards.

The in-process model has a 128-token context; the server caps n at 4 and max_tokens at 64.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from benchmarks.soak import decoder_bodies

from tests.reliability.support import MODEL, SETTINGS, LiveServer, assert_openai_error, live
from tests.serving.tiny_app import MAX_MODEL_LEN

MAX_N = SETTINGS["max_n"]
MAX_TOKENS = SETTINGS["max_tokens_limit"]
HUGE = 20 * 1024 * 1024  # bytes
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def server(engine: Any) -> Any:
    with live(engine) as srv:
        yield srv


@pytest.fixture
async def client(server: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base, timeout=120) as c:
        yield c
        # Whatever the test sent, the server still serves.
        ok = await c.post("/v1/completions", json={"model": MODEL, "prompt": "still there?", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


# --- huge bodies --------------------------------------------------------------------------------


def _huge_bodies() -> dict[str, tuple[str, bytes]]:
    words = "hello world " * (HUGE // 12)
    return {
        "text prompt": ("/v1/completions", json.dumps({"model": MODEL, "prompt": words}).encode()),
        "chat message": ("/v1/chat/completions", json.dumps(chat(words)).encode()),
        "token ids": ("/v1/completions", json.dumps({"model": MODEL, "prompt": [1] * (HUGE // 3)}).encode()),
        "many prompts": ("/v1/completions", json.dumps({"model": MODEL, "prompt": ["ab"] * (HUGE // 6)}).encode()),
        "prompt lists": (
            "/v1/completions",
            json.dumps({"model": MODEL, "prompt": [[1, 2, 3]] * (HUGE // 11)}).encode(),
        ),
    }


@pytest.mark.parametrize("kind", list(_huge_bodies()))
async def test_a_20_mb_body_is_refused_promptly(client: httpx.AsyncClient, kind: str) -> None:
    path, body = _huge_bodies()[kind]
    assert len(body) >= HUGE * 0.9
    t0 = time.perf_counter()
    resp = await client.post(path, content=body, headers=JSON)
    elapsed = time.perf_counter() - t0
    err = assert_openai_error(resp, 400, "invalid_request_error")
    assert err["param"].split(".")[0] in ("prompt", "messages"), err
    # Parsing 20 MB of JSON takes seconds (30 s seen with load average 13); tokenizing it would take minutes.
    assert elapsed < 60, f"{kind}: {elapsed:.1f} s"


# --- malformed bodies ---------------------------------------------------------------------------

MALFORMED = {
    "nested arrays": b"[" * 100_000 + b"]" * 100_000,
    "nested objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "nested prompt": b'{"model": "tiny", "prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "nested decoder": b'{"model": "tiny", "prompt": "x", "decoder": ' + b'{"name": ' * 10_000 + b'"a"' + b"}" * 10_001,
    "invalid utf-8": b'{"model": "tiny", "prompt": "\xff\xfe\xc3("}',
    "truncated": b'{"model": "tiny", "prompt": "x"',
    "empty": b"",
    "null": b"null",
    "array": b"[1, 2, 3]",
    "string": b'"prompt"',
    "NaN": b'{"model": "tiny", "prompt": "x", "temperature": NaN}',
    "huge number": b'{"model": "tiny", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}",
}


@pytest.mark.parametrize("kind", list(MALFORMED))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_malformed_bodies_are_400(client: httpx.AsyncClient, path: str, kind: str) -> None:
    resp = await client.post(path, content=MALFORMED[kind], headers=JSON)
    assert_openai_error(resp, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", '{"model": "tiny", "prompt": "a\\ud800b"}', "prompt"),
        ("/v1/completions", '{"model": "tiny", "prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/v1/chat/completions", '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d"}]}', "messages"),
    ],
)
async def test_lone_surrogates_are_400(client: httpx.AsyncClient, path: str, body: str, param: str) -> None:
    """``\\ud800`` is a valid JSON escape but no Unicode text: the tokenizer cannot take it."""
    assert_openai_error(await client.post(path, content=body.encode(), headers=JSON), 400, "invalid_request_error")
    # The field, possibly with the item's position (``prompt.1``, ``messages.0.content``).
    assert (await client.post(path, content=body.encode(), headers=JSON)).json()["error"]["param"].split(".")[
        0
    ] == param


async def test_a_valid_surrogate_pair_is_fine(client: httpx.AsyncClient) -> None:
    body = b'{"model": "tiny", "prompt": "smile \\ud83d\\ude00", "max_tokens": 2}'
    assert (await client.post("/v1/completions", content=body, headers=JSON)).status_code == 200


# --- the context limit ----------------------------------------------------------------------------


async def test_prompts_at_and_past_the_context(client: httpx.AsyncClient) -> None:
    async def complete(prompt: Any, **extra: Any) -> httpx.Response:
        return await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **extra})

    # The longest prompt that fits leaves room for one token, with or without max_tokens.
    for extra in ({"max_tokens": 1}, {}):
        resp = await complete([5] * (MAX_MODEL_LEN - 1), **extra)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == 1
    err = assert_openai_error(await complete([5] * MAX_MODEL_LEN), 400)
    assert (err["param"], err["code"]) == ("prompt", "context_length_exceeded")
    # prompt + max_tokens may reach the context exactly, not pass it.
    resp = await complete([5] * 100, max_tokens=MAX_MODEL_LEN - 100)
    assert resp.status_code == 200, resp.text
    err = assert_openai_error(await complete([5] * 100, max_tokens=MAX_MODEL_LEN - 99), 400)
    assert (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    # Text and chat prompts past the context, long and very long (the latter never tokenized),
    # and past the schema's 8 Mi-character bound on a text (refused before anything else).
    for size in (MAX_MODEL_LEN * 4, 2**20):
        err = assert_openai_error(await complete("word " * size), 400)
        assert err["code"] == "context_length_exceeded"
        err = assert_openai_error(await client.post("/v1/chat/completions", json=chat("word " * size)), 400)
        assert err["code"] == "context_length_exceeded"
    err = assert_openai_error(await complete("word " * (HUGE // 4)), 400)
    assert err["param"] == "prompt", err
    err = assert_openai_error(await client.post("/v1/chat/completions", json=chat("word " * (HUGE // 4))), 400)
    assert err["param"] == "messages.0.content", err


# --- caps -------------------------------------------------------------------------------------------


async def test_n_and_max_tokens_at_their_caps(client: httpx.AsyncClient) -> None:
    base = {"model": MODEL, "prompt": "Hi", "seed": 3}
    resp = await client.post("/v1/completions", json={**base, "n": MAX_N, "max_tokens": 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == MAX_N
    err = assert_openai_error(await client.post("/v1/completions", json={**base, "n": MAX_N + 1}), 400)
    assert err["param"] == "n"
    resp = await client.post("/v1/completions", json={**base, "max_tokens": MAX_TOKENS})
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] <= MAX_TOKENS
    err = assert_openai_error(await client.post("/v1/completions", json={**base, "max_tokens": MAX_TOKENS + 1}), 400)
    assert err["param"] == "max_tokens"
    resp = await client.post("/v1/chat/completions", json=chat("Hi", n=MAX_N, max_completion_tokens=MAX_TOKENS))
    assert resp.status_code == 200 and len(resp.json()["choices"]) == MAX_N
    # Prompts x n share the cap.
    two = {"model": MODEL, "prompt": ["a", "b"], "max_tokens": 1}
    resp = await client.post("/v1/completions", json={**two, "n": MAX_N // 2})
    assert resp.status_code == 200 and len(resp.json()["choices"]) == MAX_N
    assert_openai_error(await client.post("/v1/completions", json={**two, "n": MAX_N // 2 + 1}), 400)
    many = {"model": MODEL, "prompt": ["a"] * (MAX_N + 1), "max_tokens": 1}
    assert assert_openai_error(await client.post("/v1/completions", json=many), 400)["param"] == "prompt"


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_sixteen_stop_strings_ok_seventeen_refused(client: httpx.AsyncClient, path: str) -> None:
    body: dict[str, Any] = chat("Hi") if "chat" in path else {"model": MODEL, "prompt": "Hi"}
    body["max_tokens"] = 8
    stops = [f"stop{i}" for i in range(17)]
    assert (await client.post(path, json={**body, "stop": stops[:16]})).status_code == 200
    assert_openai_error(await client.post(path, json={**body, "stop": stops}), 400, "invalid_request_error")
    assert_openai_error(await client.post(path, json={**body, "stop": ["ok", ""]}), 400, "invalid_request_error")
    # Stop strings up to 256 characters are allowed; a longer one is a 400 naming ``stop`` (the
    # held-back tail is checked against every stop string per token, so their length is bounded).
    resp = await client.post(path, json={**body, "stop": ["x" * 256] * 16})
    assert resp.status_code == 200
    err = assert_openai_error(await client.post(path, json={**body, "stop": ["x" * 257]}), 400)
    assert err["param"] == "stop.0", err


# --- determinism under concurrency ------------------------------------------------------------


async def test_concurrent_identical_seeds_give_identical_outputs(engine: Any) -> None:
    """Every decoder the server lists, four identical seeded requests each, all running at once
    (so their engine calls interleave): the copies agree, choice by choice."""
    with live(engine, max_running_weight=10**6, max_queued_weight=10**6) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=120) as client:
            await _same_seed_same_text(client)


async def _same_seed_same_text(client: httpx.AsyncClient) -> None:
    decoders = decoder_bodies((await client.get("/v1/decoders")).json())
    copies = 4

    def body(decoder: Any) -> dict[str, Any]:
        return {"model": MODEL, "prompt": "The answer is", "max_tokens": 8, "n": 2, "seed": 1234, "decoder": decoder}

    jobs = [(name, client.post("/v1/completions", json=body(d))) for name, d in decoders.items() for _ in range(copies)]
    responses = await asyncio.gather(*(job for _, job in jobs))
    texts: dict[str, list[list[str]]] = {}
    for (name, _), resp in zip(jobs, responses, strict=True):
        assert resp.status_code == 200, (name, resp.text)
        texts.setdefault(name, []).append([c["text"] for c in resp.json()["choices"]])
    for name, outs in texts.items():
        assert all(out == outs[0] for out in outs), (name, outs)
    # The seed is honoured: a different one gives different text for the plain decoder.
    other = await client.post("/v1/completions", json={**body("standard"), "seed": 99})
    assert [c["text"] for c in other.json()["choices"]] != texts["standard"][0]
