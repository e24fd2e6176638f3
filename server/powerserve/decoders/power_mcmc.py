"""``power_mcmc``: Metropolis-Hastings power sampling (Karan & Du, 2025), exact, seeded, batched.

Samples from the sequence-level power distribution p(x)^alpha / Z by a Markov chain over
whole continuations whose proposal is the model at temperature 1/alpha. Each step draws
``proposals`` = K candidate suffixes from the same position at once (the engine batches them)
and moves by a multiple-proposal Metropolis step (:mod:`powerserve.decoders.multi_proposal`,
which states the maths); K = 1 is the classic single-proposal chain. Unlike the reference
code it works in token ids only, weighs in the index-selection term when a candidate ends at
a different length, and draws every random number from one per-request generator, so
``seed`` reproduces the whole chain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import Field

from powerserve.decoders import multi_proposal
from powerserve.decoders.base import Decoder, DecodeRequest
from powerserve.decoders.multi_proposal import log_acceptance, log_weight
from powerserve.decoders.power_common import (
    PowerParams,
    engine_seed,
    engine_seeds,
    final_steps,
    proposal_spec,
    start_counters,
)
from powerserve.engine.base import Continuation, Engine, EngineStats, TokenStep

__all__ = ["PowerMcmcDecoder", "PowerMcmcParams", "block_limits", "log_acceptance", "log_weight"]


class PowerMcmcParams(PowerParams):
    block_size: int = Field(
        192, ge=1, le=4096, description="tokens added to the chain per block before its MCMC steps run"
    )
    mcmc_steps: int = Field(
        4,
        ge=0,
        le=64,
        description=(
            "multiple-proposal Metropolis steps after each block (0: plain temperature 1/alpha). Default 4 "
            "with 8 proposals: on the mixing benchmark (docs/benchmarks.md, real model, 400 draws) TV to "
            "p^alpha 0.072 against 0.309 for the old 8-step single-proposal chain, in 0.83x its wall time; "
            "2 steps leave 0.24 (a step reaches position 0 only with probability 1/n)"
        ),
    )
    proposals: int = Field(
        8,
        ge=1,
        le=64,
        description=(
            "candidate suffixes K drawn together per step from the same position and batched by the engine; "
            "the step moves to one of them by their importance weights (1: classic single-proposal MH). "
            "A batch of 8 costs about 1.8x one row on a 2-core CPU, so K = 8 buys far more mixing per second"
        ),
    )


def block_limits(max_tokens: int, block_size: int) -> list[int]:
    """Length limit of the chain in each block: min(k * block_size, max_tokens), k = 1, 2, ..."""
    return [min(k * block_size, max_tokens) for k in range(1, -(-max_tokens // block_size) + 1)]


def sum_block_limits(max_tokens: int, block_size: int) -> int:
    """sum_k L_k in closed form: with m = ceil(T/B) blocks, B * m(m-1)/2 + T."""
    m = -(-max_tokens // block_size)
    return block_size * m * (m - 1) // 2 + max_tokens


@dataclass(slots=True)
class _Chain:
    """The chain state: generated tokens with their log p and log q."""

    token_ids: list[int] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    logq: list[float] = field(default_factory=list)

    def replace_suffix(self, i: int, suffix: Continuation) -> None:
        self.token_ids[i:] = suffix.token_ids
        self.logp[i:] = suffix.logp
        self.logq[i:] = suffix.logq


# Counters in ``stats.extra``. "proposals" counts MH steps (move attempts, each with K
# candidates), "accepted_proposals" the steps that moved the chain, so the serving layer's
# acceptance_rate = accepted_proposals / proposals is the probability that a step moves.
_COUNTERS = (
    "tokens_proposed",
    "tokens_accepted",
    "proposals",
    "accepted_proposals",
    "candidates",
    "blocks_done",
    "mh_steps_done",
)


class PowerMcmcDecoder(Decoder[PowerMcmcParams]):
    name = "power_mcmc"
    description = (
        "Metropolis-Hastings power sampling of p(x)^alpha with a temperature-1/alpha proposal, block by block, "
        "K candidate suffixes per step batched by the engine; yields the whole answer at the end. "
        "Ignores temperature/top_p/top_k."
    )
    params_model = PowerMcmcParams
    streams_tokens = False
    cheap_params: ClassVar[dict[str, Any]] = {"alpha": 4, "block_size": 8, "mcmc_steps": 2, "proposals": 2}

    def expected_cost(self, params: PowerMcmcParams, max_tokens: int) -> float:
        """Upper bound on engine tokens (generated + scored) for one chain, in closed form.

        With block limits L_k = min(k*B, T), block k extends the chain by at most
        L_k - L_{k-1} tokens and each of its S steps draws K candidates of at most L_k tokens,
        so at most T + K * S * sum_k L_k tokens are generated (:func:`sum_block_limits`). An
        engine that cannot return log p while sampling scores every generated token once more,
        hence the factor 2. (The average step resamples about half the sequence, so the typical
        cost is well below this.)
        """
        per_block = params.proposals * params.mcmc_steps
        return 2.0 * (max_tokens + per_block * sum_block_limits(max_tokens, params.block_size))

    async def decode(self, request: DecodeRequest[PowerMcmcParams], stats: EngineStats) -> AsyncIterator[TokenStep]:
        """Run the chain block by block, then yield its final tokens.

        For the blocks k = 1, 2, ... with length limits L_k = min(k * block_size, max_tokens):

        1. Extend: unless the chain x already ended with EOS, append a continuation sampled
           from q (temperature 1/alpha, no truncation) up to length L_k.
        2. ``mcmc_steps`` times (:meth:`_step`): pick i uniformly among the n(x) generated
           positions; draw K candidate suffixes from q after x[:i] up to length L_k,
           concurrently; move to one of them or stay, by :func:`multi_proposal.choose` on the
           weights log w(z) = alpha*S_p(z[i:]) - S_q(z[i:]) - log n(z) of x and the candidates.
        3. Stop after the block if x ended with EOS.

        Within a block the chain leaves p^alpha (restricted to length <= L_k) invariant, so
        the last block (L_k = max_tokens) targets p(x)^alpha / Z exactly. All randomness comes
        from one generator seeded with ``request.seed`` (fresh entropy if None), in a fixed
        order: per block the extension's engine seed, then per step the position uniform, the
        K engine seeds and the two uniforms of the move.

        Progress is live in ``stats.extra``: ``blocks_total``/``blocks_done`` and
        ``mh_steps_total``/``mh_steps_done``; when the chain ends early (EOS) the totals are
        lowered to what was done.
        """
        params = request.params
        rng = np.random.default_rng(request.seed)
        engine = self.engine
        chain = _Chain()
        limits = block_limits(request.max_tokens, params.block_size)
        start_counters(stats, _COUNTERS)
        stats.extra["blocks_total"] = len(limits)
        stats.extra["mh_steps_total"] = len(limits) * params.mcmc_steps

        for limit in limits:
            extension_seed = engine_seed(rng)
            if not _ended(engine, chain.token_ids) and len(chain.token_ids) < limit:
                ext = await _propose(engine, request.prompt_ids, chain.token_ids, limit, params, extension_seed, stats)
                chain.replace_suffix(len(chain.token_ids), ext)
                stats.add("tokens_proposed", len(ext.token_ids))
                stats.add("tokens_accepted", len(ext.token_ids))
            for _ in range(params.mcmc_steps):
                await self._step(request, chain, limit, rng, stats)
            stats.add("blocks_done", 1)
            if _ended(engine, chain.token_ids):
                break
        stats.extra["blocks_total"] = stats.extra["blocks_done"]
        stats.extra["mh_steps_total"] = stats.extra["mh_steps_done"]

        for step in final_steps(chain.token_ids, chain.logq, chain.logp):
            yield step

    async def _step(
        self,
        request: DecodeRequest[PowerMcmcParams],
        chain: _Chain,
        limit: int,
        rng: np.random.Generator,
        stats: EngineStats,
    ) -> None:
        """One multiple-proposal Metropolis step (step 2 of :meth:`decode`), in place.

        1. i = floor(u * n(x)) with u the step's first uniform.
        2. K candidates from q after prompt + x[:i], one engine call each with its own seed,
           all in flight at once (a task group: cancelling the step cancels every call).
        3. Weights of the points (x, y_1..y_K) by :func:`log_weight`, keyed by their suffixes;
           :func:`multi_proposal.choose` picks the next state; a move replaces x[i:].
        """
        params = request.params
        n = len(chain.token_ids)
        assert n >= 1, "the chain has at least one token after its first extension"
        i = min(int(rng.random() * n), n - 1)
        seeds = engine_seeds(rng, params.proposals)
        u_propose, u_accept = float(rng.random()), float(rng.random())
        prefix = chain.token_ids[:i]
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_propose(self.engine, request.prompt_ids, prefix, limit, params, seed, stats))
                for seed in seeds
            ]
        candidates = [t.result() for t in tasks]

        weights = [log_weight(params.alpha, chain.logp[i:], chain.logq[i:], n)]
        weights += [log_weight(params.alpha, c.logp, c.logq, i + len(c.token_ids)) for c in candidates]
        keys = [tuple(chain.token_ids[i:]), *(tuple(c.token_ids) for c in candidates)]
        j = multi_proposal.choose(weights, keys, u_propose, u_accept)

        stats.add("proposals", 1)
        stats.add("candidates", len(candidates))
        stats.add("tokens_proposed", sum(len(c.token_ids) for c in candidates))
        if j > 0:
            chain.replace_suffix(i, candidates[j - 1])
            stats.add("accepted_proposals", 1)
            stats.add("tokens_accepted", len(candidates[j - 1].token_ids))
        stats.extra["acceptance_rate"] = stats.extra["accepted_proposals"] / stats.extra["proposals"]
        stats.add("mh_steps_done", 1)


def _ended(engine: Engine, token_ids: Sequence[int]) -> bool:
    return bool(token_ids) and token_ids[-1] in engine.eos_token_ids


async def _propose(
    engine: Engine,
    prompt_ids: Sequence[int],
    prefix: Sequence[int],
    limit: int,
    params: PowerMcmcParams,
    seed: int,
    stats: EngineStats,
) -> Continuation:
    """Sample a continuation of ``prompt + prefix`` from q, up to a chain length of ``limit``."""
    spec = proposal_spec(params.alpha, limit - len(prefix), seed)
    cont = await engine.sample([*prompt_ids, *prefix], spec, stats)
    assert cont.token_ids, "an engine call with max_tokens >= 1 returns at least one token"
    return cont
