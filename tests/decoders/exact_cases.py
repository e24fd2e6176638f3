"""The enumerable tiny-model cases of the exactness tests, shared by the power decoders' tests:
the models, exact p^alpha, the chain's exact kernel, the broken variants that must fail and
the helpers that run many seeded chains (the tolerances and sample sizes are argued in
``test_power_mcmc_exact``'s docstring)."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcParams
from powerserve.engine.base import Engine, EngineStats, TokenStep
from tests.tabular_engine import (
    TabularEngine,
    enumerate_continuations,
    model_table,
    power_distribution,
    tempered,
)
from tests.tiny_model import make_tiny_llama

EOS = frozenset({0})
MAX_TOKENS = 3
MCMC_STEPS = 20
STEPS = {1: 20, 2: 10, 4: 6, 8: 4}  # steps per K: the K = 8 chain mixes in fewer steps
N_BROKEN = 1000
N_CHAINS = 2000
TOLERANCE = 0.08
N_TORCH = 200
TOLERANCE_TORCH = 0.15

Dist = dict[tuple[int, ...], float]
Acceptance = Callable[[float, Sequence[float], Sequence[float], Sequence[float], Sequence[float], int, int], float]


@dataclass(frozen=True)
class Case:
    vocab_size: int
    seed: int
    logit_scale: float
    prompt: tuple[int, ...]
    alpha: float


RICH = Case(vocab_size=3, seed=3, logit_scale=1.0, prompt=(2,), alpha=2.0)
SHARP = Case(vocab_size=4, seed=10, logit_scale=1.0, prompt=(2,), alpha=4.0)
CASES = [pytest.param(RICH, id="alpha2"), pytest.param(SHARP, id="alpha4")]


@dataclass
class Setup:
    case: Case
    model: object
    table: Callable[[tuple[int, ...]], np.ndarray]
    target: Dist  # p^alpha / Z
    temperature: Dist  # token-level sampling at 1/alpha

    def params(self, proposals: int = 1) -> PowerMcmcParams:
        return PowerMcmcParams(
            alpha=self.case.alpha, block_size=MAX_TOKENS, mcmc_steps=STEPS[proposals], proposals=proposals
        )


@cache
def setup(case: Case) -> Setup:
    model = make_tiny_llama(vocab_size=case.vocab_size, eos_token_id=0, seed=case.seed, logit_scale=case.logit_scale)
    table = model_table(model)
    logp = enumerate_continuations(table, case.prompt, EOS, MAX_TOKENS)
    logq = enumerate_continuations(table, case.prompt, EOS, MAX_TOKENS, 1.0 / case.alpha)
    return Setup(case, model, table, power_distribution(logp, case.alpha), {k: math.exp(v) for k, v in logq.items()})


# --- the exact kernel of one block, for the noise-free checks ---------------------------------


def token_logprobs(s: Setup, x: tuple[int, ...]) -> tuple[list[float], list[float]]:
    """Per-token raw log p and proposal log q (temperature 1/alpha) along continuation x."""
    logp, logq = [], []
    for t, tok in enumerate(x):
        raw = s.table((*s.case.prompt, *x[:t]))
        logp.append(float(raw[tok]))
        logq.append(float(tempered(raw, 1 / s.case.alpha)[tok]))
    return logp, logq


def chain_distribution(s: Setup, acceptance: Acceptance, steps: int) -> Dist:
    """Exact distribution of a one-block chain after ``steps`` MH steps (start: one q sample).

    K(x, y) = sum over i < min(n(x), n(y)) with y[:i] = x[:i] of
              (1/n(x)) * q(y[i:] | y[:i]) * min(1, exp(acceptance(...))),  K(x, x) = 1 - rest.
    """
    states = list(s.target)
    logp, logq = {}, {}
    for x in states:
        logp[x], logq[x] = token_logprobs(s, x)
    kernel = np.zeros((len(states), len(states)))
    for a, x in enumerate(states):
        for b, y in enumerate(states):
            for i in range(min(len(x), len(y))):
                if x == y or x[:i] != y[:i]:
                    continue  # staying put is what the diagonal collects
                log_a = acceptance(s.case.alpha, logp[x][i:], logq[x][i:], logp[y][i:], logq[y][i:], len(x), len(y))
                kernel[a, b] += math.exp(sum(logq[y][i:])) * min(1.0, math.exp(min(log_a, 0.0))) / len(x)
        kernel[a, a] = 1.0 - kernel[a].sum()
    dist = np.array([s.temperature[x] for x in states])
    for _ in range(steps):
        dist = dist @ kernel
    return dict(zip(states, dist.tolist(), strict=True))


# --- deliberately wrong acceptance functions ---------------------------------------------------


def sign_flipped(
    alpha: float,
    old_p: Sequence[float],
    old_q: Sequence[float],
    new_p: Sequence[float],
    new_q: Sequence[float],
    n_old: int,
    n_new: int,
) -> float:
    """The public vLLM port's bug: the proposal term enters with the wrong sign."""
    return alpha * (sum(new_p) - sum(old_p)) - (sum(old_q) - sum(new_q)) + math.log(n_old / n_new)


def no_length_term(
    alpha: float,
    old_p: Sequence[float],
    old_q: Sequence[float],
    new_p: Sequence[float],
    new_q: Sequence[float],
    n_old: int,
    n_new: int,
) -> float:
    """The reference code's bug: index-selection probabilities 1/n(x), 1/n(x') left out."""
    return alpha * (sum(new_p) - sum(old_p)) + (sum(old_q) - sum(new_q))


Weight = Callable[[float, Sequence[float], Sequence[float], int], float]


def weight_without_proposal_term(alpha: float, logp: Sequence[float], logq: Sequence[float], n: int) -> float:
    """log w without -S_q: the candidates are weighed as if q were uniform."""
    return alpha * math.fsum(logp) - math.log(n)


def weight_without_length_term(alpha: float, logp: Sequence[float], logq: Sequence[float], n: int) -> float:
    """log w without -log n(z): the state-dependent position choice left out."""
    return alpha * math.fsum(logp) - math.fsum(logq)


def weight_with_flipped_proposal_term(alpha: float, logp: Sequence[float], logq: Sequence[float], n: int) -> float:
    """log w with +S_q: the public vLLM port's sign error."""
    return alpha * math.fsum(logp) + math.fsum(logq) - math.log(n)


BROKEN_WEIGHTS = [
    pytest.param(weight_without_proposal_term, id="no_proposal_term"),
    pytest.param(weight_without_length_term, id="no_length_term"),
    pytest.param(weight_with_flipped_proposal_term, id="flipped_proposal_term"),
]


# --- running decoders --------------------------------------------------------------------------


async def run_many(decoder: Decoder, s: Setup, params: DecoderParams, n: int) -> list[list[TokenStep]]:
    """``n`` independent runs with seeds 0..n-1, concurrently."""

    async def one(seed: int) -> list[TokenStep]:
        request = DecodeRequest(s.case.prompt, MAX_TOKENS, seed, OpenAISampling(), params)
        return [step async for step in decoder.decode(request, EngineStats())]

    return await asyncio.gather(*(one(seed) for seed in range(n)))


def empirical(runs: list[list[TokenStep]]) -> Dist:
    counts = Counter(tuple(step.token_id for step in run) for run in runs)
    return {k: v / len(runs) for k, v in counts.items()}


def tabular(s: Setup) -> Engine:
    return TabularEngine(s.table, EOS)


# --- the tests ---------------------------------------------------------------------------------
