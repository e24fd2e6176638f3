"""Unit tests of ``power_mcmc``: the acceptance formula, parameters, seeding, cost accounting,
blocks and cancellation, on an exact tabular engine (the distribution itself is tested in
``test_power_mcmc_exact.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
from pydantic import ValidationError

from powerserve.decoders.base import DecodeRequest, OpenAISampling
from powerserve.decoders.power_mcmc import (
    PowerMcmcDecoder,
    PowerMcmcParams,
    block_limits,
    log_acceptance,
    sum_block_limits,
)
from powerserve.decoders.registry import DECODERS
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep
from tests.tabular_engine import NextLogprobs, TabularEngine, tempered

EOS = frozenset({0})
PROMPT = (1, 2)


def random_table(vocab: int = 5, eos_logit: float = -1.0, scale: float = 2.0) -> NextLogprobs:
    """Raw next-token log-probabilities drawn once per prefix from a generator keyed by it."""

    def next_logprobs(prefix: tuple[int, ...]) -> np.ndarray:
        logits = np.random.default_rng([vocab, *prefix]).normal(size=vocab) * scale
        logits[0] += eos_logit
        return tempered(logits, 1.0)

    return next_logprobs


def request(max_tokens: int, seed: int | None, **params: float) -> DecodeRequest:
    return DecodeRequest(PROMPT, max_tokens, seed, OpenAISampling(), PowerMcmcParams(**params))  # type: ignore[arg-type]


async def decode(decoder: PowerMcmcDecoder, req: DecodeRequest, stats: EngineStats | None = None) -> list[TokenStep]:
    return [step async for step in decoder.decode(req, stats if stats is not None else EngineStats())]


# --- the acceptance ratio ----------------------------------------------------------------------


def test_log_acceptance_by_hand() -> None:
    # alpha * (S_p(x') - S_p(x)) + (S_q(x) - S_q(x')) + log(n(x) / n(x'))
    got = log_acceptance(4.0, [-1.0, -2.0], [-0.5, -1.0], [-0.5], [-0.2], n_old=3, n_new=2)
    assert got == pytest.approx(4.0 * (-0.5 + 3.0) + (-1.5 + 0.2) + math.log(3 / 2))


def test_log_acceptance_of_the_reverse_move_is_the_negative() -> None:
    old, new = ([-1.0, -2.0], [-0.5, -1.0]), ([-0.3, -0.1, -4.0], [-0.2, -0.9, -2.0])
    forward = log_acceptance(3.0, *old, *new, n_old=5, n_new=6)
    backward = log_acceptance(3.0, *new, *old, n_old=6, n_new=5)
    assert forward == pytest.approx(-backward)


def test_log_acceptance_reduces_to_log_normalisers_at_temperature_one_over_alpha() -> None:
    """With q = p^alpha / Z_t token by token, alpha*dS_p - dS_q = sum log Z_t(x') - sum log Z_t(x)."""
    alpha, table = 4.0, random_table()

    def along(x: Sequence[int], i: int) -> tuple[list[float], list[float], float]:
        logp, logq, log_z = [], [], 0.0
        for t in range(i, len(x)):
            raw = table((*PROMPT, *x[:t]))
            logp.append(float(raw[x[t]]))
            logq.append(float(tempered(raw, 1 / alpha)[x[t]]))
            log_z += float(np.log(np.exp(alpha * raw).sum()))
        return logp, logq, log_z

    x, x_new, i = (3, 1, 4, 2), (3, 1, 2, 0), 2
    p_old, q_old, z_old = along(x, i)
    p_new, q_new, z_new = along(x_new, i)
    got = log_acceptance(alpha, p_old, q_old, p_new, q_new, n_old=len(x), n_new=len(x_new))
    assert got == pytest.approx(z_new - z_old)


# --- parameters and registry -------------------------------------------------------------------


def test_registered_and_not_streaming() -> None:
    assert DECODERS["power_mcmc"] is PowerMcmcDecoder
    assert PowerMcmcDecoder.streams_tokens is False


def test_params_defaults() -> None:
    p = PowerMcmcParams()
    assert (p.alpha, p.block_size, p.mcmc_steps, p.proposals) == (4.0, 192, 4, 8)


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": 0.5},
        {"alpha": 101},
        {"block_size": 0},
        {"block_size": 4097},
        {"mcmc_steps": -1},
        {"mcmc_steps": 65},
        {"mcmc_steps": 1e12},
        {"proposals": 0},
        {"proposals": 65},
        {"parallel_proposals": 2},
        {"temperature": 0.3},
    ],
)
def test_params_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        PowerMcmcParams(**bad)  # type: ignore[arg-type]


def test_block_limits() -> None:
    assert block_limits(10, 4) == [4, 8, 10]
    assert block_limits(3, 192) == [3]
    assert block_limits(4, 2) == [2, 4]


def test_sum_block_limits_closed_form() -> None:
    for t in (1, 3, 10, 64, 1000):
        for b in (1, 2, 4, 7, 192, 4096):
            assert sum_block_limits(t, b) == sum(block_limits(t, b))


def test_expected_cost_formula() -> None:
    decoder = PowerMcmcDecoder(TabularEngine(random_table(), EOS))
    # generated <= T + K * S * sum_k L_k = 10 + 3 * 2 * (4 + 8 + 10); doubled for scoring
    params = PowerMcmcParams(block_size=4, mcmc_steps=2, proposals=3)
    assert decoder.expected_cost(params, 10) == 2 * (10 + 3 * 2 * 22)
    assert decoder.expected_cost(PowerMcmcParams(block_size=4, mcmc_steps=0), 10) == 2 * 10
    # the largest request the bounds allow is priced at once (closed form, no loop)
    big = PowerMcmcParams(block_size=1, mcmc_steps=64, proposals=64)
    assert decoder.expected_cost(big, 4096) == 2 * (4096 + 64 * 64 * (4096 * 4097 // 2))


# --- running the chain -------------------------------------------------------------------------


@pytest.mark.parametrize("proposals", [1, 4])
async def test_seed_reproduces_the_chain(proposals: int) -> None:
    decoder = PowerMcmcDecoder(TabularEngine(random_table(), EOS))
    req = request(12, seed=7, block_size=4, mcmc_steps=5, proposals=proposals)
    s1, s2 = EngineStats(), EngineStats()
    a, b = await decode(decoder, req, s1), await decode(decoder, req, s2)
    assert a == b and s1 == s2
    others = [
        await decode(decoder, request(12, seed=s, block_size=4, mcmc_steps=5, proposals=proposals))
        for s in range(8, 14)
    ]
    assert any(o != a for o in others)
    assert await decode(decoder, request(12, seed=None, block_size=4, mcmc_steps=5))  # fresh entropy


async def test_output_tokens_carry_exact_logp_and_logq() -> None:
    table = random_table()
    decoder = PowerMcmcDecoder(TabularEngine(table, EOS))
    for seed in range(5):
        steps = await decode(decoder, request(9, seed, alpha=3.0, block_size=4, mcmc_steps=4))
        assert 1 <= len(steps) <= 9
        assert all(s.token_id not in EOS for s in steps[:-1])
        prefix = PROMPT
        for s in steps:
            raw = table(prefix)
            assert s.logp == pytest.approx(raw[s.token_id])
            assert s.logq == pytest.approx(tempered(raw, 1 / 3.0)[s.token_id])
            prefix = (*prefix, s.token_id)


@pytest.mark.parametrize("proposals", [1, 3])
@pytest.mark.parametrize("logp_while_sampling", [True, False])
async def test_cost_fields_and_bound(logp_while_sampling: bool, proposals: int) -> None:
    engine = TabularEngine(random_table(eos_logit=-2.0), EOS, logp_while_sampling=logp_while_sampling)
    decoder = PowerMcmcDecoder(engine)
    for seed in range(10):
        req = request(10, seed, block_size=4, mcmc_steps=3, proposals=proposals)
        stats = EngineStats()
        out = await decode(decoder, req, stats)
        x = stats.extra
        blocks_run, rest = divmod(int(x["proposals"]), 3)  # 3 MH steps per block
        assert rest == 0 and 1 <= blocks_run <= 3
        assert x["candidates"] == proposals * x["proposals"]
        assert x["blocks_done"] == x["blocks_total"] == blocks_run
        assert x["mh_steps_done"] == x["mh_steps_total"] == x["proposals"]
        assert blocks_run == 3 or out[-1].token_id in EOS  # stops early only once ended
        assert 0 <= x["accepted_proposals"] <= x["proposals"]
        assert x["acceptance_rate"] == pytest.approx(x["accepted_proposals"] / x["proposals"])
        assert x["tokens_proposed"] == stats.tokens_generated
        assert len(out) <= x["tokens_accepted"] <= x["tokens_proposed"]
        assert stats.tokens_scored == (0 if logp_while_sampling else stats.tokens_generated)
        sample_calls = stats.calls if logp_while_sampling else stats.calls / 2
        assert x["candidates"] < sample_calls <= x["candidates"] + blocks_run  # + block extensions
        assert stats.tokens_generated + stats.tokens_scored <= decoder.expected_cost(req.params, 10)


async def test_stops_after_the_block_in_which_the_chain_ended() -> None:
    # EOS is almost certain at every position: the first block ends the chain.
    decoder = PowerMcmcDecoder(TabularEngine(random_table(eos_logit=30.0), EOS))
    stats = EngineStats()
    out = await decode(decoder, request(50, 0, block_size=5, mcmc_steps=2, proposals=3), stats)
    assert [s.token_id for s in out] == [0]
    assert stats.calls == 1 + 2 * 3 and stats.extra["proposals"] == 2
    # the plan of 10 blocks shrank to the one that ran: progress ends at 100%
    assert stats.extra["blocks_total"] == stats.extra["blocks_done"] == 1
    assert stats.extra["mh_steps_total"] == stats.extra["mh_steps_done"] == 2


async def test_zero_steps_is_block_by_block_temperature_sampling() -> None:
    decoder = PowerMcmcDecoder(TabularEngine(random_table(eos_logit=-30.0), EOS))
    stats = EngineStats()
    out = await decode(decoder, request(10, 0, block_size=4, mcmc_steps=0), stats)
    assert len(out) == 10 and stats.calls == 3  # blocks of 4, 4, 2 tokens
    assert stats.extra["proposals"] == 0 and "acceptance_rate" not in stats.extra


class SlowEngine(TabularEngine):
    """Yields control to the event loop after every token, like a real engine; ``busy`` is set
    once it has been called five times. Tracks the calls running at once (``running``) and
    the most seen (``most_running``), and records ``stats.extra`` at each call."""

    def __init__(self, next_logprobs: NextLogprobs, eos_token_ids: frozenset[int]) -> None:
        super().__init__(next_logprobs, eos_token_ids)
        self.busy = asyncio.Event()
        self.running = self.most_running = 0
        self.seen: list[dict[str, float]] = []

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        if stats.calls >= 5:
            self.busy.set()
        self.seen.append(dict(stats.extra))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            async for step in super().generate(prompt_ids, spec, stats):
                await asyncio.sleep(0.001)
                yield step
        finally:
            self.running -= 1


async def test_candidates_run_concurrently_and_progress_is_live() -> None:
    """The K candidates of a step are in flight together (what lets the engine batch them), and
    the progress counters move while the chain runs, not only at its end."""
    engine = SlowEngine(random_table(eos_logit=-30.0), EOS)
    stats = EngineStats()
    await decode(PowerMcmcDecoder(engine), request(8, 0, block_size=4, mcmc_steps=3, proposals=5), stats)
    assert engine.most_running == 5
    steps_seen = [x["mh_steps_done"] for x in engine.seen]
    assert steps_seen == sorted(steps_seen) and set(steps_seen) == {0, 1, 2, 3, 4, 5}
    blocks_seen = {x["blocks_done"] for x in engine.seen}
    assert blocks_seen == {0, 1}
    assert all(x["mh_steps_total"] == 6 and x["blocks_total"] == 2 for x in engine.seen)
    assert stats.extra["mh_steps_done"] == 6 and stats.extra["blocks_done"] == 2


async def test_cancelling_stops_the_chain() -> None:
    engine = SlowEngine(random_table(eos_logit=-30.0), EOS)
    decoder = PowerMcmcDecoder(engine)
    stats = EngineStats()
    req = request(40, 0, block_size=40, mcmc_steps=64, proposals=8)
    task = asyncio.create_task(decode(decoder, req, stats))
    await engine.busy.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()
    assert engine.running == 0  # every candidate in flight was stopped
    calls, generated = stats.calls, stats.tokens_generated
    await asyncio.sleep(0.05)
    assert (stats.calls, stats.tokens_generated) == (calls, generated)
