"""The HTTP API through the real app: OpenAI shapes, decoder selection, cost extension,
streaming, metrics, and a 4xx with an OpenAI-shaped error for every kind of bad input."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from powerserve.engine.base import EngineStats, SamplingSpec
from powerserve.engine.torch_engine import TorchEngine
from tests.serving.http_client import assert_openai_error, post, sse_events
from tests.serving.tiny_app import MAX_MODEL_LEN, MODEL, make_client

# --- happy paths ------------------------------------------------------------------------------


def test_completion_shape_usage_and_extension(client: TestClient, engine: TorchEngine) -> None:
    resp = post(client, "/v1/completions", {"model": MODEL, "prompt": "Hello there", "max_tokens": 8, "seed": 1})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(engine.tokenizer.encode("Hello there"))
    assert 1 <= usage["completion_tokens"] <= 8
    ext = body["powerserve"]
    assert ext["decoder"] == "standard" and ext["engine"] == "torch"
    assert ext["tokens_generated"] == usage["completion_tokens"]
    assert ext["engine_calls"] >= 1 and ext["wall_time_s"] > 0
    assert ext["self_reward"]["tokens"] == usage["completion_tokens"]
    assert ext["cost_multiplier"] == pytest.approx(
        (ext["tokens_generated"] + ext["tokens_scored"]) / usage["completion_tokens"]
    )


def test_self_reward_is_base_model_logprob_of_returned_tokens(client: TestClient, engine: TorchEngine) -> None:
    """The reported self-reward equals an independent scoring, by the engine, of the tokens that
    the same seed produces; the reported per-token logprobs add up to it."""
    prompt = engine.tokenizer.encode("Count: one two")
    body = post(
        client,
        "/v1/completions",
        {"model": MODEL, "prompt": prompt, "max_tokens": 10, "seed": 3, "temperature": 0.7, "logprobs": 0},
    ).json()
    lp = body["choices"][0]["logprobs"]["token_logprobs"]
    sr = body["powerserve"]["self_reward"]
    assert len(lp) == body["usage"]["completion_tokens"] == sr["tokens"]
    assert sr["sum_logprob"] == pytest.approx(math.fsum(lp), abs=1e-6)
    assert sr["mean_logprob"] == pytest.approx(math.fsum(lp) / len(lp), abs=1e-6)
    ids = asyncio.run(_sample_ids(engine, prompt, 10, 3, 0.7))
    assert len(ids) == len(lp)
    scored = asyncio.run(engine.score(prompt, ids, EngineStats()))
    assert math.fsum(scored) == pytest.approx(sr["sum_logprob"], abs=1e-4)
    assert sr["sum_logprob"] < 0


def test_seed_reproducible_and_n_choices_distinct(client: TestClient) -> None:
    req = {"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "n": 3, "seed": 7, "temperature": 1.0}
    a, b = post(client, "/v1/completions", req).json(), post(client, "/v1/completions", req).json()
    texts_a = [c["text"] for c in a["choices"]]
    assert texts_a == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    assert len(set(texts_a)) > 1
    assert len(a["powerserve"]["choices"]) == 3


def test_prompt_forms(client: TestClient, engine: TorchEngine) -> None:
    ids = engine.tokenizer.encode("abc")
    for prompt, expected in (("abc", 1), (ids, 1), (["a", "b"], 2), ([ids, ids], 2)):
        body = post(client, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 2}).json()
        assert len(body["choices"]) == expected, body


def test_stop_string_cuts_text(client: TestClient) -> None:
    base = {"model": MODEL, "prompt": "x", "max_tokens": 24, "seed": 11, "temperature": 1.0}
    full = post(client, "/v1/completions", base).json()["choices"][0]["text"]
    assert len(full) >= 6, full
    stop = full[3:5]
    cut = post(client, "/v1/completions", {**base, "stop": [stop]}).json()["choices"][0]
    assert cut["finish_reason"] == "stop"
    assert stop not in cut["text"] and full.startswith(cut["text"])
    assert cut["text"] == full[: full.index(stop)]


def test_logprobs_top_k(client: TestClient) -> None:
    body = post(
        client, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4, "logprobs": 3, "seed": 2}
    ).json()
    lp = body["choices"][0]["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n
    for row, chosen in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert 1 <= len(row) <= 3
        assert max(row.values()) >= chosen - 1e-6


def test_chat_completion_and_decoder_selection(client: TestClient) -> None:
    msgs = [{"role": "user", "content": "What is 7 + 5?"}]
    body = post(client, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 6}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    for decoder, expected in (
        ("temperature", {"alpha": 4.0}),
        ({"name": "temperature", "alpha": 2}, {"alpha": 2.0}),
    ):
        body = post(
            client, "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 4, "decoder": decoder}
        ).json()
        assert body["powerserve"]["decoder"] == "temperature", body
        assert body["powerserve"]["params"] == expected
    body = post(
        client, "/v1/chat/completions", {"model": f"{MODEL}:temperature", "messages": msgs, "max_tokens": 4}
    ).json()
    assert body["powerserve"]["decoder"] == "temperature" and body["model"] == f"{MODEL}:temperature"


def test_streaming_completion_token_by_token(client: TestClient) -> None:
    req = {
        "model": MODEL,
        "prompt": "Stream",
        "max_tokens": 12,
        "seed": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with client.stream("POST", "/v1/completions", json=req) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
    assert len(text_chunks) >= 3  # true streaming: several deltas, not one blob
    finishes = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishes) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    assert usage_chunk["powerserve"]["self_reward"]["tokens"] == usage_chunk["usage"]["completion_tokens"]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    plain = post(client, "/v1/completions", {k: v for k, v in req.items() if k not in ("stream", "stream_options")})
    assert streamed == plain.json()["choices"][0]["text"]


def test_streaming_chat(client: TestClient) -> None:
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
        "stream": True,
        "n": 2,
        "seed": 1,
    }
    with client.stream("POST", "/v1/chat/completions", json=req) as resp:
        events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    roles = {c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")}
    assert roles == {0, 1}
    assert chunks[-1]["powerserve"]["decoder"] == "standard"


def test_models_decoders_health_metrics(client: TestClient) -> None:
    models = client.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert MODEL in ids and f"{MODEL}:temperature" in ids
    decoders = {d["name"]: d for d in client.get("/v1/decoders").json()["data"]}
    assert {"standard", "temperature"} <= set(decoders)
    assert decoders["temperature"]["defaults"] == {"alpha": 4.0}
    assert decoders["temperature"]["cheap_params"] == {"alpha": 4}  # the decoder's own, published
    assert decoders["temperature"]["parameters"]["properties"]["alpha"]["minimum"] == 1.0
    assert client.get("/health").json() == {"status": "ok"}
    post(client, "/v1/completions", {"model": MODEL, "prompt": "m", "max_tokens": 2, "decoder": "temperature"})
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name in (
        "powerserve_requests",
        "powerserve_request_latency_seconds",
        "powerserve_time_to_first_token_seconds",
        "powerserve_output_tokens",
        "powerserve_engine_tokens_generated",
        "powerserve_engine_tokens_scored",
        "powerserve_self_reward_per_token",
    ):
        samples = [s for s in families[name].samples if s.labels.get("decoder") == "temperature"]
        assert samples and all(s.labels["model"] == MODEL for s in samples), name
    outcomes = {s.labels["outcome"] for s in families["powerserve_requests"].samples if s.value > 0}
    assert "success" in outcomes


def test_openapi_documents_the_decoder_field(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    props = schema["components"]["schemas"]["CompletionRequest"]["properties"]
    assert "decoder" in props and "/v1/decoders" in props["decoder"]["description"]


# --- bad input --------------------------------------------------------------------------------

BAD_BODIES = [
    ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x", "n": 99}, 400, "n"),
    ({"model": MODEL, "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "prompt": "x", "decoder": "nope"}, 400, "decoder"),
    ({"model": MODEL, "prompt": "x", "decoder": {"name": "temperature", "alpha": 0.5}}, 400, "decoder.alpha"),
    ({"model": MODEL, "prompt": "x", "decoder": {"name": "temperature", "beta": 2}}, 400, "decoder.beta"),
    ({"model": f"{MODEL}:nope", "prompt": "x"}, 400, "decoder"),
    ({"model": f"{MODEL}:standard", "prompt": "x", "decoder": "temperature"}, 400, "decoder"),
    ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
    ({"model": MODEL, "prompt": "x " * (MAX_MODEL_LEN * 2)}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 64, "stop": ["a"] * 17}, 400, None),
    ({"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": 1.0}, 400, None),
    ({"model": MODEL, "prompt": "x", "unknown_field": 1}, 400, "unknown_field"),
    ({"prompt": "x"}, 400, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_BODIES)
def test_bad_completion_bodies(client: TestClient, body: dict[str, Any], status: int, param: str | None) -> None:
    assert_openai_error(post(client, "/v1/completions", body), status, param)


def test_bad_chat_bodies(client: TestClient) -> None:
    assert_openai_error(post(client, "/v1/chat/completions", {"model": MODEL, "messages": []}), 400, "messages")
    assert_openai_error(
        post(client, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400
    )
    assert_openai_error(
        post(
            client,
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "decoder": {"name": "temperature", "alpha": 0},
            },
        ),
        400,
        "decoder.alpha",
    )


def test_malformed_json_and_wrong_types(client: TestClient) -> None:
    resp = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_openai_error(resp, 400)
    assert_openai_error(client.post("/v1/completions", json=[1, 2, 3]), 400)
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    # ... and the server keeps serving afterwards
    assert post(client, "/v1/completions", {"model": MODEL, "prompt": "ok", "max_tokens": 1}).status_code == 200


def test_prompt_plus_max_tokens_over_context(client: TestClient, engine: TorchEngine) -> None:
    prompt = [5] * (MAX_MODEL_LEN - 4)
    err = assert_openai_error(
        post(client, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 10}), 400, "max_tokens"
    )
    assert err["code"] == "context_length_exceeded"
    # without max_tokens the budget shrinks to what fits
    ok = post(client, "/v1/completions", {"model": MODEL, "prompt": prompt}).json()
    assert ok["usage"]["completion_tokens"] <= 4


def test_api_key(engine: TorchEngine) -> None:
    with make_client(engine, api_key="sekret") as c:
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", "/v1/decoders"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
        ):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                resp = c.request(method, path, headers=headers, json={})
                err = assert_openai_error(resp, 401)
                assert err["type"] == "authentication_error"
        ok = c.post(
            "/v1/completions",
            headers={"Authorization": "Bearer sekret"},
            json={"model": MODEL, "prompt": "a", "max_tokens": 1},
        )
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200


async def _sample_ids(engine: TorchEngine, prompt: list[int], max_tokens: int, seed: int, temp: float) -> list[int]:
    spec = SamplingSpec(max_tokens=max_tokens, temperature=temp, seed=seed)
    return [s.token_id async for s in engine.generate(prompt, spec, EngineStats())]
