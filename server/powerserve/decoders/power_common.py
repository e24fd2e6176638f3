"""What the power-sampling decoders share: the alpha parameter, the proposal, seeds, counters.

``temperature``, ``power_mcmc``, ``power_smc`` and ``power_lookahead`` all target (or
approximate) p(x)^alpha / Z and draw from the same proposal q, the model at temperature
1/alpha without truncation; each draws the seed of every engine call from one per-request
generator, so that a request's seed reproduces the whole run. A decoder file holds only its
algorithm; these pieces live here once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import Field

from powerserve.decoders.base import DecoderParams
from powerserve.engine.base import EngineStats, SamplingSpec, TokenStep

# Per-call engine seeds are drawn below this bound: every engine accepts a 31-bit seed.
SEED_BOUND = 2**31


class PowerParams(DecoderParams):
    """Parameters of a decoder of p(x)^alpha: the power exponent first."""

    alpha: float = Field(
        4.0, ge=1.0, le=100.0, description="power exponent: the target is p(x)^alpha (proposals at temperature 1/alpha)"
    )


def engine_seed(rng: np.random.Generator) -> int:
    """One engine-call seed, uniform below :data:`SEED_BOUND`."""
    return int(rng.integers(SEED_BOUND))


def engine_seeds(rng: np.random.Generator, k: int) -> list[int]:
    """k engine-call seeds in one draw (the same stream as ``rng.integers(SEED_BOUND, size=k)``)."""
    return [int(s) for s in rng.integers(SEED_BOUND, size=k)]


def proposal_spec(alpha: float, max_tokens: int, seed: int | None) -> SamplingSpec:
    """The proposal q: the raw model at temperature 1/alpha, no top-p or top-k truncation."""
    return SamplingSpec(max_tokens=max_tokens, temperature=1.0 / alpha, seed=seed)


def start_counters(stats: EngineStats, names: Iterable[str]) -> None:
    """Create the decoder's counters in ``stats.extra`` at 0, so a request that ends early
    still reports every one of them (see :class:`~powerserve.decoders.stats.ProposalStats`)."""
    for name in names:
        stats.add(name, 0)


def final_steps(token_ids: Sequence[int], logq: Sequence[float], logp: Sequence[float | None]) -> list[TokenStep]:
    """Decided tokens as steps, in order: what a decoder yields once they are final (the whole
    answer at the end, or a chosen block)."""
    return [TokenStep(token_id=t, logq=q, logp=p) for t, q, p in zip(token_ids, logq, logp, strict=True)]
