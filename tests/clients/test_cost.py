"""read_cost on real responses of the app, obtained through the official openai SDK."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI

from powerserve.engine.torch_engine import TorchEngine
from powerserve.protocol import ChoiceCost as ServerChoiceCost
from powerserve.protocol import PowerserveInfo
from powerserve.protocol import SelfReward as ServerSelfReward
from powerserve_client import Cost, power_mcmc, read_cost, standard, temperature
from powerserve_client.cost import ChoiceCost, SelfReward
from tests.serving.tiny_app import MODEL, make_client


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


@pytest.mark.parametrize(
    ("client_cls", "server_cls"),
    [(Cost, PowerserveInfo), (SelfReward, ServerSelfReward), (ChoiceCost, ServerChoiceCost)],
)
def test_the_client_types_name_every_field_the_server_sends(client_cls: type, server_cls: Any) -> None:
    """A field the server adds to its ``powerserve`` object (or drops) must reach the client type."""
    assert {f.name for f in dataclasses.fields(client_cls)} == set(server_cls.model_fields)


def _assert_same(client: Any, server: Any) -> None:
    """Every field of the client's dataclass equals the server model's field of the same name."""
    for f in dataclasses.fields(client):
        ours, theirs = getattr(client, f.name), getattr(server, f.name)
        if dataclasses.is_dataclass(ours):
            _assert_same(ours, theirs)
        elif isinstance(ours, list):
            assert len(ours) == len(theirs), f.name
            for a, b in zip(ours, theirs, strict=True):
                _assert_same(a, b)
        else:
            assert ours == theirs, f.name


@pytest.mark.parametrize(
    "extra_body",
    [power_mcmc(alpha=2, block_size=4, mcmc_steps=2), temperature(alpha=3), standard()],
    ids=["power_mcmc", "temperature", "standard"],
)
def test_cost_fields_equal_the_servers_powerserve_info(sdk: OpenAI, extra_body: dict[str, Any]) -> None:
    """read_cost on a real response gives, field by field, what the server's PowerserveInfo holds."""
    resp = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=6, n=2, seed=3, extra_body=extra_body)
    raw = resp.model_extra["powerserve"] if resp.model_extra else None
    assert raw is not None
    cost = read_cost(resp)
    assert cost is not None
    _assert_same(cost, PowerserveInfo.model_validate(raw))
