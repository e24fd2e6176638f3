"""read_cost on real responses of the app, obtained through the official openai SDK."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from openai import OpenAI

from powerserve.engine.torch_engine import TorchEngine
from powerserve_client import Cost, power_mcmc, read_cost, standard, temperature
from tests.serving.conftest import MODEL, make_client


@pytest.fixture(scope="module")
def sdk(engine: TorchEngine) -> Iterator[OpenAI]:
    with make_client(engine) as http:
        yield OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)


def test_completion_cost_matches_the_raw_extension(sdk: OpenAI) -> None:
    resp = sdk.completions.create(
        model=MODEL, prompt="Hello", max_tokens=8, seed=1, extra_body=power_mcmc(alpha=2, block_size=4, mcmc_steps=2)
    )
    cost = read_cost(resp)
    assert isinstance(cost, Cost)
    raw = resp.model_extra["powerserve"] if resp.model_extra else {}
    assert cost.decoder == "power_mcmc"
    assert cost.params["alpha"] == 2 and cost.params["block_size"] == 4
    assert cost.engine_tokens == raw["tokens_generated"] + raw["tokens_scored"]
    assert cost.cost_multiplier == pytest.approx(cost.engine_tokens / resp.usage.completion_tokens)
    assert cost.acceptance_rate is not None and 0 <= cost.acceptance_rate <= 1
    assert cost.self_reward.tokens == resp.usage.completion_tokens
    assert [c.index for c in cost.choices] == [0]
    assert read_cost(resp.model_dump()) == cost  # a dict works too


def test_chat_and_the_last_stream_chunk_carry_the_cost(sdk: OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    chat = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, extra_body=temperature(alpha=2))
    cost = read_cost(chat)
    assert cost is not None and cost.decoder == "temperature" and cost.acceptance_rate is None
    chunks = list(
        sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, stream=True, extra_body=standard())
    )
    costs = [read_cost(c) for c in chunks]
    assert costs[-1] is not None and costs[-1].decoder == "standard"
    assert all(c is None for c in costs[:-1])


def test_a_response_without_the_extension_has_no_cost() -> None:
    assert read_cost({"id": "x", "choices": []}) is None
