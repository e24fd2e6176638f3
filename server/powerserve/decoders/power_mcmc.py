"""``power_mcmc``: Metropolis-Hastings power sampling (Karan & Du, 2025), exact and seeded.

Samples from the sequence-level power distribution p(x)^alpha / Z by a Metropolis-Hastings
chain over whole continuations whose proposal is the model at temperature 1/alpha. Unlike
the reference code it works in token ids only, takes the index-selection term into account
when a proposal ends at a different length, and draws every random number from one
per-request generator, so ``seed`` reproduces the whole chain.

Proposals can be drawn speculatively, several at a time (``parallel_proposals``): while
proposals are rejected the chain does not move, so the proposals of the next steps, drawn
from the current state concurrently (and batched by the engine), are the ones the steps
would draw anyway. Each step's random numbers are fixed in advance, so the chain is the same
-- not just the same in distribution -- whatever the number of parallel proposals.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import Field

from powerserve.decoders.base import Decoder, DecodeRequest, DecoderParams
from powerserve.engine.base import Continuation, Engine, EngineStats, SamplingSpec, TokenStep

# Per-call engine seeds are drawn below this bound: every engine accepts a 31-bit seed.
_SEED_BOUND = 2**31


class PowerMcmcParams(DecoderParams):
    alpha: float = Field(4.0, ge=1.0, le=100.0, description="power exponent: the target is p(x)^alpha")
    block_size: int = Field(
        192, ge=1, le=4096, description="tokens added to the chain per block before its MCMC steps run"
    )
    mcmc_steps: int = Field(
        10, ge=0, le=64, description="Metropolis-Hastings steps after each block (0: plain temperature 1/alpha)"
    )
    parallel_proposals: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "proposals of consecutive MH steps drawn concurrently from the current state, betting that "
            "the earlier ones are rejected; the same chain, with lower latency on an engine that batches "
            "and extra tokens for the proposals discarded after an acceptance (1: one at a time)"
        ),
    )


def log_acceptance(
    alpha: float,
    old_logp: Sequence[float],
    old_logq: Sequence[float],
    new_logp: Sequence[float],
    new_logq: Sequence[float],
    n_old: int,
    n_new: int,
) -> float:
    """Log of the Metropolis-Hastings ratio for replacing the suffix ``old`` by ``new``.

    ``old_*`` / ``new_*`` are the per-token log p (raw model) and log q (proposal) of the
    current and proposed suffixes from the resampled position i on; ``n_old`` / ``n_new`` are
    the numbers of generated positions a step can pick in each whole sequence:

        log A = alpha * (S_p(x') - S_p(x)) + (S_q(x) - S_q(x')) + log(n(x) / n(x'))

    The last term is the ratio of the index-selection probabilities 1/n(x') (reverse move)
    and 1/n(x) (forward move); it vanishes only when both sequences have the same length.
    """
    target = alpha * (math.fsum(new_logp) - math.fsum(old_logp))
    proposal = math.fsum(old_logq) - math.fsum(new_logq)
    return target + proposal + math.log(n_old / n_new)


def block_limits(max_tokens: int, block_size: int) -> list[int]:
    """Length limit of the chain in each block: min(k * block_size, max_tokens), k = 1, 2, ..."""
    return [min(k * block_size, max_tokens) for k in range(1, -(-max_tokens // block_size) + 1)]


def max_proposals(steps: int, parallel: int) -> int:
    """Most proposals one block's ``steps`` MH steps can start with ``parallel`` in flight.

    Every step's proposal is tested once; an acceptance at step s discards the proposals in
    flight behind it, at most min(parallel - 1, steps - 1 - s) of them. With S = steps,
    c = parallel - 1 and j = S - 1 - s the sum has a closed form (constant time, whatever S):
        S + sum_{j < S} min(c, j) = S + S(S-1)/2                 if S - 1 <= c
                                  = S + c(c+1)/2 + c(S-1-c)      otherwise.
    """
    c = parallel - 1
    if steps - 1 <= c:
        return steps + steps * (steps - 1) // 2
    return steps + c * (c + 1) // 2 + c * (steps - 1 - c)


def sum_block_limits(max_tokens: int, block_size: int) -> int:
    """sum(block_limits(max_tokens, block_size)) in closed form: with T = max_tokens, B =
    block_size, m = floor(T/B) full blocks and K = ceil(T/B) blocks,
        sum_{k=1..K} min(kB, T) = B m(m+1)/2 + (K - m) T."""
    m, blocks = max_tokens // block_size, -(-max_tokens // block_size)
    return block_size * m * (m + 1) // 2 + (blocks - m) * max_tokens


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


@dataclass(frozen=True, slots=True)
class _StepDraws:
    """The random numbers of one MH step, drawn before the step knows the chain's state.

    ``u_pos`` picks the position (i = floor(u_pos * n(x))), ``seed`` seeds the proposal's
    engine call and ``u_acc`` is the acceptance uniform.
    """

    u_pos: float
    seed: int
    u_acc: float

    def position(self, n: int) -> int:
        return min(int(self.u_pos * n), n - 1)


@dataclass(frozen=True, slots=True)
class _Proposal:
    """A proposal in flight for MH step ``step``: resample the chain from position ``i``."""

    step: int
    i: int
    task: asyncio.Future[Continuation]


_COUNTERS = (
    "tokens_proposed",
    "tokens_accepted",
    "proposals",
    "accepted_proposals",
    "tokens_discarded",
    "proposals_discarded",
)


def _add(stats: EngineStats, key: str, value: float) -> None:
    stats.extra[key] = stats.extra.get(key, 0.0) + value


class PowerMcmcDecoder(Decoder):
    name = "power_mcmc"
    description = (
        "Metropolis-Hastings power sampling of p(x)^alpha with a temperature-1/alpha proposal, "
        "block by block; yields the whole answer at the end. Ignores temperature/top_p/top_k."
    )
    params_model = PowerMcmcParams
    streams_tokens = False

    def expected_cost(self, params: DecoderParams, max_tokens: int) -> float:
        """Upper bound on engine tokens (generated + scored) for one chain.

        With block limits L_k = min(k*B, T), block k extends the chain by at most
        L_k - L_{k-1} tokens and each proposal of its S steps resamples at most L_k tokens.
        With P parallel proposals a block starts at most M = :func:`max_proposals` (S, P)
        proposals (M = S when P = 1, at most S * P), so at most T + M * sum_k L_k tokens are
        generated. An engine that cannot return log p while sampling scores every generated
        token once more, hence the factor 2. (The average step resamples about half the
        sequence and most discarded proposals are cut short, so the typical cost is well below
        this.)
        """
        assert isinstance(params, PowerMcmcParams)
        proposals = max_proposals(params.mcmc_steps, params.parallel_proposals)
        generated = max_tokens + proposals * sum_block_limits(max_tokens, params.block_size)
        return 2.0 * generated

    async def decode(self, request: DecodeRequest, stats: EngineStats) -> AsyncIterator[TokenStep]:
        """Run the chain block by block, then yield its final tokens.

        For the blocks k = 1, 2, ... with length limits L_k = min(k * block_size, max_tokens):

        1. Extend: unless the chain x already ended with EOS, append a continuation sampled
           from q (temperature 1/alpha, no truncation) up to length L_k.
        2. MH steps, ``mcmc_steps`` times: pick i uniformly among the n(x) generated
           positions; resample x[i:] from q after the prefix x[:i] up to length L_k, giving x';
           accept with probability min(1, A),
               log A = alpha*(S_p(x') - S_p(x)) + (S_q(x) - S_q(x')) + log(n(x)/n(x')),
           with S_p, S_q the sums of log p and log q over the suffixes from i
           (:meth:`_mh_steps` runs them, several proposals at a time if asked).
        3. Stop after the block if x ended with EOS.

        Within a block the chain leaves p^alpha (restricted to length <= L_k) invariant, so
        the last block (L_k = max_tokens) targets p(x)^alpha / Z exactly. All randomness comes
        from one generator seeded with ``request.seed`` (fresh entropy if None), in a fixed
        order: per block, the extension's engine seed, then the ``mcmc_steps`` triples
        (position uniform, engine seed, acceptance uniform) of its steps.
        """
        params = request.params
        assert isinstance(params, PowerMcmcParams)
        rng = np.random.default_rng(request.seed)
        engine = self.engine
        chain = _Chain()
        for key in _COUNTERS:
            _add(stats, key, 0)
        generated, proposed = stats.tokens_generated, stats.extra["tokens_proposed"]

        try:
            for limit in block_limits(request.max_tokens, params.block_size):
                extension_seed = int(rng.integers(_SEED_BOUND))
                draws = _draw_steps(rng, params.mcmc_steps)
                if not _ended(engine, chain.token_ids) and len(chain.token_ids) < limit:
                    prompt, prefix = request.prompt_ids, chain.token_ids
                    ext = await _propose(engine, prompt, prefix, limit, params, extension_seed, stats)
                    chain.replace_suffix(len(chain.token_ids), ext)
                    _add(stats, "tokens_proposed", len(ext.token_ids))
                    _add(stats, "tokens_accepted", len(ext.token_ids))
                await self._mh_steps(request, chain, limit, draws, stats)
                if _ended(engine, chain.token_ids):
                    break
        finally:
            # Every generated token extended the chain, was tested by an MH step, or was
            # generated for a proposal discarded unseen (engines count into ``stats`` live).
            discarded = (stats.tokens_generated - generated) - (stats.extra["tokens_proposed"] - proposed)
            _add(stats, "tokens_discarded", discarded)

        for tok, lq, lp in zip(chain.token_ids, chain.logq, chain.logp, strict=True):
            yield TokenStep(token_id=tok, logq=lq, logp=lp)

    async def _mh_steps(
        self, request: DecodeRequest, chain: _Chain, limit: int, draws: list[_StepDraws], stats: EngineStats
    ) -> None:
        """Run one block's MH steps (step 2 of :meth:`decode`), updating ``chain`` in place.

        With P = ``parallel_proposals`` the proposals of steps s, ..., s + P - 1 are in flight
        at once, all drawn from the current state x:

        1. Keep P proposals in flight: start those of the next steps from x, step s's with
           position draws[s].position(n(x)) and engine seed draws[s].seed.
        2. Wait for step s's proposal (in step order, never in order of completion: which
           proposal is tested must not depend on its content) and test it with draws[s].u_acc.
        3. Rejected: x is unchanged, so the proposals in flight for s + 1, ... are exactly
           what those steps would draw from x; go on with s + 1.
           Accepted: x changed; cancel and discard the proposals in flight (counted in
           ``tokens_discarded``) and start s + 1, ... afresh from the new state.

        A step's outcome depends only on the state it sees and its own draws, so the chain is
        the one that P = 1 (one proposal at a time) produces; only the discarded proposals
        cost extra engine work.
        """
        params = request.params
        assert isinstance(params, PowerMcmcParams)
        in_flight: deque[_Proposal] = deque()
        started = 0  # steps whose proposal is in flight or done

        def start(step: int) -> None:
            n = len(chain.token_ids)
            assert n >= 1, "the chain has at least one token after its first extension"
            i = draws[step].position(n)
            call = _propose(
                self.engine, request.prompt_ids, chain.token_ids[:i], limit, params, draws[step].seed, stats
            )
            in_flight.append(_Proposal(step, i, asyncio.ensure_future(call)))

        try:
            for s, step_draws in enumerate(draws):
                while started < min(s + params.parallel_proposals, len(draws)):
                    start(started)
                    started += 1
                proposal = in_flight.popleft()
                assert proposal.step == s
                new = await proposal.task
                if self._test(params, chain, proposal.i, new, step_draws.u_acc, stats):
                    await _discard(in_flight, stats)
                    started = s + 1
        finally:
            await _discard(in_flight, stats)  # the chain was cancelled, or failed

    @staticmethod
    def _test(params: PowerMcmcParams, chain: _Chain, i: int, new: Continuation, u: float, stats: EngineStats) -> bool:
        """The Metropolis-Hastings test of ``new`` as the chain's suffix from ``i``; applies it."""
        n_old = len(chain.token_ids)
        n_new = i + len(new.token_ids)
        log_a = log_acceptance(params.alpha, chain.logp[i:], chain.logq[i:], new.logp, new.logq, n_old, n_new)
        accept = log_a >= 0.0 or u < math.exp(log_a)
        _add(stats, "proposals", 1)
        _add(stats, "tokens_proposed", len(new.token_ids))
        if accept:
            chain.replace_suffix(i, new)
            _add(stats, "accepted_proposals", 1)
            _add(stats, "tokens_accepted", len(new.token_ids))
        stats.extra["acceptance_rate"] = stats.extra["accepted_proposals"] / stats.extra["proposals"]
        return accept


def _draw_steps(rng: np.random.Generator, steps: int) -> list[_StepDraws]:
    """The random numbers of ``steps`` MH steps: positions, then seeds, then acceptances."""
    u_pos = rng.random(steps)
    seeds = rng.integers(_SEED_BOUND, size=steps)
    u_acc = rng.random(steps)
    return [_StepDraws(float(a), int(b), float(c)) for a, b, c in zip(u_pos, seeds, u_acc, strict=True)]


async def _discard(in_flight: deque[_Proposal], stats: EngineStats) -> None:
    """Cancel the proposals in flight and wait until they have stopped (so that no engine work
    is counted for them afterwards)."""
    for p in in_flight:
        p.task.cancel()
    if in_flight:
        # Kept in ``in_flight`` until they have stopped: if this wait is itself cancelled, the
        # caller's clean-up waits for them again.
        await asyncio.gather(*(p.task for p in in_flight), return_exceptions=True)
    _add(stats, "proposals_discarded", len(in_flight))
    in_flight.clear()


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
    spec = SamplingSpec(max_tokens=limit - len(prefix), temperature=1.0 / params.alpha, seed=seed)
    cont = await engine.sample([*prompt_ids, *prefix], spec, stats)
    assert cont.token_ids, "an engine call with max_tokens >= 1 returns at least one token"
    return cont
