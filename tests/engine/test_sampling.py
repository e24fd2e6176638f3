"""The torch engine's vectorised sampler (``engine/sampling.py``) against exact distributions."""

from __future__ import annotations

import math

import pytest
import torch

from powerserve.engine.base import SamplingSpec, TokenStep
from powerserve.engine.sampling import proposal_logprobs, sample_rows

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=torch.float64)
SPECS = [
    SamplingSpec(max_tokens=1),  # raw: q = p
    SamplingSpec(max_tokens=1, temperature=0.5),  # tempered: one shared pass
    SamplingSpec(max_tokens=1, temperature=1.5, top_k=3),  # truncated: its own pass
    SamplingSpec(max_tokens=1, temperature=0.8, top_p=0.7),
]


def exact_q(spec: SamplingSpec) -> torch.Tensor:
    return proposal_logprobs(LOGITS, spec.temperature, spec.top_k, spec.top_p).exp()


@pytest.mark.parametrize("spec", SPECS, ids=["raw", "tempered", "top_k", "top_p"])
def test_draws_follow_q_exactly(spec: SamplingSpec) -> None:
    """N = 5,000 draws, each row of a batch of 8 copies (40,000 tokens): every token's
    frequency is within 5 standard errors of q (the chance that a correct sampler fails this
    is below 1e-5), and never a token with q = 0. An off-by-one in the inverse CDF or q taken
    from the wrong rows moves some frequency by 0.05 or more, hundreds of standard errors."""
    n, batch = 5_000, 8
    gens = [torch.Generator().manual_seed(s) for s in range(batch)]
    logits = LOGITS.repeat(batch, 1).float()
    counts = torch.zeros(len(LOGITS))
    for _ in range(n):
        for step in sample_rows(logits, [spec] * batch, gens):
            assert isinstance(step, TokenStep)
            counts[step.token_id] += 1
    q = exact_q(spec)
    freq = counts / (n * batch)
    se = (q * (1 - q) / (n * batch)).sqrt()
    assert torch.all((freq - q).abs() <= 5 * se + 1e-12), (freq, q)
    assert torch.all(counts[q == 0] == 0)


def test_log_probabilities_are_exact_per_row() -> None:
    """logq and logp of each drawn token equal the one-row formulas in float64, whatever the
    other rows of the batch ask for."""
    gens = [torch.Generator().manual_seed(s) for s in range(len(SPECS))]
    steps = sample_rows(LOGITS.repeat(len(SPECS), 1), SPECS, gens)
    logp = torch.log_softmax(LOGITS, -1)
    for spec, step in zip(SPECS, steps, strict=True):
        assert isinstance(step, TokenStep)
        assert step.logp == pytest.approx(float(logp[step.token_id]), abs=1e-12)
        assert step.logq == pytest.approx(math.log(float(exact_q(spec)[step.token_id])), abs=1e-12)


def test_a_rows_draws_do_not_depend_on_its_batch() -> None:
    """200 steps of one seeded row alone and the same row beside three others (other specs,
    other logits): the same tokens, step for step."""
    alone_gen = torch.Generator().manual_seed(7)
    batch_gens = [torch.Generator().manual_seed(7), *(torch.Generator().manual_seed(s) for s in (1, 2, 3))]
    other = torch.randn(3, len(LOGITS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch_logits = torch.cat([LOGITS[None], other])
    for _ in range(200):
        (alone,) = sample_rows(LOGITS[None], [SPECS[1]], [alone_gen])
        together = sample_rows(batch_logits, [SPECS[1], SPECS[0], SPECS[2], SPECS[3]], batch_gens)
        assert isinstance(alone, TokenStep) and isinstance(together[0], TokenStep)
        assert alone.token_id == together[0].token_id


def test_a_nan_row_fails_alone() -> None:
    logits = LOGITS.repeat(3, 1)
    logits[1, 2] = float("nan")
    steps = sample_rows(logits, SPECS[:3], [torch.Generator().manual_seed(s) for s in range(3)])
    assert isinstance(steps[0], TokenStep) and isinstance(steps[2], TokenStep)
    assert isinstance(steps[1], RuntimeError)
