"""The ``temperature`` decoder on the torch engine, against the exact next-token distribution."""

from __future__ import annotations

import math

import pytest
import torch

from powerserve.decoders.base import DecodeRequest, OpenAISampling
from powerserve.decoders.temperature import TemperatureDecoder, TemperatureParams
from powerserve.engine.base import EngineStats
from powerserve.engine.torch_engine import TorchEngine
from tests.tiny_model import make_tiny_llama

VOCAB = 6
PROMPT = (1, 2)
ALPHA = 3.0


async def test_next_token_distribution_is_p_to_the_alpha() -> None:
    """N = 2000 one-token draws (seeds 0..N-1) against softmax(alpha * log p), alpha = 3.

    Tolerance: by the Bretagnolle-Huber-Carol inequality, the empirical distribution of N
    draws over V outcomes satisfies P(sum_i |hat p_i - p_i| >= eps) <= (2^V - 2) exp(-N eps^2 / 2).
    With V = 6 and a failure probability of 1e-3 that gives eps = 0.105, i.e. total variation
    < 0.053. The raw model (alpha = 1) is at total variation 0.31 from the target here, so a
    decoder that ignored alpha (or used it the wrong way round) fails the test.
    """
    n, delta = 2000, 1e-3
    tolerance = 0.5 * math.sqrt(2 * math.log((2**VOCAB - 2) / delta) / n)

    model = make_tiny_llama(vocab_size=VOCAB, eos_token_id=0, seed=2, logit_scale=0.5)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT])).logits[0, -1].double()
    log_p = torch.log_softmax(logits, -1)
    target = torch.softmax(ALPHA * log_p, -1)
    assert 0.5 * (target - log_p.exp()).abs().sum() > 2 * tolerance, "test cannot tell alpha from 1"

    engine = TorchEngine(model, None, model_name="tiny", max_model_len=16, eos_token_ids=frozenset({0}))
    decoder = TemperatureDecoder(engine)
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    stats = EngineStats()
    try:
        for seed in range(n):
            request = DecodeRequest(
                prompt_ids=PROMPT,
                max_tokens=1,
                seed=seed,
                sampling=OpenAISampling(),
                params=TemperatureParams(alpha=ALPHA),
            )
            steps = [step async for step in decoder.decode(request, stats)]
            assert len(steps) == 1
            counts[steps[0].token_id] += 1
            assert steps[0].logq == pytest.approx(float(torch.log(target[steps[0].token_id])), abs=1e-5)
    finally:
        await engine.shutdown()

    empirical = counts / n
    tv = 0.5 * float((empirical - target).abs().sum())
    assert tv < tolerance, f"TV {tv:.4f} >= {tolerance:.4f}: {empirical.tolist()} vs {target.tolist()}"
    assert stats.calls == n and stats.tokens_generated == n
