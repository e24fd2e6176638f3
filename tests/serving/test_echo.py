"""``echo`` on /v1/completions through the real app on the torch engine (tiny model, real
tokenizer): the echoed prompt log-probabilities equal a direct transformers forward of the
same model within 1e-4, the completion part is the one a plain request returns, and
lm-evaluation-harness's reading of the response (``token_logprobs[ctxlen:-1]``, greedy iff
each equals ``max(top_logprobs)``) gives the reference log-likelihood and greediness."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from powerserve.engine.torch_engine import TorchEngine
from tests.serving.tiny_app import MODEL

TOL = 1e-4
TEXT = "The quick brown fox jumps over the lazy dog because"


def reference(engine: TorchEngine, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:t]) for t = 1..len(ids)-1 from one plain forward: [T-1, V]."""
    with torch.no_grad():
        logits = engine.model(torch.tensor([ids])).logits[0].float()  # [T, V]
    return torch.log_softmax(logits[:-1], dim=-1)


def complete(client: TestClient, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/completions", json={"model": MODEL, **body})
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_echo_prompt_logprobs_match_transformers(client: TestClient, engine: TorchEngine) -> None:
    ids = engine.tokenizer.encode(TEXT)
    body = complete(client, prompt=TEXT, echo=True, logprobs=2, max_tokens=4, seed=7, temperature=0.8)
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    n = len(ids)
    ref = reference(engine, ids)
    expected = ref[torch.arange(n - 1), torch.tensor(ids[1:])].tolist()
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    got = lp["token_logprobs"][1:n]
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < TOL
    assert lp["tokens"][:n] == [engine.tokenizer.decode([t]) for t in ids]
    for t, row in enumerate(lp["top_logprobs"][1:n]):
        values, top_ids = ref[t].topk(2)
        want = {engine.tokenizer.decode([i]): v for i, v in zip(top_ids.tolist(), values.tolist(), strict=True)}
        assert set(row) == set(want) and all(abs(row[k] - want[k]) < TOL for k in want)

    # The completion part is exactly what the same request without echo returns.
    plain = complete(client, prompt=TEXT, logprobs=2, max_tokens=4, seed=7, temperature=0.8)["choices"][0]
    assert choice["text"] == TEXT + plain["text"]
    assert lp["tokens"][n:] == plain["logprobs"]["tokens"]
    assert lp["token_logprobs"][n:] == pytest.approx(plain["logprobs"]["token_logprobs"], abs=1e-6)
    assert lp["text_offset"][n:] == [len(TEXT) + o for o in plain["logprobs"]["text_offset"]]
    assert lp["text_offset"][:2] == [0, len(lp["tokens"][0])]
    usage = body["usage"]
    assert usage["prompt_tokens"] == n and usage["completion_tokens"] == len(lp["tokens"]) - n
    # The prompt scoring is counted: n - 1 scored twice (log p and top-k), in two calls.
    assert body["powerserve"]["tokens_scored"] >= 2 * (n - 1)


def test_echo_max_tokens_zero_only_scores(client: TestClient, engine: TorchEngine) -> None:
    ids = engine.tokenizer.encode(TEXT)
    body = complete(client, prompt=[ids, ids[:3]], echo=True, logprobs=0, max_tokens=0)
    first, second = body["choices"]
    assert first["text"] == engine.tokenizer.decode(ids) and first["finish_reason"] == "length"
    assert len(first["logprobs"]["token_logprobs"]) == len(ids) and first["logprobs"]["top_logprobs"] is None
    assert len(second["logprobs"]["token_logprobs"]) == 3
    ref = reference(engine, ids)
    total = math.fsum(ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist())
    assert math.fsum(first["logprobs"]["token_logprobs"][1:]) == pytest.approx(total, abs=len(ids) * TOL)
    assert body["usage"]["completion_tokens"] == 0
    assert body["powerserve"]["tokens_generated"] == 0
    assert body["powerserve"]["tokens_scored"] == len(ids) - 1 + 2


def test_lm_eval_reading_gives_loglikelihood_and_greediness(client: TestClient, engine: TorchEngine) -> None:
    """The harness's request (echo, logprobs 1, max_tokens 1, temperature 0) for a context and
    two continuations: the greedy continuation (built token by token from the reference argmax)
    reads as greedy with the reference log-likelihood; a non-greedy one reads as not greedy."""
    ctx = engine.tokenizer.encode("Once upon a time")
    greedy: list[int] = []
    for _ in range(3):
        greedy.append(int(reference(engine, [*ctx, *greedy, 0])[-1].argmax()))
    ref = reference(engine, [*ctx, *greedy])
    other = [int(ref[len(ctx) - 1].argsort()[-2]), *greedy[1:]]  # second choice first
    for cont, is_greedy in ((greedy, True), (other, False)):
        ids = [*ctx, *cont]
        body = complete(client, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
        lp = body["choices"][0]["logprobs"]
        tokens_lp, tops = lp["token_logprobs"][len(ctx) : -1], lp["top_logprobs"][len(ctx) : -1]
        ref = reference(engine, ids)
        want = ref[torch.arange(len(ctx) - 1, len(ids) - 1), torch.tensor(cont)].tolist()
        assert math.fsum(tokens_lp) == pytest.approx(math.fsum(want), abs=len(cont) * TOL)
        assert all(t == max(top.values()) for t, top in zip(tokens_lp, tops, strict=True)) == is_greedy


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0, "echo": False, "logprobs": 1}, "max_tokens"),
        ({"prompt": "hi", "echo": True, "stream": True}, "echo"),
        ({"prompt": "hi", "echo": True, "max_tokens": -1}, "max_tokens"),
    ],
)
def test_echo_bad_input_is_a_400(client: TestClient, body: dict[str, Any], param: str) -> None:
    resp = client.post("/v1/completions", json={"model": MODEL, **body})
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert param in (err["param"] or "") or param in err["message"]


def test_echo_without_logprobs_echoes_text(client: TestClient) -> None:
    body = complete(client, prompt=["Hello", "Bye now"], echo=True, max_tokens=2, seed=3)
    assert body["choices"][0]["text"].startswith("Hello")
    assert body["choices"][1]["text"].startswith("Bye now")
    assert body["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("decoder", ["standard", "temperature", "power_mcmc", "power_smc", "power_lookahead"])
def test_score_only_works_with_every_decoder(client: TestClient, engine: TorchEngine, decoder: str) -> None:
    """max_tokens 0 never reaches the decoder (its cost estimate and admission weight are 0),
    and the prompt part is the base model's whatever the decoder."""
    ids = engine.tokenizer.encode(TEXT)
    body = complete(client, prompt=ids, echo=True, logprobs=1, max_tokens=0, decoder=decoder)
    lp = body["choices"][0]["logprobs"]["token_logprobs"]
    ref = reference(engine, ids)
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].tolist()
    assert max(abs(a - b) for a, b in zip(lp[1:], expected, strict=True)) < TOL
    assert body["powerserve"]["decoder"] == decoder and body["powerserve"]["tokens_generated"] == 0
