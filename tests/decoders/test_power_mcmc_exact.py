"""``power_mcmc`` samples the sequence-level power distribution p(x)^alpha / Z, exactly, for
every number of proposals per step K shipped (1, 2, 4, 8).

Two tiny random Llamas whose continuation spaces can be enumerated (max_tokens 3, EOS = 0):

- ``alpha2``: vocabulary {EOS, 1, 2}, prompt [2], alpha 2: 1 + 2 + 4 + 8 = 15 complete
  continuations; p^alpha puts 0.48 / 0.17 / 0.35 on lengths 1 / 2 / 3, temperature 1/alpha
  0.19 / 0.15 / 0.66 -- so a wrong length term is visible.
- ``alpha4``: vocabulary of 4, prompt [2], the usual alpha 4; p^alpha is almost all on [EOS]
  (0.58) and [3, EOS] (0.42), which temperature 1/alpha ranks the other way (0.23 / 0.76).

p^alpha comes from the model's own conditional probabilities by enumeration
(``tests.tabular_engine``). Each run: independent chains with seeds 0..N-1 run concurrently,
one block (block_size = max_tokens), STEPS[K] steps (20 / 10 / 6 / 4 for K = 1 / 2 / 4 / 8);
the empirical distribution of their final states is compared with p^alpha by total variation
(TV).

How N and the tolerance were chosen. The K = 1 chain's exact distribution after 20 steps is
computed by enumerating its transition kernel (:func:`chain_distribution`): its TV to p^alpha
(the mixing bias) is 0.012 (alpha2) and 0.004 (alpha4). In 20,000 simulated multinomial
samples of N = 2000 from that distribution, the empirical TV has mean 0.022 and 99.9% quantile
0.051 (alpha4: 0.010 / 0.040). TOLERANCE = 0.08 sits well above that and well below the 0.1%
quantiles, at the same N, of the samplers that must fail: temperature 1/alpha 0.28 (alpha4:
0.32; exact TV 0.31 / 0.35), sign-flipped proposal term 0.45 (0.44), missing length term
0.19 (0.14). Measured at N = 2000 (seeds 0..1999) for K = 1 / 2 / 4 / 8: TV 0.023 / 0.028 /
0.039 / 0.026 (alpha2) and 0.010 / 0.003 / 0.005 / 0.007 (alpha4). The multiple-proposal step
with a wrong weight (:data:`BROKEN_WEIGHTS`, K = 4, 6 steps, N = 2000 on alpha2, where the
correct chain's TV is 0.04) gives 0.25 without -S_q, 0.23 without -log n(z) and 0.48 with the
sign of S_q flipped -- far above TOLERANCE at every K tried (1, 2, 4, 8; the same within
0.03); the test runs it with N_BROKEN = 1000 chains, whose sampling noise (mean TV about 0.03)
is small beside that gap. The seeds are fixed, so the tabular runs are deterministic.

The torch engine costs milliseconds per token on this machine, so the run on
``TorchEngine`` (alpha4, the cheapest case: ~28 tokens per chain) uses N_TORCH = 200 chains:
the correct chain's TV then has mean 0.029 and 99.9% quantile 0.111, hence TOLERANCE_TORCH =
0.15; temperature sampling (0.1% quantile 0.25 at N = 200) still fails it. That run also checks
every token's log p and log q against the enumerated tables, which is what carries the
high-N tabular results (and the broken-variant checks) over to the real engine.

The torch run uses K = 1 and K = 4 (STEPS 20 and 6).
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache

import numpy as np
import pytest

from powerserve.decoders import power_mcmc
from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams, OpenAISampling
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams, log_acceptance
from powerserve.decoders.temperature import TemperatureDecoder, TemperatureParams
from powerserve.engine.base import Engine, EngineStats, TokenStep
from powerserve.engine.torch_engine import TorchEngine
from tests.tabular_engine import (
    TabularEngine,
    enumerate_continuations,
    model_table,
    power_distribution,
    tempered,
    total_variation,
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


@pytest.mark.parametrize("case", CASES)
def test_the_case_separates_power_from_temperature(case: Case) -> None:
    s = setup(case)
    assert total_variation(s.temperature, s.target) > 3 * TOLERANCE
    by_length = Counter[int]()
    for x, prob in s.target.items():
        by_length[len(x)] += prob
    assert sum(mass > 0.1 for mass in by_length.values()) >= 2  # chains jump between lengths


@pytest.mark.parametrize("case", CASES)
def test_exact_kernel_converges_to_p_alpha_and_broken_kernels_do_not(case: Case) -> None:
    s = setup(case)
    assert total_variation(chain_distribution(s, log_acceptance, MCMC_STEPS), s.target) < 0.015
    for broken in (sign_flipped, no_length_term):
        assert total_variation(chain_distribution(s, broken, MCMC_STEPS), s.target) > 2 * TOLERANCE


@pytest.mark.parametrize("proposals", list(STEPS))
@pytest.mark.parametrize("case", CASES)
async def test_power_mcmc_matches_p_alpha_and_temperature_does_not(case: Case, proposals: int) -> None:
    s = setup(case)
    engine = tabular(s)
    chains = empirical(await run_many(PowerMcmcDecoder(engine), s, s.params(proposals), N_CHAINS))
    temperature = empirical(
        await run_many(TemperatureDecoder(engine), s, TemperatureParams(alpha=case.alpha), N_CHAINS)
    )
    assert total_variation(chains, s.target) < TOLERANCE
    assert total_variation(temperature, s.target) > TOLERANCE


@pytest.mark.parametrize("broken", BROKEN_WEIGHTS)
async def test_broken_weight_fails_the_same_check(broken: Weight, monkeypatch: pytest.MonkeyPatch) -> None:
    """The K = 4 chain with a wrong importance weight is caught (alpha2, N_BROKEN chains)."""
    s = setup(RICH)
    monkeypatch.setattr(power_mcmc, "log_weight", broken)
    chains = empirical(await run_many(PowerMcmcDecoder(tabular(s)), s, s.params(4), N_BROKEN))
    assert total_variation(chains, s.target) > TOLERANCE


@pytest.mark.parametrize("proposals", [1, 4])
async def test_power_mcmc_on_torch_engine(proposals: int) -> None:
    s = setup(SHARP)
    engine = TorchEngine(s.model, None, model_name="tiny", max_model_len=16, eos_token_ids=EOS)
    try:
        runs = await run_many(PowerMcmcDecoder(engine), s, s.params(proposals), N_TORCH)
        temperature = empirical(
            await run_many(TemperatureDecoder(engine), s, TemperatureParams(alpha=SHARP.alpha), N_TORCH)
        )
    finally:
        await engine.shutdown()
    # Every token carries the exact raw log p and tempered log q of the enumerated tables.
    for run in runs:
        prefix: tuple[int, ...] = SHARP.prompt
        for step in run:
            raw = s.table(prefix)
            assert step.logp == pytest.approx(raw[step.token_id], abs=1e-4)
            assert step.logq == pytest.approx(tempered(raw, 1 / SHARP.alpha)[step.token_id], abs=1e-4)
            prefix = (*prefix, step.token_id)
    assert total_variation(empirical(runs), s.target) < TOLERANCE_TORCH
    assert total_variation(temperature, s.target) > TOLERANCE_TORCH
