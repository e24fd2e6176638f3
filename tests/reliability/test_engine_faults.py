"""Faults found by fuzzing, kept as regression tests.

``temperature: 5e-324`` (valid: OpenAI allows 0 to 2) made the torch engine's sampling divide
logits by it, overflow to inf - inf = NaN and raise on the worker thread, outside the code that
hands errors back to callers: the request hung until its deadline, and so did every request
batched with it. Now a tiny temperature is greedy decoding, and a row whose sampling fails for
any reason ends with that error alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from powerserve.engine import sampling, scheduler
from powerserve.engine.base import EngineStats, SamplingSpec
from tests.reliability.support import MODEL, live

POISON_SEED = 666


async def test_a_failing_row_does_not_stall_its_batch(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    original = sampling.sample_rows

    def sample_rows(logits: Any, specs: list[SamplingSpec], generators: list[Any]) -> list[Any]:
        steps = original(logits, specs, generators)
        poison = RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return [poison if spec.seed == POISON_SEED else step for spec, step in zip(specs, steps, strict=True)]

    monkeypatch.setattr(scheduler, "sample_rows", sample_rows)

    async def generate(seed: int) -> list[int]:
        spec = SamplingSpec(max_tokens=16, temperature=1.0, seed=seed)
        return [s.token_id async for s in engine.generate([1, 2, 3], spec, EngineStats())]

    async with asyncio.timeout(30):
        results = await asyncio.gather(generate(1), generate(POISON_SEED), generate(2), return_exceptions=True)
    assert isinstance(results[1], RuntimeError)
    for good in (results[0], results[2]):
        assert isinstance(good, list) and 1 <= len(good) <= 16, good


@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300])
async def test_a_tiny_temperature_is_greedy(engine: Any, temperature: float) -> None:
    with live(engine) as srv:
        async with httpx.AsyncClient(base_url=srv.base, timeout=30) as client:
            body = {"model": MODEL, "prompt": "Greedy", "max_tokens": 8, "seed": 5}
            tiny, zero, normal = await asyncio.gather(
                client.post("/v1/completions", json={**body, "temperature": temperature}),
                client.post("/v1/completions", json={**body, "temperature": 0}),
                client.post("/v1/completions", json={**body, "temperature": 1}),
            )
    assert tiny.status_code == zero.status_code == normal.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == zero.json()["choices"][0]["text"]
