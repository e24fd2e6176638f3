"""``power_mcmc``: Metropolis-Hastings power sampling (Karan & Du, 2025), exact and seeded.

Samples from the sequence-level power distribution p(x)^alpha / Z by a Metropolis-Hastings
chain over whole continuations whose proposal is the model at temperature 1/alpha. Unlike
the reference code it works in token ids only, takes the index-selection term into account
when a proposal ends at a different length, and draws every random number from one
per-request generator, so ``seed`` reproduces the whole chain.
"""

from __future__ import annotations

import math
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
    block_size: int = Field(192, ge=1, description="tokens added to the chain per block before its MCMC steps run")
    mcmc_steps: int = Field(
        10, ge=0, description="Metropolis-Hastings steps after each block (0: plain temperature 1/alpha)"
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


_COUNTERS = ("tokens_proposed", "tokens_accepted", "proposals", "accepted_proposals")


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
        L_k - L_{k-1} tokens and each of its S steps resamples at most L_k tokens, so at most
        T + S * sum_k L_k tokens are generated. An engine that cannot return log p while
        sampling scores every generated token once more, hence the factor 2. (The average
        step resamples about half the sequence, so the typical cost is well below this.)
        """
        assert isinstance(params, PowerMcmcParams)
        generated = max_tokens + params.mcmc_steps * sum(block_limits(max_tokens, params.block_size))
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
           with S_p, S_q the sums of log p and log q over the suffixes from i.
        3. Stop after the block if x ended with EOS.

        Within a block the chain leaves p^alpha (restricted to length <= L_k) invariant, so
        the last block (L_k = max_tokens) targets p(x)^alpha / Z exactly. All randomness --
        positions, acceptance uniforms and the seed of every engine call -- comes from one
        generator seeded with ``request.seed`` (fresh entropy if None).
        """
        params = request.params
        assert isinstance(params, PowerMcmcParams)
        rng = np.random.default_rng(request.seed)
        engine = self.engine
        chain = _Chain()
        for key in _COUNTERS:
            _add(stats, key, 0)

        for limit in block_limits(request.max_tokens, params.block_size):
            if not _ended(engine, chain.token_ids) and len(chain.token_ids) < limit:
                ext = await _propose(engine, request.prompt_ids, chain.token_ids, limit, params, rng, stats)
                chain.replace_suffix(len(chain.token_ids), ext)
                _add(stats, "tokens_proposed", len(ext.token_ids))
                _add(stats, "tokens_accepted", len(ext.token_ids))
            for _ in range(params.mcmc_steps):
                await self._mh_step(request, chain, limit, rng, stats)
            if _ended(engine, chain.token_ids):
                break

        for tok, lq, lp in zip(chain.token_ids, chain.logq, chain.logp, strict=True):
            yield TokenStep(token_id=tok, logq=lq, logp=lp)

    async def _mh_step(
        self, request: DecodeRequest, chain: _Chain, limit: int, rng: np.random.Generator, stats: EngineStats
    ) -> None:
        """One Metropolis-Hastings step (step 2 of :meth:`decode`), updating ``chain`` in place."""
        params = request.params
        assert isinstance(params, PowerMcmcParams)
        n_old = len(chain.token_ids)
        assert n_old >= 1, "the chain has at least one token after its first extension"
        i = int(rng.integers(n_old))
        new = await _propose(self.engine, request.prompt_ids, chain.token_ids[:i], limit, params, rng, stats)
        n_new = i + len(new.token_ids)
        log_a = log_acceptance(params.alpha, chain.logp[i:], chain.logq[i:], new.logp, new.logq, n_old, n_new)
        u = rng.random()  # drawn on every step, so the random stream does not depend on log A
        accept = log_a >= 0.0 or u < math.exp(log_a)
        _add(stats, "proposals", 1)
        _add(stats, "tokens_proposed", len(new.token_ids))
        if accept:
            chain.replace_suffix(i, new)
            _add(stats, "accepted_proposals", 1)
            _add(stats, "tokens_accepted", len(new.token_ids))
        stats.extra["acceptance_rate"] = stats.extra["accepted_proposals"] / stats.extra["proposals"]


def _ended(engine: Engine, token_ids: Sequence[int]) -> bool:
    return bool(token_ids) and token_ids[-1] in engine.eos_token_ids


async def _propose(
    engine: Engine,
    prompt_ids: Sequence[int],
    prefix: Sequence[int],
    limit: int,
    params: PowerMcmcParams,
    rng: np.random.Generator,
    stats: EngineStats,
) -> Continuation:
    """Sample a continuation of ``prompt + prefix`` from q, up to a chain length of ``limit``."""
    spec = SamplingSpec(
        max_tokens=limit - len(prefix),
        temperature=1.0 / params.alpha,
        seed=int(rng.integers(_SEED_BOUND)),
    )
    cont = await engine.sample([*prompt_ids, *prefix], spec, stats)
    assert cont.token_ids, "an engine call with max_tokens >= 1 returns at least one token"
    return cont
