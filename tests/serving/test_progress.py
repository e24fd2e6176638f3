"""Streams of decoders that answer late: progress comments, the OpenAI SDK's parser, and
``power_smc`` text that arrives before its run ends.

The stream is read in order through the real app (the test client buffers, but keeps the
order of events): a progress comment is written by a timer while the decoder runs, so a content
chunk that comes before some progress comment was sent before the run ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
from openai import OpenAI

from powerserve import metrics
from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep
from powerserve.engine.torch_engine import TorchEngine
from powerserve.serving.streaming import PROGRESS_PREFIX
from tests.serving.tiny_app import MAX_MODEL_LEN, MODEL, make_client, tiny_serving_model
from tests.tabular_engine import TabularEngine

FAST = {"progress_interval_s": 0.02}


def events(body: str) -> list[tuple[str, Any]]:
    """("progress", obj), ("keepalive", None), ("data", obj) or ("done", None), in order."""
    out: list[tuple[str, Any]] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        assert "\n" not in block, block  # every event is one line
        if block.startswith(PROGRESS_PREFIX):
            out.append(("progress", json.loads(block[len(PROGRESS_PREFIX) :])))
        elif block == ": keep-alive":
            out.append(("keepalive", None))
        elif block == "data: [DONE]":
            out.append(("done", None))
        else:
            assert block.startswith("data: "), block
            out.append(("data", json.loads(block[6:])))
    return out


class BlockStub(Decoder):
    """Answers at the end, after ``blocks`` blocks of 4 MH steps, keeping power_mcmc's live
    progress counters in ``stats.extra`` (and spending one engine token per step)."""

    name = "block_stub"
    description = "test stub"
    params_model = DecoderParams
    streams_tokens: ClassVar[bool] = False
    blocks = 3

    async def decode(self, request: DecodeRequest, stats: EngineStats) -> AsyncIterator[TokenStep]:
        stats.extra.update(blocks_total=self.blocks, blocks_done=0, mh_steps_total=4 * self.blocks, mh_steps_done=0)
        for block in range(self.blocks):
            for _ in range(4):
                await asyncio.sleep(0.02)
                stats.tokens_generated += 1
                stats.extra["mh_steps_done"] += 1
            stats.extra["blocks_done"] = block + 1
        for token in (28, 29, 30):
            yield TokenStep(token_id=token, logq=-1.0, logp=-1.0)


def test_block_progress_of_a_decoder_that_answers_at_the_end(engine: TorchEngine) -> None:
    with make_client(engine, **FAST) as client:
        client.app.state.powerserve.decoders["block_stub"] = BlockStub(engine)  # type: ignore[attr-defined]
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "decoder": "block_stub", "stream": True}
        r = client.post("/v1/completions", json=body)
    assert r.status_code == 200
    evs = events(r.text)
    progress = [obj for kind, obj in evs if kind == "progress"]
    assert len(progress) >= 5, evs  # about 12 x 20 ms of work, one comment per 20 ms
    first_data = next(i for i, (kind, _) in enumerate(evs) if kind == "data")
    assert all(kind == "progress" for kind, _ in evs[:first_data])  # nothing else before the answer
    blocks = [p["choices"][0]["blocks_done"] for p in progress]
    steps = [p["choices"][0]["mh_steps_done"] for p in progress]
    assert blocks == sorted(blocks) and steps == sorted(steps) and blocks[-1] >= 2 and steps[-1] >= 8
    for p in progress:
        (choice,) = p["choices"]
        assert choice["index"] == 0 and choice["blocks_total"] == 3 and choice["mh_steps_total"] == 12
        assert choice["engine_tokens"] == choice["mh_steps_done"]  # one token per step in the stub
        assert choice["tokens_out"] == (0 if choice["blocks_done"] < 3 else 3)  # released at the end
    assert [p["elapsed_s"] for p in progress] == sorted(p["elapsed_s"] for p in progress)
    assert evs[-1] == ("done", None)


MCMC = {"name": "power_mcmc", "alpha": 4, "block_size": 4, "mcmc_steps": 3}


def test_power_mcmc_progress_counts_proposals_and_engine_tokens(engine: TorchEngine) -> None:
    with make_client(engine, **FAST) as client:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "decoder": MCMC, "stream": True}
        r = client.post("/v1/completions", json={**body, "seed": 3})
    evs = events(r.text)
    progress = [obj["choices"][0] for kind, obj in evs if kind == "progress"]
    assert progress, "no progress comment"
    final = next(obj for kind, obj in evs if kind == "data" and obj.get("powerserve"))["powerserve"]
    spent = [p["engine_tokens"] for p in progress]
    assert spent == sorted(spent) and 0 < spent[-1] <= final["tokens_generated"] + final["tokens_scored"]
    with_proposals = [p for p in progress if p.get("proposals")]
    assert with_proposals, progress
    for p in with_proposals:
        assert p["proposals"] <= final["decoder_stats"]["proposals"]
        assert 0.0 <= p["acceptance_rate"] <= 1.0


def test_the_openai_sdk_parses_a_stream_with_progress_unchanged(engine: TorchEngine) -> None:
    """The SDK's SSE parser skips the comments: the streamed text equals the non-streamed one."""
    with make_client(engine, **FAST) as client:
        sdk = OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is 7 + 5?"}],
            "max_tokens": 16,
            "seed": 11,
            "extra_body": {"decoder": MCMC},
        }
        whole = sdk.chat.completions.create(**kwargs)
        chunks = list(sdk.chat.completions.create(stream=True, **kwargs))
        raw = client.post("/v1/chat/completions", json={**kwargs.pop("extra_body"), **kwargs, "stream": True})
    assert any(kind == "progress" for kind, _ in events(raw.text))  # there were comments to skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].model_extra is not None and "powerserve" in chunks[-1].model_extra


class SlowEngine(TorchEngine):
    """The tiny model, 20 ms per sampled token: long enough for progress comments between."""

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        async for step in super().generate(prompt_ids, spec, stats):
            await asyncio.sleep(0.02)
            yield step


@pytest.fixture(scope="module")
def slow_engine(tokenizer: Any) -> SlowEngine:
    model = tiny_serving_model(tokenizer)
    eos = frozenset([tokenizer.eos_token_id])
    return SlowEngine(model, tokenizer, model_name=MODEL, max_model_len=MAX_MODEL_LEN, eos_token_ids=eos)


SMC = {"name": "power_smc", "alpha": 4, "particles": 4, "resample_interval": 2, "ess_threshold": 1.0}


def test_power_smc_sends_text_before_its_run_ends(slow_engine: SlowEngine) -> None:
    """Content chunks arrive before a progress comment that still counts engine work to do, and
    the streamed answer is the non-streamed one for the same seed. Seeds 0-4 on the tiny model;
    each must stream at least one chunk early (the particles coalesce on this prompt)."""
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "decoder": SMC}
    labels = ("power_smc", MODEL)
    with make_client(slow_engine, **FAST) as client:
        for seed in range(5):
            before = len(metrics.RECENT.values("streamed_fraction", "power_smc"))
            whole = client.post("/v1/completions", json={**body, "seed": seed}).json()
            evs = events(client.post("/v1/completions", json={**body, "seed": seed, "stream": True}).text)
            final = next(obj for kind, obj in evs if kind == "data" and obj.get("powerserve"))["powerserve"]
            spent = final["tokens_generated"] + final["tokens_scored"]
            # The last progress comment written while engine work was still to be done:
            working = [i for i, (kind, obj) in enumerate(evs) if kind == "progress" and obj["choices"]]
            working = [i for i in working if evs[i][1]["choices"][0]["engine_tokens"] < spent]
            early = [obj for kind, obj in evs[: max(working)] if kind == "data" and obj["choices"][0]["text"]]
            assert early, (seed, evs)
            text = "".join(obj["choices"][0]["text"] for kind, obj in evs if kind == "data" and obj["choices"])
            assert text == whole["choices"][0]["text"]
            fractions = metrics.RECENT.values("streamed_fraction", "power_smc")[before:]
            assert len(fractions) == 2 and fractions[0] == fractions[1] > 0  # same seed: same share
    assert metrics.STREAMED_FRACTION.labels(*labels)._sum.get() > 0  # type: ignore[attr-defined]


def test_keep_alive_is_unchanged_for_token_streaming_decoders(engine: TorchEngine) -> None:
    with make_client(engine, **FAST) as client:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "decoder": "standard", "stream": True}
        evs = events(client.post("/v1/completions", json=body).text)
    assert not any(kind == "progress" for kind, _ in evs)
    assert evs[-1] == ("done", None)


class ForcedEngine(TabularEngine):
    """The real tokenizer over a table that makes ``text``'s tokens (then EOS) all but certain:
    every power_smc particle follows them, so the whole answer is decided, and streamed, as it
    is sampled, in ``resample_interval`` bursts that cut multi-byte characters apart."""

    def __init__(self, tokenizer: Any, text: str) -> None:
        self.forced = [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
        self.vocab = len(tokenizer)
        super().__init__(self.table, frozenset([tokenizer.eos_token_id]), max_model_len=MAX_MODEL_LEN)
        self.tokenizer = tokenizer
        self.model_name = MODEL
        self.prompt_len: int | None = None

    def table(self, prefix: tuple[int, ...]) -> np.ndarray:
        t = len(prefix) - (self.prompt_len or 0)
        logp = np.full(self.vocab, -40.0)
        logp[self.forced[min(t, len(self.forced) - 1)]] = 0.0
        return logp

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        if self.prompt_len is None:
            self.prompt_len = len(prompt_ids)
        async for step in super().generate(prompt_ids, spec, stats):
            yield step


@pytest.mark.parametrize("stream", [True, False])
def test_power_smc_streamed_prefix_keeps_multibyte_characters_and_stops(tokenizer: Any, stream: bool) -> None:
    """Three-byte characters split over three tokens each, and a stop string inside the decided
    prefix: no replacement character in any chunk, text cut before the stop string."""
    engine = ForcedEngine(tokenizer, "Voilà 語 and 🦜 ok STOP more text")
    smc = {"name": "power_smc", "particles": 4, "resample_interval": 2}
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 30, "decoder": smc, "stop": ["STOP"], "seed": 1}
    with make_client(engine, **FAST) as client:
        r = client.post("/v1/completions", json={**body, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        chunks = [obj["choices"][0] for kind, obj in events(r.text) if kind == "data" and obj["choices"]]
        texts = [c["text"] for c in chunks if c["text"]]
        assert len(texts) >= 3 and not any("\ufffd" in t for t in texts)
        text, finish = "".join(texts), chunks[-1]["finish_reason"]
    else:
        text, finish = r.json()["choices"][0]["text"], r.json()["choices"][0]["finish_reason"]
    assert text == "Voilà 語 and 🦜 ok "
    assert finish == "stop"
