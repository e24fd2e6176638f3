"""End to end: the official ``openai`` client against a running server on the embedded model."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from powerserve.testing import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is 7 + 5?"}]


def ext(resp: Any) -> dict[str, Any]:
    """The powerserve extension object of an SDK response (kept by the SDK as an extra field)."""
    info = resp.model_extra["powerserve"]
    assert isinstance(info, dict)
    return info


def test_models_list_has_aliases(client: OpenAI, model: str) -> None:
    ids = [m.id for m in client.models.list().data]
    assert model == "SmolLM2-135M-Instruct"
    assert f"{model}:temperature" in ids


def test_chat_greedy_answers_the_question(client: OpenAI, model: str) -> None:
    resp = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=48, temperature=0)
    text = resp.choices[0].message.content or ""
    assert "12" in text, text
    info = ext(resp)
    assert info["decoder"] == "standard"
    assert info["self_reward"]["tokens"] == resp.usage.completion_tokens  # type: ignore[union-attr]
    assert info["self_reward"]["mean_logprob"] < 0


@pytest.mark.parametrize("decoder", ["standard", "temperature"])
def test_completion_each_decoder(client: OpenAI, model: str, server: ServerProcess, decoder: str) -> None:
    resp = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, seed=3, extra_body={"decoder": decoder}
    )
    info = ext(resp)
    assert info["decoder"] == decoder and info["engine"] == server.engine
    assert resp.usage is not None and resp.usage.completion_tokens >= 1
    assert info["tokens_generated"] >= resp.usage.completion_tokens
    assert info["cost_multiplier"] >= 1.0
    again = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=16, seed=3, extra_body={"decoder": decoder}
    )
    assert again.choices[0].text == resp.choices[0].text  # a request seed makes it reproducible


def test_temperature_raises_self_reward(client: OpenAI, model: str) -> None:
    """Sampling at 1/alpha concentrates on likely tokens: its mean log p per token is higher
    than standard sampling's (8 samples each, same prompts)."""

    def mean_reward(decoder: str) -> float:
        resp = client.completions.create(
            model=model,
            prompt="Write a sentence about the sea:",
            max_tokens=24,
            n=8,
            seed=1,
            extra_body={"decoder": decoder},
        )
        return float(ext(resp)["self_reward"]["mean_logprob"])

    assert mean_reward("temperature") > mean_reward("standard")


def test_model_alias_selects_decoder(client: OpenAI, model: str) -> None:
    resp = client.chat.completions.create(model=f"{model}:temperature", messages=QUESTION, max_tokens=8)
    assert ext(resp)["decoder"] == "temperature"
    assert ext(resp)["params"] == {"alpha": 4.0}


def test_streaming_chat_with_usage(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=32, stream=True, stream_options={"include_usage": True}, seed=2
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(deltas)
    assert ext(chunks[-1])["self_reward"]["tokens"] == chunks[-1].usage.completion_tokens


def test_bad_requests_are_openai_errors(client: OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="x", extra_body={"decoder": "nope"})
    assert "standard" in str(bad.value) and "temperature" in str(bad.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=model, prompt="x", extra_body={"decoder": {"name": "temperature", "alpha": 0.5}}
        )
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=10**7)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()


def test_client_disconnect_cancels_engine_work(server: ServerProcess, model: str) -> None:
    """A client that goes away mid-stream stops the engine work: the request is counted as
    cancelled and the server is idle again within seconds.

    The completion is sampled, and the model sometimes ends it at once (end-of-sequence
    first: the first text chunk is also the finish chunk). Such an attempt has nothing to
    cancel, so the test reads it to the end and tries the next seed, up to 5; only a hang-up
    before the finish counts."""
    for seed in range(5):
        body = {"model": model, "prompt": "Tell me a very long story.", "max_tokens": 900, "stream": True}
        if hang_up_mid_stream(server, {**body, "seed": seed}):
            break
    else:
        pytest.fail("5 seeds, and every completion ended at its first chunk")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.base}/metrics").text)}
        cancelled = sum(
            s.value
            for s in fams["powerserve_requests"].samples
            if s.labels.get("outcome") == "cancelled" and s.name.endswith("_total")
        )
        running = sum(s.value for s in fams["powerserve_requests_running"].samples)
        if cancelled >= 1 and running == 0:
            break
        time.sleep(0.25)
    assert cancelled >= 1 and running == 0
    if server.engine == "vllm":
        # vLLM's running-requests gauge is only refreshed while the engine steps, so watch its
        # token counter instead: an aborted request stops adding tokens (900 would take ~20 s).
        before = generation_tokens(server)
        time.sleep(3)
        assert generation_tokens(server) == before


def hang_up_mid_stream(server: ServerProcess, body: dict[str, Any]) -> bool:
    """Stream ``body`` and close the connection at the first text chunk; False when that chunk
    already finished the completion (then the stream is read to its end)."""
    with (
        httpx.Client(timeout=60) as http,
        http.stream("POST", f"{server.base}/v1/completions", json=body, headers=server.headers) as resp,
    ):
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: ") and '"text"' in line:
                if json.loads(line[len("data: ") :])["choices"][0]["finish_reason"] is None:
                    return True  # hang up (closing the stream)
                break
        for _ in lines:  # the rest of this stream (one iterator: a response streams once)
            pass
    return False


def generation_tokens(server: ServerProcess) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.base}/metrics").text)}
    return sum(s.value for s in fams["vllm:generation_tokens"].samples if s.name.endswith("_total"))


def test_metrics_are_decoder_labelled(server: ServerProcess, client: OpenAI, model: str) -> None:
    client.completions.create(model=model, prompt="hi", max_tokens=4, extra_body={"decoder": "temperature"})
    text = httpx.get(f"{server.base}/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    decoders = {s.labels.get("decoder") for s in fams["powerserve_request_latency_seconds"].samples}
    assert {"standard", "temperature"} <= decoders
    if server.engine == "vllm":
        assert any(name.startswith("vllm:") for name in fams), "vLLM's own metrics on the same page"


def test_power_mcmc_through_the_sdk(client: OpenAI, model: str) -> None:
    decoder = {"name": "power_mcmc", "alpha": 4, "block_size": 8, "mcmc_steps": 2}
    resp = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, seed=5, extra_body={"decoder": decoder}
    )
    assert resp.choices[0].message.content
    info = ext(resp)
    assert info["decoder"] == "power_mcmc"
    stats = info["decoder_stats"]
    for key in ("tokens_proposed", "tokens_accepted", "proposals", "acceptance_rate"):
        assert key in stats, key
    assert info["tokens_generated"] >= stats["tokens_proposed"] >= resp.usage.completion_tokens  # type: ignore[union-attr]
    assert info["cost_multiplier"] > 1.0
    # streamed: the answer arrives when the chain ends, then [DONE]
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=16, seed=5, stream=True, extra_body={"decoder": decoder}
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == resp.choices[0].message.content


def test_hanging_up_on_a_chain_cancels_it(server: ServerProcess, model: str) -> None:
    """A non-streaming power_mcmc request whose client gives up is stopped: counted as
    cancelled, and the engine stops generating for it."""
    headers = server.headers
    body = {
        "model": model,
        "prompt": "Tell me a story.",
        "max_tokens": 256,
        "decoder": {"name": "power_mcmc", "block_size": 64, "mcmc_steps": 50, "proposals": 1},
    }
    labels = {"decoder": "power_mcmc", "outcome": "cancelled"}
    before = counter(server, "powerserve_requests", labels)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base}/v1/completions", json=body, headers=headers, timeout=3)
    deadline = time.monotonic() + 5
    while counter(server, "powerserve_requests", labels) <= before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counter(server, "powerserve_requests", labels) == before + 1
    if server.engine == "vllm":
        tokens = generation_tokens(server)
        time.sleep(3)
        assert generation_tokens(server) == tokens


def counter(server: ServerProcess, name: str, labels: dict[str, str]) -> float:
    fams = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.base}/metrics").text)}
    return sum(
        s.value
        for s in fams[name].samples
        if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items())
    )
