"""The template methods of :class:`Engine`: length checks, empty input and counting happen once,
in the base class, whatever the backend; and log p comes from the steps or from one score call."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import pytest

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep

EOS = 0


class CountingBackend(Engine):
    """Hooks that record their calls: token t of a continuation is ``t + 1`` (EOS once
    ``eos_at`` is reached), log q = -1, log p = -2 (None when ``logp_known`` is False); every
    scored token gets -3 and every top entry {7: -0.5}."""

    name = "torch"

    def __init__(self, *, eos_at: int | None = None, logp_known: bool = True) -> None:
        self.model_name = "counting"
        self.max_model_len = 10
        self.eos_token_ids = frozenset({EOS})
        self.tokenizer = None
        self.eos_at = eos_at
        self.logp_known = logp_known
        self.hook_calls: list[str] = []
        self.closed_streams = 0

    async def _generate(
        self, prompt: list[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncGenerator[TokenStep, None]:
        self.hook_calls.append("generate")
        try:
            for t in range(1000):  # more than asked: the template method stops it
                token = EOS if t == self.eos_at else t + 1
                yield TokenStep(token, -1.0, -2.0 if self.logp_known else None)
        finally:
            self.closed_streams += 1

    async def _score(self, prompt: list[int], tokens: list[int], stats: EngineStats) -> list[float]:
        self.hook_calls.append("score")
        return [-3.0] * len(tokens)

    async def _top_logprobs(
        self, prompt: list[int], tokens: list[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        self.hook_calls.append("top")
        return [{7: -0.5} for _ in tokens]

    async def shutdown(self) -> None:
        pass


async def test_generate_counts_stops_and_closes_the_backend_stream() -> None:
    engine = CountingBackend()
    stats = EngineStats()
    steps = [s async for s in engine.generate([5, 6], SamplingSpec(max_tokens=4), stats)]
    assert [s.token_id for s in steps] == [1, 2, 3, 4]
    assert (stats.calls, stats.tokens_generated, engine.closed_streams) == (1, 4, 1)

    engine = CountingBackend(eos_at=2)
    steps = [s async for s in engine.generate([5], SamplingSpec(max_tokens=8), stats)]
    assert [s.token_id for s in steps] == [1, 2, EOS]  # EOS is yielded, then the stream ends
    assert (stats.calls, stats.tokens_generated, engine.closed_streams) == (2, 7, 1)


async def test_score_and_top_logprobs_count_and_skip_empty_input() -> None:
    engine = CountingBackend()
    stats = EngineStats()
    assert await engine.score([5], [1, 2, 3], stats) == [-3.0] * 3
    assert await engine.top_logprobs([5], [1, 2], 1, stats) == [{7: -0.5}] * 2
    assert (stats.calls, stats.tokens_scored) == (2, 5)
    assert await engine.score([5], [], stats) == []
    assert await engine.top_logprobs([5], [], 3, stats) == []
    assert (stats.calls, stats.tokens_scored) == (4, 5)  # counted as calls, no model work
    assert engine.hook_calls == ["score", "top"]


@pytest.mark.parametrize(
    ("prompt", "new", "match"),
    [([], 1, "at least one token"), ([5] * 4, 7, "max_model_len"), ([5] * 10, 1, "max_model_len")],
)
async def test_lengths_are_checked_before_any_work(prompt: list[int], new: int, match: str) -> None:
    engine = CountingBackend()
    stats = EngineStats()
    with pytest.raises(ValueError, match=match):
        await engine.score(prompt, [1] * new, stats)
    with pytest.raises(ValueError, match=match):
        await engine.top_logprobs(prompt, [1] * new, 2, stats)
    with pytest.raises(ValueError, match=match):
        _ = [s async for s in engine.generate(prompt, SamplingSpec(max_tokens=new), stats)]
    assert stats == EngineStats() and engine.hook_calls == []


async def test_a_whole_context_fits() -> None:
    engine = CountingBackend()
    assert len(await engine.score([5] * 4, [1] * 6, EngineStats())) == 6


async def test_logp_or_score() -> None:
    """log p from the steps when all carry it; log q when the steps are from the raw model;
    otherwise one score call for all tokens."""
    engine = CountingBackend()
    known = [TokenStep(1, -1.0, -2.0), TokenStep(2, -1.0, -2.5)]
    partly = [TokenStep(1, -1.0, -2.0), TokenStep(2, -1.0, None)]
    stats = EngineStats()
    assert await engine.logp_or_score([5], known, stats) == [-2.0, -2.5]
    assert await engine.logp_or_score([5], partly, stats, raw=True) == [-2.0, -1.0]
    assert await engine.logp_or_score([5], [], stats) == []
    assert stats.calls == 0
    assert await engine.logp_or_score([5], partly, stats) == [-3.0, -3.0]
    assert (stats.calls, stats.tokens_scored) == (1, 2)


async def test_sample_scores_only_when_log_p_is_missing() -> None:
    stats = EngineStats()
    cont = await CountingBackend().sample([5], SamplingSpec(max_tokens=3, temperature=0.5), stats)
    assert (cont.logp, cont.logq, cont.finish_reason) == ([-2.0] * 3, [-1.0] * 3, "length")
    assert (stats.calls, stats.tokens_scored) == (1, 0)

    engine = CountingBackend(eos_at=1, logp_known=False)
    cont = await engine.sample([5], SamplingSpec(max_tokens=3, temperature=0.5), stats)
    assert (cont.token_ids, cont.logp, cont.finish_reason) == ([1, EOS], [-3.0, -3.0], "stop")
    assert (stats.calls, stats.tokens_scored) == (3, 2)

    engine = CountingBackend(logp_known=False)
    cont = await engine.sample([5], SamplingSpec(max_tokens=2), stats)  # raw: log p = log q
    assert cont.logp == [-1.0, -1.0] and engine.hook_calls == ["generate"]
