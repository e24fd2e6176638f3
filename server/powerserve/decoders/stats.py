"""The decoder counters serving reads, typed: what a decoder proposed, what it kept, how it moved.

Decoders keep their counters in ``EngineStats.extra`` (name -> float, shown as-is in the
response's ``decoder_stats``). The few that serving turns into metrics and progress events are
read here, in one place, instead of by their names all over serving:

- ``tokens_proposed``: tokens the decoder drew from its proposal (candidates, particles,
  rollouts), and ``tokens_accepted``: the ones in the answer -> ``powerserve_proposal_tokens_*``.
- ``proposals``: accept/reject moves attempted (Metropolis steps), ``accepted_proposals``: the
  moves made; acceptance rate = accepted_proposals / proposals.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# Live counters that progress events report when a decoder keeps them (power_mcmc: blocks and
# Metropolis steps; power_smc: the decided tokens).
PROGRESS_KEYS = (
    "blocks_done",
    "blocks_total",
    "mh_steps_done",
    "mh_steps_total",
    "proposals",
    "accepted_proposals",
    "acceptance_rate",
    "tokens_decided",
)


@dataclass(frozen=True, slots=True)
class ProposalStats:
    """The proposal counters of one choice (or a request's sums of them)."""

    tokens_proposed: float | None  # None: the decoder draws no proposals (standard, temperature)
    tokens_accepted: float
    proposals: float | None  # None: the decoder has no accept/reject moves
    accepted_proposals: float

    @classmethod
    def of(cls, extra: Mapping[str, float]) -> ProposalStats:
        return cls(
            tokens_proposed=extra.get("tokens_proposed"),
            tokens_accepted=extra.get("tokens_accepted", 0.0),
            proposals=extra.get("proposals"),
            accepted_proposals=extra.get("accepted_proposals", 0.0),
        )

    @property
    def acceptance_rate(self) -> float | None:
        """accepted_proposals / proposals; None when no move was attempted."""
        return self.accepted_proposals / self.proposals if self.proposals else None
