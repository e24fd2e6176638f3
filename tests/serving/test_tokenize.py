"""``/tokenize``, ``/detokenize``, ``/tokenizer_info`` in vLLM's shapes, through the real app:
the ids are those the completion endpoints use (checked against the tokenizer and against
``usage.prompt_tokens``), and bad input is an OpenAI-shaped 4xx."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from powerserve.engine.torch_engine import TorchEngine
from tests.serving.tiny_app import MAX_MODEL_LEN, MODEL, make_client

MESSAGES = [{"role": "user", "content": "What is 7 + 5?"}]


def test_tokenize_text(client: TestClient, engine: TorchEngine) -> None:
    text = "The capital of France is"
    body = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True})
    assert body.status_code == 200, body.text
    out = body.json()
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    assert out == {
        "count": len(ids),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": ids,
        "token_strs": engine.tokenizer.convert_ids_to_tokens(ids),
    }
    assert client.post("/detokenize", json={"tokens": ids, "model": MODEL}).json() == {"prompt": text}


def test_tokenize_chat_matches_chat_completions(client: TestClient) -> None:
    out = client.post("/tokenize", json={"messages": MESSAGES}).json()
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1}).json()
    assert out["count"] == len(out["tokens"]) == chat["usage"]["prompt_tokens"]
    text = client.post("/detokenize", json={"tokens": out["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>assistant\n") and "What is 7 + 5?" in text
    open_ended = client.post(
        "/tokenize", json={"messages": MESSAGES, "add_generation_prompt": False, "continue_final_message": True}
    ).json()
    assert open_ended["count"] < out["count"]


def test_tokenizer_info(client: TestClient, engine: TorchEngine) -> None:
    info = client.get("/tokenizer_info").json()
    tok = engine.tokenizer
    assert info["eos_token"] == tok.eos_token and info["bos_token"] == tok.bos_token
    assert info["chat_template"] == tok.chat_template
    assert info["tokenizer_class"] == type(tok).__name__
    assert "name_or_path" not in info  # no server file paths


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens.0"),
        ("/detokenize", {"tokens": [1] * (MAX_MODEL_LEN + 1)}, 400, "tokens"),
        ("/tokenize", {"prompt": "x", "model": "other"}, 404, "model"),
        ("/tokenize", {"prompt": "x" * 10**6}, 400, "prompt"),
        ("/tokenize", {"prompt": "\ud800"}, 400, "prompt"),
        ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
        ("/tokenize", {"messages": []}, 400, None),
        ("/tokenize", {}, 400, None),
    ],
)
def test_bad_input_is_a_4xx(client: TestClient, path: str, body: Any, status: int, param: str | None) -> None:
    headers = {"content-type": "application/json"}
    resp = client.post(path, content=json.dumps(body), headers=headers)  # ASCII JSON: lone surrogates as escapes
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param


def test_api_key_guards_them(engine: TorchEngine) -> None:
    with make_client(engine, api_key="k") as c:
        assert c.get("/tokenizer_info").status_code == 401
        assert c.post("/tokenize", json={"prompt": "x"}).status_code == 401
        ok = c.post("/tokenize", json={"prompt": "x"}, headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
