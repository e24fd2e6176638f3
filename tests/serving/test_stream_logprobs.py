"""Log-probabilities in streamed chunks (torch engine, tiny model, real tokenizer): each chunk
carries its tokens' entries, and the stream adds up to the non-streamed response of the same
seeded request -- same text, same tokens, same log-probabilities -- on both endpoints, for a
token-streaming decoder and for one that answers only at the end."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.serving.tiny_app import MODEL

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def stream(client: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks), chunks
    return chunks


@pytest.mark.parametrize("decoder", ["standard", {"name": "power_mcmc", "alpha": 2, "block_size": 4, "mcmc_steps": 2}])
def test_completion_stream_carries_logprobs(client: TestClient, decoder: Any) -> None:
    body = {"model": MODEL, "prompt": "Once upon", "max_tokens": 8, "seed": 5, "logprobs": 2, "decoder": decoder}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = stream(client, "/v1/completions", body)
    text_chunks = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["logprobs"] is not None]
    assert "".join(c["text"] for c in text_chunks) == plain["text"]
    assert all(len(c["logprobs"]["tokens"]) == 1 for c in text_chunks)
    got = {key: [x for c in text_chunks for x in c["logprobs"][key]] for key in plain["logprobs"]}
    assert got["tokens"] == plain["logprobs"]["tokens"]
    assert got["text_offset"] == plain["logprobs"]["text_offset"]
    assert got["token_logprobs"] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-5)
    for row, want in zip(got["top_logprobs"], plain["logprobs"]["top_logprobs"], strict=True):
        assert set(row) == set(want) and all(row[k] == pytest.approx(want[k], abs=1e-5) for k in want)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == plain["finish_reason"] and finishes.count(None) == len(text_chunks)


def test_completion_stream_logprobs_with_stop_string(client: TestClient) -> None:
    """With a stop string the stream's text is cut where the non-streamed text is."""
    base = {"model": MODEL, "prompt": "a b c", "max_tokens": 16, "seed": 9, "logprobs": 0}
    first = client.post("/v1/completions", json=base).json()["choices"][0]["text"]
    stop = first[len(first) // 2 : len(first) // 2 + 2] or "x"
    body = {**base, "stop": [stop]}
    plain = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = stream(client, "/v1/completions", body)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert text == plain["text"]
    n = sum(len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks if c["choices"] and c["choices"][0]["logprobs"])
    assert n == len(plain["logprobs"]["tokens"])


def test_chat_stream_carries_logprobs(client: TestClient) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "seed": 2, "logprobs": True, "top_logprobs": 2}
    plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = stream(client, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    with_lp = [c for c in choices if c["logprobs"] is not None]
    assert "".join(c["delta"].get("content") or "" for c in choices) == plain["message"]["content"]
    assert choices[0]["delta"]["role"] == "assistant"
    content = [entry for c in with_lp for entry in c["logprobs"]["content"]]
    assert all(len(c["logprobs"]["content"]) == 1 for c in with_lp)
    want = plain["logprobs"]["content"]
    assert [e["token"] for e in content] == [e["token"] for e in want]
    assert [e["logprob"] for e in content] == pytest.approx([e["logprob"] for e in want], abs=1e-5)
    assert [len(e["top_logprobs"]) for e in content] == [2] * len(want)
    assert chunks[-1]["usage"]["completion_tokens"] == len(want)
