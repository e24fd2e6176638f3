"""``power_mcmc`` with ``parallel_proposals > 1``: speculative proposals leave the chain as it is.

Proposals of the next P steps are drawn concurrently from the current state; after an
acceptance the ones still in flight are discarded. Each step's random numbers are fixed in
advance, so on a deterministic engine the chain must be *identical* to the one-at-a-time
chain for every seed -- the strongest form of "exact". These tests check that (also when
proposals finish out of order), that each block still runs exactly ``mcmc_steps`` MH tests,
that the discarded work is counted and bounded by ``expected_cost``, and that cancelling the
chain stops every proposal in flight. The distribution itself is checked against p^alpha
with P > 1 in ``test_power_mcmc_exact.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence

import pytest

from powerserve.decoders import power_mcmc
from powerserve.decoders.power_mcmc import PowerMcmcDecoder, PowerMcmcParams, max_proposals
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep
from tests.decoders.test_power_mcmc import EOS, decode, random_table, request
from tests.tabular_engine import NextLogprobs, TabularEngine


class ShuffledEngine(TabularEngine):
    """Yields to the event loop between tokens, for a number of turns that depends on the
    call's seed, so concurrent proposals overlap and finish in no particular order. Records
    how many ``generate`` calls ran at once; ``full`` is set once ``full_at`` of them did."""

    def __init__(self, next_logprobs: NextLogprobs, eos_token_ids: frozenset[int], full_at: int = 0) -> None:
        super().__init__(next_logprobs, eos_token_ids)
        self.running = 0
        self.most_running = 0
        self.full_at = full_at
        self.full = asyncio.Event()

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        if self.full_at and self.running >= self.full_at:
            self.full.set()
        try:
            async for step in super().generate(prompt_ids, spec, stats):
                for _ in range((spec.seed or 0) % 4):
                    await asyncio.sleep(0)
                yield step
        finally:
            self.running -= 1


COUNTED = ("proposals", "accepted_proposals", "tokens_proposed", "tokens_accepted")


@pytest.mark.parametrize("parallel", [2, 3, 8])
@pytest.mark.parametrize("eos_logit", [-1.0, -30.0])
async def test_the_chain_is_the_one_at_a_time_chain(parallel: int, eos_logit: float) -> None:
    table = random_table(eos_logit=eos_logit)
    for seed in range(12):
        kwargs = {"alpha": 3.0, "block_size": 4, "mcmc_steps": 6}
        one, many = EngineStats(), EngineStats()
        expected = await decode(PowerMcmcDecoder(TabularEngine(table, EOS)), request(11, seed, **kwargs), one)
        engine = ShuffledEngine(table, EOS)
        got = await decode(PowerMcmcDecoder(engine), request(11, seed, parallel_proposals=parallel, **kwargs), many)
        assert got == expected
        assert {k: many.extra[k] for k in COUNTED} == {k: one.extra[k] for k in COUNTED}
        assert one.extra["proposals_discarded"] == one.extra["tokens_discarded"] == 0
        # Every generated token was either tested by an MH step (or extended the chain) or discarded.
        assert many.tokens_generated == many.extra["tokens_proposed"] + many.extra["tokens_discarded"]
        assert many.extra["proposals_discarded"] <= (parallel - 1) * many.extra["accepted_proposals"]
        assert many.tokens_generated >= one.tokens_generated
        assert 1 < engine.most_running <= parallel


@pytest.mark.parametrize("parallel", [1, 2, 5, 16])
async def test_each_block_runs_exactly_mcmc_steps_tests(parallel: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # EOS never comes, so the chain fills each block's limit and every MH test of block k has
    # n(x) = L_k: counting tests by n(x) counts them by block.
    tests_by_length: Counter[int] = Counter()
    exact = power_mcmc.log_acceptance

    def counting(alpha: float, *args: object) -> float:
        n_old = args[-2]
        assert isinstance(n_old, int)
        tests_by_length[n_old] += 1
        return exact(alpha, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(power_mcmc, "log_acceptance", counting)
    engine = ShuffledEngine(random_table(eos_logit=-30.0), EOS)
    for seed in range(5):
        tests_by_length.clear()
        stats = EngineStats()
        await decode(
            PowerMcmcDecoder(engine), request(10, seed, block_size=4, mcmc_steps=5, parallel_proposals=parallel), stats
        )
        assert tests_by_length == {4: 5, 8: 5, 10: 5}  # blocks with limits 4, 8, 10
        assert stats.extra["proposals"] == 15


def test_max_proposals_by_hand() -> None:
    assert max_proposals(5, 1) == 5
    # an acceptance at step s discards min(P - 1, 4 - s) proposals: 2 + 2 + 2 + 1 + 0
    assert max_proposals(5, 3) == 5 + 7
    assert max_proposals(5, 100) == 5 + 4 + 3 + 2 + 1
    assert max_proposals(0, 4) == 0


async def test_discarded_work_is_counted_and_bounded() -> None:
    # Alpha 1 (q = p) accepts every proposal of equal length: the most discarding there can be.
    decoder = PowerMcmcDecoder(TabularEngine(random_table(eos_logit=-30.0), EOS))
    for parallel in (1, 4):
        req = request(10, 0, alpha=1.0, block_size=4, mcmc_steps=3, parallel_proposals=parallel)
        stats = EngineStats()
        await decode(decoder, req, stats)
        x = stats.extra
        assert x["accepted_proposals"] == x["proposals"] == 9
        # tabular proposals finish at once, so every one in flight is fully generated
        assert x["proposals_discarded"] == 3 * max_proposals(3, parallel) - 9
        assert stats.tokens_generated == x["tokens_proposed"] + x["tokens_discarded"]
        assert stats.tokens_generated + stats.tokens_scored <= decoder.expected_cost(req.params, 10)


def test_expected_cost_grows_with_the_proposals_that_may_be_discarded() -> None:
    decoder = PowerMcmcDecoder(TabularEngine(random_table(), EOS))
    # generated <= T + M * sum_k L_k with M = max_proposals(S, P); doubled for scoring
    assert decoder.expected_cost(PowerMcmcParams(block_size=4, mcmc_steps=2, parallel_proposals=3), 10) == 2 * (
        10 + 3 * 22
    )


async def test_seed_reproduces_the_parallel_chain() -> None:
    decoder = PowerMcmcDecoder(ShuffledEngine(random_table(), EOS))
    req = request(12, seed=7, block_size=4, mcmc_steps=5, parallel_proposals=4)
    s1, s2 = EngineStats(), EngineStats()
    assert await decode(decoder, req, s1) == await decode(decoder, req, s2)
    assert s1 == s2


async def test_cancelling_stops_every_proposal_in_flight() -> None:
    engine = ShuffledEngine(random_table(eos_logit=-30.0), EOS, full_at=4)
    stats = EngineStats()
    req = request(40, 0, block_size=40, mcmc_steps=10_000, parallel_proposals=4)
    task = asyncio.create_task(decode(PowerMcmcDecoder(engine), req, stats))
    await engine.full.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert engine.running == 0
    calls, generated = stats.calls, stats.tokens_generated
    await asyncio.sleep(0.05)
    assert (stats.calls, stats.tokens_generated) == (calls, generated)
    assert stats.extra["proposals_discarded"] >= 3
