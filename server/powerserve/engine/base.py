"""The narrow interface between decoders and a model engine.

Decoders see only this module: they ask for a continuation of token ids, sampled from the
model at some temperature (optionally truncated), with per-token log-probabilities, and for the
raw log-probabilities of given tokens. Nothing here knows about HTTP or about vLLM internals.

Two log-probabilities travel with every sampled token:

- ``logq``: the log-probability under the distribution the token was actually drawn from
  (after temperature, top-k and top-p) -- the proposal term of Metropolis-Hastings.
- ``logp``: the log-probability under the raw model (temperature 1, no truncation) -- the
  target term and the self-reward. An engine that gets it for free fills it in while
  sampling; otherwise :meth:`Engine.sample` scores the tokens afterwards.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

EngineName = Literal["torch", "vllm"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """How to draw one continuation. ``top_k = 0`` and ``top_p = 1`` mean no truncation."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, "max_tokens must be positive"
        assert self.temperature > 0, "greedy decoding is temperature -> 0, not 0"
        assert 0 < self.top_p <= 1 and self.top_k >= 0

    @property
    def is_raw(self) -> bool:
        """True when the sampling distribution is the raw model, so logq == logp."""
        return self.temperature == 1.0 and self.top_p >= 1.0 and self.top_k == 0


@dataclass(slots=True)
class TokenStep:
    """One sampled token with its log-probabilities (``logp`` None if not known yet)."""

    token_id: int
    logq: float
    logp: float | None = None


@dataclass(slots=True)
class Continuation:
    """A finished sample: tokens with raw (``logp``) and proposal (``logq``) log-probabilities.

    ``finish_reason`` is ``"stop"`` when the last token is an end-of-sequence token (which is
    kept in ``token_ids``: it is part of the sequence whose probability is measured), else
    ``"length"``.
    """

    token_ids: list[int]
    logp: list[float]
    logq: list[float]
    finish_reason: FinishReason

    def __post_init__(self) -> None:
        assert len(self.token_ids) == len(self.logp) == len(self.logq)


@dataclass(slots=True)
class EngineStats:
    """Work done by an engine on behalf of one request; decoders and serving add to it."""

    calls: int = 0
    tokens_generated: int = 0
    tokens_scored: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, value: float) -> None:
        """Add ``value`` to the counter ``extra[key]`` (created at 0)."""
        self.extra[key] = self.extra.get(key, 0.0) + value

    def absorb(self, other: EngineStats) -> None:
        """Add ``other``'s engine work (calls, generated and scored tokens); not its ``extra``."""
        self.calls += other.calls
        self.tokens_generated += other.tokens_generated
        self.tokens_scored += other.tokens_scored


class Engine(abc.ABC):
    """A loaded model that can sample continuations of token ids and score tokens.

    Implementations must be safe to call from many concurrent asyncio tasks; they batch
    concurrent calls where they can. Cancelling the task that iterates :meth:`generate`
    (or closing the iterator) must stop the engine work for that sequence.

    The public methods are template methods: they check lengths, handle empty input and count
    the work in :class:`EngineStats` once, here, then call the backend's hook (``_generate``,
    ``_score``, ``_top_logprobs``), which does only the model-specific part. (A test engine may
    override a public method whole instead; the hooks are not abstract for that reason.)
    """

    name: EngineName
    model_name: str
    max_model_len: int
    eos_token_ids: frozenset[int]
    tokenizer: Any  # a Hugging Face tokenizer; None only for tokenizer-less test engines

    # --- template methods ---------------------------------------------------------------------

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        """Sample a continuation of ``prompt_ids`` token by token.

        Yields each token as soon as it is sampled. Stops after an end-of-sequence token
        (yielded) or after ``spec.max_tokens`` tokens. Counts one call and each generated
        token in ``stats``. Raises ``ValueError`` if the prompt is empty or
        ``len(prompt_ids) + spec.max_tokens > max_model_len``.

        Closing this iterator closes the backend's ``_generate`` stream, which stops its work.
        """
        prompt = list(prompt_ids)
        self.check_lengths(len(prompt), spec.max_tokens)
        stats.calls += 1
        steps = self._generate(prompt, spec, stats)
        try:
            produced = 0
            async for step in steps:
                produced += 1
                stats.tokens_generated += 1
                yield step
                if step.token_id in self.eos_token_ids or produced == spec.max_tokens:
                    return
        finally:
            await steps.aclose()

    async def score(self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats) -> list[float]:
        """Return log p(token_ids[t] | prompt_ids + token_ids[:t]) under the raw model.

        Counts one call and ``len(token_ids)`` scored tokens in ``stats`` (also for no tokens,
        which returns ``[]`` without model work). Raises ``ValueError`` if the prompt is empty
        or the whole sequence exceeds ``max_model_len``.
        """
        prompt, tokens = list(prompt_ids), list(token_ids)
        self._count_scoring(len(prompt), len(tokens), stats)
        return await self._score(prompt, tokens, stats) if tokens else []

    async def top_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        """For each position of ``token_ids``, the ``k`` most likely tokens under the raw model
        with their log-probabilities (for the OpenAI ``logprobs`` field).

        Counts, checks and handles no tokens as :meth:`score` does.
        """
        prompt, tokens = list(prompt_ids), list(token_ids)
        self._count_scoring(len(prompt), len(tokens), stats)
        return await self._top_logprobs(prompt, tokens, k, stats) if tokens else []

    async def sample(self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats) -> Continuation:
        """Draw a whole continuation with both log p and log q for every token.

        1. Generate with ``spec``, keeping each token's log q (and log p when free).
        2. Complete log p with :meth:`logp_or_score` (log q stands in when ``spec`` is the raw
           model).
        """
        steps = [step async for step in self.generate(prompt_ids, spec, stats)]
        ids = [s.token_id for s in steps]
        logp = await self.logp_or_score(prompt_ids, steps, stats, raw=spec.is_raw)
        return Continuation(ids, logp, [s.logq for s in steps], self.finish_reason(ids, spec.max_tokens))

    async def logp_or_score(
        self, prompt_ids: Sequence[int], steps: Sequence[TokenStep], stats: EngineStats, *, raw: bool = False
    ) -> list[float]:
        """Raw log p of every step's token: the ones the steps carry if all are known, else all
        of them scored in one :meth:`score` call.

        ``raw``: the steps were drawn from the raw model (``SamplingSpec.is_raw``), so log q is
        log p and stands in for a missing one. No steps: ``[]``, without an engine call.
        """
        known = [s.logp if s.logp is not None or not raw else s.logq for s in steps]
        if all(v is not None for v in known):
            return [float(v) for v in known if v is not None]
        return await self.score(prompt_ids, [s.token_id for s in steps], stats)

    def finish_reason(self, token_ids: Sequence[int], max_tokens: int) -> FinishReason:
        if token_ids and token_ids[-1] in self.eos_token_ids:
            return "stop"
        return "length"

    def check_lengths(self, prompt_len: int, new_tokens: int) -> None:
        """Raise ``ValueError`` unless ``1 <= prompt_len`` and ``prompt_len + new_tokens <= max_model_len``."""
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + new_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len}) + new tokens ({new_tokens}) exceeds max_model_len ({self.max_model_len})"
            )

    def _count_scoring(self, prompt_len: int, tokens: int, stats: EngineStats) -> None:
        self.check_lengths(prompt_len, tokens)
        stats.calls += 1
        stats.tokens_scored += tokens

    # --- backend hooks: the model-specific part -----------------------------------------------

    def _generate(self, prompt: list[int], spec: SamplingSpec, stats: EngineStats) -> AsyncGenerator[TokenStep, None]:
        """Yield sampled tokens for :meth:`generate` (lengths checked; call and tokens counted
        there). May yield past an end-of-sequence token: :meth:`generate` stops there and
        closes this stream, which must then stop the work. May add backend counters to
        ``stats.extra``."""
        raise NotImplementedError(f"the {self.name} engine does not sample")

    async def _score(self, prompt: list[int], tokens: list[int], stats: EngineStats) -> list[float]:
        """:meth:`score` for a non-empty ``tokens`` (checked and counted already)."""
        raise NotImplementedError(f"the {self.name} engine does not score")

    async def _top_logprobs(
        self, prompt: list[int], tokens: list[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        """:meth:`top_logprobs` for a non-empty ``tokens`` (checked and counted already)."""
        raise NotImplementedError(f"the {self.name} engine does not report top log-probabilities")

    # --- optional hooks -----------------------------------------------------------------------

    def metrics_text(self) -> str:
        """Extra Prometheus exposition text the engine contributes to ``/metrics``."""
        return ""

    async def check_health(self) -> None:  # noqa: B027 (optional hook)
        """Raise if the engine cannot serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the model and any background processes."""
