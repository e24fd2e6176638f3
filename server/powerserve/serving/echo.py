"""``echo`` on ``/v1/completions``: the prompt's tokens scored by the base model.

What log-likelihood evaluations need (lm-evaluation-harness sends ``echo: true, logprobs: 1,
max_tokens: 1`` and reads the prompt part): for a prompt x_1..x_n, the entries are

    token_logprobs = [null, log p(x_2 | x_1), ..., log p(x_n | x_<n)]  ++ the completion's

with the top-k alternatives at each position (null at the first). The prompt part is always
the raw base model (temperature 1, no truncation), whatever the decoder: the decoder only
chooses the completion. Each distinct prompt is scored once, and its engine work is added to
the request's cost (``engine_calls``, ``tokens_scored``, ``cost_multiplier``) and metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from powerserve import metrics
from powerserve.engine.base import Engine, EngineStats
from powerserve.serving.runner import Outcome


@dataclass(frozen=True, slots=True)
class PromptScores:
    """Per prompt token: raw log p given the tokens before it (None for the first), and with
    ``k`` requested the k most likely tokens there (None for the first)."""

    token_ids: tuple[int, ...]
    logp: list[float | None]
    top: list[dict[int, float] | None] | None


async def score_prompt(engine: Engine, prompt_ids: Sequence[int], k: int, stats: EngineStats) -> PromptScores:
    """Score ``prompt_ids[1:]`` after ``prompt_ids[:1]``; with ``k > 0`` also the top k.

    The token's own value and the top-k values come from two forward passes. Where the token is
    among the top k, both report the top-k value, so that ``token_logprob == max(top)`` holds
    exactly for a greedy token (lm-eval's ``is_greedy`` compares them with ``==``).
    """
    first, rest = list(prompt_ids[:1]), list(prompt_ids[1:])
    if not rest:
        return PromptScores(tuple(prompt_ids), [None], [None] if k else None)
    logp = await engine.score(first, rest, stats)
    if not k:
        return PromptScores(tuple(prompt_ids), [None, *logp], None)
    rows = await engine.top_logprobs(first, rest, k, stats)
    merged: list[float | None] = [row.get(t, lp) for t, lp, row in zip(rest, logp, rows, strict=True)]
    return PromptScores(tuple(prompt_ids), [None, *merged], [None, *rows])


async def score_prompts(
    engine: Engine, prompts: Sequence[tuple[int, ...]], k: int
) -> tuple[list[PromptScores], EngineStats]:
    """Score every prompt (concurrently, so an engine can batch them); one stats for all."""
    parts = [EngineStats() for _ in prompts]
    scores = await asyncio.gather(*(score_prompt(engine, p, k, s) for p, s in zip(prompts, parts, strict=True)))
    total = EngineStats()
    for s in parts:
        total.absorb(s)
    return list(scores), total


def add_cost(outcome: Outcome, stats: EngineStats, labels: tuple[str, str]) -> None:
    """Count the prompt scoring in the response's ``powerserve`` object and in the metrics.

    cost_multiplier = (tokens_generated + tokens_scored) / completion tokens, as for decoding.
    """
    info = outcome.info
    info.engine_calls += stats.calls
    info.tokens_scored += stats.tokens_scored
    if outcome.completion_tokens:
        info.cost_multiplier = (info.tokens_generated + info.tokens_scored) / outcome.completion_tokens
    metrics.ENGINE_TOKENS_SCORED.labels(*labels).inc(stats.tokens_scored)
    metrics.ENGINE_CALLS.labels(*labels).inc(stats.calls)
