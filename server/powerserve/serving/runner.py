"""Running a plan: where serving meets a decoder.

For every choice it drives the decoder, detokenises and applies stop strings, measures
the self-reward of the returned tokens under the base model (scoring them if the decoder did
not already carry raw log-probabilities), and at the end records the request's cost and
outcome in the Prometheus series. Streaming and non-streaming responses share this path;
streaming just listens to the deltas as they come, and reads :meth:`Runner.progress` (the live
counters of each choice) while a decoder that does not stream works.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from powerserve import metrics
from powerserve.decoders.base import DecodeRequest, DecoderParams
from powerserve.decoders.stats import PROGRESS_KEYS, ProposalStats
from powerserve.engine.base import EngineStats, FinishReason
from powerserve.errors import RequestTimeoutError, ServiceUnavailableError
from powerserve.protocol import ChoiceCost, PowerserveInfo, SelfReward, Usage
from powerserve.serving.plan import Plan
from powerserve.serving.state import ServerState
from powerserve.text import Detokenizer

SHUTDOWN = "powerserve-shutdown"  # the cancel message a draining server sends to running requests

# Tokens detokenised (and scanned for stop strings) between two yields to the event loop.
YIELD_EVERY_TOKENS = 32


@dataclass(slots=True)
class Delta:
    """New final text of one choice; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None


@dataclass(slots=True)
class ChoiceResult:
    index: int
    prompt_tokens: int
    token_ids: list[int]
    logp: list[float]
    text: str
    finish_reason: FinishReason
    stats: EngineStats
    top: list[dict[int, float]] | None = None
    streamed: int = 0  # tokens yielded before the decoder spent its last engine token


@dataclass(slots=True)
class Outcome:
    choices: list[ChoiceResult]
    info: PowerserveInfo
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )


@dataclass
class Runner:
    """Executes one plan. ``on_delta`` (if given) receives text as soon as it is final."""

    state: ServerState
    plan: Plan
    on_delta: Callable[[Delta], None] | None = None
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    live: dict[int, EngineStats] = field(default_factory=dict)  # choice index -> its running counters
    yielded: dict[int, int] = field(default_factory=dict)  # choice index -> tokens out of the decoder

    def progress(self) -> dict[str, object]:
        """Where the running choices stand: ``{"elapsed_s", "choices": [...]}``.

        Each choice reports ``index``, ``engine_tokens`` (generated + scored so far),
        ``tokens_out`` (tokens the decoder has released) and, where its decoder keeps them
        in ``EngineStats.extra``, the keys of :data:`PROGRESS_KEYS`; ``acceptance_rate`` is
        accepted_proposals / proposals when the decoder has proposals but no rate yet.
        """
        choices: list[dict[str, object]] = []
        for index, stats in sorted(self.live.items()):
            entry: dict[str, object] = {
                "index": index,
                "engine_tokens": stats.tokens_generated + stats.tokens_scored,
                "tokens_out": self.yielded.get(index, 0),
            }
            entry.update({k: stats.extra[k] for k in PROGRESS_KEYS if k in stats.extra})
            rate = ProposalStats.of(stats.extra).acceptance_rate
            if rate is not None:
                entry.setdefault("acceptance_rate", rate)
            choices.append(entry)
        return {"elapsed_s": round(time.perf_counter() - self.started, 3), "choices": choices}

    @property
    def labels(self) -> tuple[str, str]:
        return (self.plan.decoder.metric_label(self.plan.params), self.state.model_name)

    async def run(self) -> Outcome:
        """Admit (or queue, or refuse), decode every choice within the deadline, account.

        Errors: RateLimitError (429) or ServiceUnavailableError (503, draining) at admission;
        RequestTimeoutError (504) when the deadline passes; ServiceUnavailableError when a
        shutdown cancels the work. A plain cancellation (client gone) propagates.
        """
        admission = self.state.admission
        ticket = admission.reserve(self.plan.weight, self.labels)
        try:
            async with asyncio.timeout(self.plan.timeout_s), admission.hold(ticket):
                results = await self._run_counted()
        except TimeoutError:
            metrics.REQUESTS.labels(*self.labels, "timeout").inc()
            raise RequestTimeoutError(
                f"The request did not finish within its {self.plan.timeout_s:g} s deadline; its work was stopped.",
                code="request_timeout",
            ) from None
        except asyncio.CancelledError as exc:
            metrics.REQUESTS.labels(*self.labels, "cancelled").inc()
            if exc.args == (SHUTDOWN,):
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
                raise ServiceUnavailableError(
                    "The server shut down before the request finished.", code="server_shutdown"
                ) from None
            raise
        except Exception:
            metrics.REQUESTS.labels(*self.labels, "error").inc()
            raise
        outcome = self._summarise(results)
        self._record(outcome)
        return outcome

    async def _run_counted(self) -> list[ChoiceResult]:
        running = metrics.REQUESTS_RUNNING.labels(*self.labels)
        running.inc()
        try:
            return await self._run_all()
        finally:
            running.dec()

    async def _run_all(self) -> list[ChoiceResult]:
        sequences = self.plan.sequences()
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._run_choice(index, request)) for index, request in sequences]
        except ExceptionGroup as group_error:
            # One failed choice fails the request (the others were cancelled): report its error.
            raise group_error.exceptions[0] from None
        return sorted((t.result() for t in tasks), key=lambda r: r.index)

    async def _run_choice(self, index: int, request: DecodeRequest[DecoderParams]) -> ChoiceResult:
        engine = self.state.engine
        stats = EngineStats()
        self.live[index] = stats
        if request.max_tokens == 0:  # echo with max_tokens 0: only the prompt is scored (serving/echo.py)
            return ChoiceResult(index, len(request.prompt_ids), [], [], "", "length", stats)
        incremental = self.on_delta is not None or bool(self.plan.stop)
        detok = Detokenizer(self.state.tokenizer, self.plan.stop, self.state.special_ids, incremental)
        steps = []
        spent_at: list[int] = []  # engine tokens spent when each step came out
        agen = self.plan.decoder.decode(request, stats)
        try:
            async for step in agen:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                steps.append(step)
                spent_at.append(stats.tokens_generated + stats.tokens_scored)
                self.yielded[index] = len(steps)
                if len(steps) % YIELD_EVERY_TOKENS == 0:
                    # A decoder that yields its whole answer at once (power_mcmc) would otherwise
                    # hold the event loop for the detokenising and stop scan of all of it.
                    await asyncio.sleep(0)
                text = detok.add(step.token_id)
                if text:
                    self._emit(Delta(index, text, [step.token_id]))
                if detok.stopped:
                    break
        finally:
            await agen.aclose()  # type: ignore[attr-defined]
        spent = stats.tokens_generated + stats.tokens_scored
        streamed = sum(1 for x in spent_at if x < spent)
        ids = [s.token_id for s in steps]
        reason: FinishReason = "stop" if detok.stopped else engine.finish_reason(ids, request.max_tokens)
        self._emit(Delta(index, detok.finish(), [], reason))

        logp = await engine.logp_or_score(request.prompt_ids, steps, stats)
        top = None
        if self.plan.logprobs and ids:
            top = await engine.top_logprobs(request.prompt_ids, ids, self.plan.logprobs, stats)
        return ChoiceResult(index, len(request.prompt_ids), ids, logp, detok.text, reason, stats, top, streamed)

    def _emit(self, delta: Delta) -> None:
        if self.on_delta is not None and (delta.text or delta.finish_reason):
            self.on_delta(delta)

    def _summarise(self, results: list[ChoiceResult]) -> Outcome:
        wall = time.perf_counter() - self.started
        completion = sum(len(r.token_ids) for r in results)
        generated = sum(r.stats.tokens_generated for r in results)
        scored = sum(r.stats.tokens_scored for r in results)
        decoder_stats: dict[str, float] = {}
        for r in results:
            for key, value in r.stats.extra.items():
                decoder_stats[key] = _combine(key, decoder_stats.get(key), value)
        summed = ProposalStats.of(decoder_stats)
        if summed.proposals is not None:  # rates are recomputed from the sums, not summed
            decoder_stats["acceptance_rate"] = summed.acceptance_rate or 0.0
        info = PowerserveInfo(
            decoder=self.plan.decoder.name,
            params=self.plan.params.model_dump(),
            engine=self.state.engine.name,
            engine_calls=sum(r.stats.calls for r in results),
            tokens_generated=generated,
            tokens_scored=scored,
            wall_time_s=round(wall, 6),
            cost_multiplier=(generated + scored) / completion if completion else None,
            self_reward=_self_reward([x for r in results for x in r.logp]),
            decoder_stats=decoder_stats,
            choices=[
                ChoiceCost(index=r.index, self_reward=_self_reward(r.logp), decoder_stats=dict(r.stats.extra))
                for r in results
            ],
        )
        prompt_tokens = sum(len(p) for p in self.plan.prompts)
        return Outcome(results, info, prompt_tokens, completion)

    def _record(self, outcome: Outcome) -> None:
        labels = self.labels
        info = outcome.info
        metrics.REQUESTS.labels(*labels, "success").inc()
        metrics.observe("latency", labels, info.wall_time_s)
        if self.first_token_at is not None:
            metrics.observe("ttft", labels, self.first_token_at - self.started)
        metrics.OUTPUT_TOKENS.labels(*labels).inc(outcome.completion_tokens)
        metrics.PROMPT_TOKENS.labels(*labels).inc(outcome.prompt_tokens)
        metrics.ENGINE_TOKENS_GENERATED.labels(*labels).inc(info.tokens_generated)
        metrics.ENGINE_TOKENS_SCORED.labels(*labels).inc(info.tokens_scored)
        metrics.ENGINE_CALLS.labels(*labels).inc(info.engine_calls)
        if info.cost_multiplier is not None:
            metrics.COST_MULTIPLIER.labels(*labels).observe(info.cost_multiplier)
        metrics.SELF_REWARD_NEG_LOGPROB.labels(*labels).inc(max(0.0, -info.self_reward.sum_logprob))
        for choice in outcome.choices:
            if choice.logp:
                metrics.observe("self_reward", labels, math.fsum(choice.logp) / len(choice.logp))
            if choice.token_ids:
                metrics.observe("streamed_fraction", labels, choice.streamed / len(choice.token_ids))
            proposal = ProposalStats.of(choice.stats.extra)
            if proposal.tokens_proposed is not None:
                metrics.TOKENS_PROPOSED.labels(*labels).inc(proposal.tokens_proposed)
                metrics.TOKENS_ACCEPTED.labels(*labels).inc(proposal.tokens_accepted)
            if proposal.acceptance_rate is not None:
                metrics.ACCEPTANCE_RATE.labels(*labels).observe(proposal.acceptance_rate)


def _combine(key: str, acc: float | None, value: float) -> float:
    """Request-level value of a per-choice decoder counter: extremes stay extremes, counts add."""
    if acc is None:
        return value
    if key.endswith("_min"):
        return min(acc, value)
    if key.endswith("_max"):
        return max(acc, value)
    return acc + value


def _self_reward(logp: list[float]) -> SelfReward:
    total = math.fsum(logp)
    return SelfReward(sum_logprob=total, mean_logprob=total / len(logp) if logp else None, tokens=len(logp))
