"""The long-answer benchmark's reference-style baseline (``benchmarks/mcmc_baselines.py``) is the
chain it claims to be, and its replay and counting helpers record what ran.

Exactness. On the tiny random Llama of ``test_power_mcmc_exact``'s ``alpha4`` case (vocabulary
of 4, EOS = 0, prompt [2], max_tokens 3, alpha 4: p^alpha puts 0.58 on [EOS] and 0.42 on [3, EOS],
which temperature 1/alpha ranks the other way, 0.23 / 0.76), N = 200 baseline chains (seeds
0..199, one block of 3 tokens, 20 MH steps) must land within TV 0.15 of the enumerated p^alpha.
That chain is the K = 1 chain of ``power_mcmc``, whose exact law after 20 steps is 0.004 from
p^alpha; at N = 200 its empirical TV has mean 0.029 and 99.9% quantile 0.111 (figures from
``test_power_mcmc_exact``'s docstring), hence the tolerance 0.15. The plausible bugs fail it:
with 0 MH steps (temperature 1/alpha) the same 200 seeds give TV 0.36 (asserted > 0.15 here),
and a baseline that took log p from the processed scores and log q from the raw logits (swapped
``output_scores`` / ``output_logits``) gave TV 0.57 on the same seeds when run by hand, where the
correct chain gave 0.036. That swap is caught here without the cost of another 200 chains:
:func:`test_proposal_carries_exact_logp_and_logq` checks every token's log p and log q against
the enumerated tables.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch
from benchmarks.mcmc_baselines import CountingModel, proposal, reference_style_chain, replay_plain_generate

from tests.tabular_engine import enumerate_continuations, model_table, power_distribution, tempered, total_variation
from tests.tiny_model import make_tiny_llama

PROMPT = (2,)
ALPHA = 4.0
MAX_TOKENS = 3
STEPS = 20
N = 200
TOLERANCE = 0.15
EOS = [0]


@pytest.fixture(scope="module")
def model() -> Any:
    return make_tiny_llama(vocab_size=4, eos_token_id=0, seed=10, logit_scale=1.0)


def target(model: Any) -> dict[tuple[int, ...], float]:
    logp = enumerate_continuations(model_table(model), PROMPT, frozenset(EOS), MAX_TOKENS)
    return power_distribution(logp, ALPHA)


def chain_law(model: Any, steps: int) -> dict[tuple[int, ...], float]:
    runs = [
        tuple(reference_style_chain(model, PROMPT, EOS, MAX_TOKENS, ALPHA, MAX_TOKENS, steps, seed).output)
        for seed in range(N)
    ]
    return {x: c / N for x, c in Counter(runs).items()}


def test_proposal_carries_exact_logp_and_logq(model: Any) -> None:
    table = model_table(model)
    for seed in range(20):
        torch.manual_seed(seed)
        new, logp, logq = proposal(model, PROMPT, MAX_TOKENS, ALPHA, EOS)
        assert 1 <= len(new) == len(logp) == len(logq) <= MAX_TOKENS
        prefix: tuple[int, ...] = PROMPT
        for tok, lp, lq in zip(new, logp, logq, strict=True):
            raw = table(prefix)
            assert lp == pytest.approx(raw[tok], abs=1e-4)
            assert lq == pytest.approx(tempered(raw, 1 / ALPHA)[tok], abs=1e-4)
            prefix = (*prefix, tok)


def test_baseline_samples_p_alpha(model: Any) -> None:
    exact = target(model)
    assert total_variation(chain_law(model, STEPS), exact) < TOLERANCE
    assert total_variation(chain_law(model, 0), exact) > TOLERANCE  # temperature 1/alpha: caught


def test_calls_are_recorded_and_replayed_at_the_same_lengths(model: Any) -> None:
    run = reference_style_chain(model, (2, 3, 1), EOS, 8, ALPHA, 4, 3, seed=5)
    blocks = math.ceil(len(run.output) / 4)
    assert len(run.calls) <= blocks * 4  # at most one extension and 3 proposals per block
    assert all(call.context[:3] == (2, 3, 1) for call in run.calls)
    assert run.prefilled == sum(len(c.context) for c in run.calls)
    counting = CountingModel(model)
    assert replay_plain_generate(counting, run.calls, ALPHA) > 0
    assert [c.generated for c in counting.calls] == [c.generated for c in run.calls if c.generated]
    assert [c.context for c in counting.calls] == [c.context for c in run.calls if c.generated]


def test_counting_model_forwards_and_counts(model: Any) -> None:
    counting = CountingModel(model)
    assert counting.config is model.config
    ids = torch.tensor([[2, 1]])
    out = counting.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 5)
    assert [(c.context, c.generated) for c in counting.calls] == [((2, 1), 3)]
