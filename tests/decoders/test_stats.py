"""ProposalStats: the typed reading of the decoder counters that serving turns into metrics."""

from __future__ import annotations

from powerserve.decoders.stats import ProposalStats


def test_no_proposals_means_no_rate_and_no_token_counts() -> None:
    stats = ProposalStats.of({"tokens_decided": 3.0})
    assert stats.tokens_proposed is None and stats.proposals is None and stats.acceptance_rate is None


def test_rate_is_accepted_over_attempted() -> None:
    stats = ProposalStats.of(
        {"tokens_proposed": 40.0, "tokens_accepted": 12.0, "proposals": 8.0, "accepted_proposals": 2.0}
    )
    assert (stats.tokens_proposed, stats.tokens_accepted) == (40.0, 12.0)
    assert stats.acceptance_rate == 0.25


def test_zero_moves_has_no_rate() -> None:
    """A chain with mcmc_steps 0 keeps proposals = 0: no rate (not a division by zero)."""
    stats = ProposalStats.of({"tokens_proposed": 5.0, "proposals": 0.0, "accepted_proposals": 0.0})
    assert stats.proposals == 0.0 and stats.acceptance_rate is None
