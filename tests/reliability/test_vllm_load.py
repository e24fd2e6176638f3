"""Concurrent load on the vLLM engine (issue 12): ``powerserve serve --engine vllm`` on the
embedded model, one server for the module (``--max-model-len 1024``, eager mode).

Before the fix, 40 concurrent seeded requests with ~100-token prompts killed vLLM's engine core
on CPU (chunked prefill split a seeded prompt; vLLM then rewinds the request's generator, which
a CPU generator cannot do) and every request got a 500.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from benchmarks.load_mix import RequestMix, burst, token_prompt

from powerserve.engine.factory import vllm_available
from powerserve.model_store import ensure_embedded_checkpoint
from tests.reliability.support import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_MODEL_LEN = 1024
BURST = 64  # requests of the mixed burst, all in flight at once
SERVER_ARGS = ["--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager"]
# Admission would queue (and past its queue refuse with 429) the heavier decoders of the burst.
SERVER_ARGS += ["--max-running-weight", "512", "--max-queued-weight", "4096"]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not vllm_available():
        pytest.fail("vLLM is not installed: run scripts/setup.sh")
    log = tmp_path_factory.mktemp("vllm-load") / "server.log"
    with pytest.MonkeyPatch.context() as env:
        # vLLM on CPU reserves this many GiB of KV cache (its default, ~7 GiB, crowds a CI machine).
        env.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"))
        srv = ServerProcess(model=None, engine="vllm", extra_args=SERVER_ARGS, log_path=log)
    try:
        srv.wait_ready(timeout_s=300)
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_embedded_checkpoint()))


@pytest.fixture(scope="module")
def model(vllm_server: ServerProcess) -> str:
    name: str = httpx.get(f"{vllm_server.base}/v1/models", timeout=10).json()["data"][0]["id"]
    return name


def assert_alive(srv: ServerProcess) -> None:
    assert srv.proc.poll() is None, f"the server exited:\n{srv.log_tail()}"
    health = httpx.get(f"{srv.base}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}, health.text


def seeded_bodies(tokenizer: Any, model: str, n: int) -> list[dict[str, Any]]:
    """The issue's reproduction: ``n`` seeded requests, ~100-token text prompts, max_tokens 8."""
    return [
        {
            "model": model,
            "prompt": tokenizer.decode(token_prompt(tokenizer, 100, salt=i)),
            "max_tokens": 8,
            "seed": 7 + i,
        }
        for i in range(n)
    ]


async def post_all(base: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
        return list(await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies)))


def test_forty_concurrent_seeded_requests(vllm_server: ServerProcess, tokenizer: Any, model: str) -> None:
    """40 seeded requests at once (4,000 prompt tokens, twice vLLM's default 2,048-token step
    budget, so chunked prefill would split some prompts): 40 x 200 and a live engine. Each seeded
    answer is then asked for again, alone: the same text (seeded answers stay reproducible)."""
    bodies = seeded_bodies(tokenizer, model, 40)
    responses = asyncio.run(post_all(vllm_server.base, bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 40, [r.text[:300] for r in responses if r.status_code != 200][:3]
    assert_alive(vllm_server)
    texts = [r.json()["choices"][0]["text"] for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in responses)
    again = asyncio.run(post_all(vllm_server.base, bodies[:8]))
    assert [r.json()["choices"][0]["text"] for r in again] == texts[:8]


def test_mixed_load_every_decoder(vllm_server: ServerProcess, tokenizer: Any, model: str) -> None:
    """BURST requests at once (benchmarks/load_mix.py): all five decoders with cheap parameters,
    half seeded, prompts of 10 to 250 tokens and five of max_model_len - 24 = 1000 tokens
    (max_tokens 4). Every request is answered 200 (no 5xx, no 429) and /health is ok afterwards."""
    mix = RequestMix(tokenizer, MAX_MODEL_LEN)
    report = asyncio.run(burst(vllm_server.base, mix, BURST, model))
    assert report.server_errors == 0, report.table()
    assert dict(report.statuses) == {200: BURST}, report.table()
    assert {name for name, lat in report.latencies.items() if lat} == {
        "standard",
        "temperature",
        "power_mcmc",
        "power_smc",
        "power_lookahead",
    }
    assert_alive(vllm_server)


def test_mix_covers_long_and_seeded_prompts(tokenizer: Any) -> None:
    """The burst above really holds prompts near max_model_len, seeded and unseeded requests,
    text and token-id prompts (so the load test cannot silently shrink)."""
    mix = RequestMix(tokenizer, MAX_MODEL_LEN)
    bodies = [mix.body(i, "m") for i in range(BURST)]
    lengths = [
        len(b["prompt"]) if isinstance(b["prompt"], list) else len(tokenizer(b["prompt"])["input_ids"])
        for _, b in bodies
    ]
    assert max(lengths) == MAX_MODEL_LEN - 24 and min(lengths) <= 12
    assert sum(n >= 1000 for n in lengths) >= 5
    assert {name for (name, _), n in zip(bodies, lengths, strict=True) if n >= 1000} == {
        "standard",
        "temperature",
        "power_mcmc",
        "power_smc",
        "power_lookahead",
    }
    assert sum("seed" in b for _, b in bodies) == BURST // 2
    assert {type(b["prompt"]) for _, b in bodies} == {str, list}
    assert all(len_ + b["max_tokens"] <= MAX_MODEL_LEN for len_, (_, b) in zip(lengths, bodies, strict=True))
