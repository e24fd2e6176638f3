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

from collections import Counter

import pytest

from powerserve.decoders import power_mcmc
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, log_acceptance
from powerserve.decoders.temperature import TemperatureDecoder, TemperatureParams
from powerserve.engine.torch_engine import TorchEngine
from tests.decoders.exact_cases import (
    BROKEN_WEIGHTS,
    CASES,
    EOS,
    MCMC_STEPS,
    N_BROKEN,
    N_CHAINS,
    N_TORCH,
    RICH,
    SHARP,
    STEPS,
    TOLERANCE,
    TOLERANCE_TORCH,
    Case,
    Weight,
    chain_distribution,
    empirical,
    no_length_term,
    run_many,
    setup,
    sign_flipped,
    tabular,
)
from tests.tabular_engine import (
    tempered,
    total_variation,
)


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
