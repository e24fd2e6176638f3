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
from collections.abc import AsyncIterator, Sequence
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


class Engine(abc.ABC):
    """A loaded model that can sample continuations of token ids and score tokens.

    Implementations must be safe to call from many concurrent asyncio tasks; they batch
    concurrent calls where they can. Cancelling the task that iterates :meth:`generate`
    (or closing the iterator) must stop the engine work for that sequence.
    """

    name: EngineName
    model_name: str
    max_model_len: int
    eos_token_ids: frozenset[int]
    tokenizer: Any  # a Hugging Face tokenizer; None only for tokenizer-less test engines

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats) -> AsyncIterator[TokenStep]:
        """Sample a continuation of ``prompt_ids`` token by token.

        Yields each token as soon as it is sampled. Stops after an end-of-sequence token
        (yielded) or after ``spec.max_tokens`` tokens. Counts one call and each generated
        token in ``stats``.
        """

    @abc.abstractmethod
    async def score(self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats) -> list[float]:
        """Return log p(token_ids[t] | prompt_ids + token_ids[:t]) under the raw model.

        Counts one call and ``len(token_ids)`` scored tokens in ``stats``.
        """

    async def sample(self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats) -> Continuation:
        """Draw a whole continuation with both log p and log q for every token.

        1. Generate with ``spec``, keeping each token's log q (and log p when free).
        2. If log p is missing and the sampling distribution is not the raw model, score the
           tokens in one extra call; if it is the raw model, log p = log q.
        """
        steps = [step async for step in self.generate(prompt_ids, spec, stats)]
        ids = [s.token_id for s in steps]
        logq = [s.logq for s in steps]
        known = [s.logp for s in steps]
        if all(v is not None for v in known):
            logp = [float(v) for v in known if v is not None]
        elif spec.is_raw:
            logp = list(logq)
        else:
            logp = await self.score(prompt_ids, ids, stats) if ids else []
        return Continuation(ids, logp, logq, self.finish_reason(ids, spec.max_tokens))

    def finish_reason(self, token_ids: Sequence[int], max_tokens: int) -> FinishReason:
        if token_ids and token_ids[-1] in self.eos_token_ids:
            return "stop"
        return "length"

    async def top_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        """For each position of ``token_ids``, the ``k`` most likely tokens under the raw model
        with their log-probabilities (for the OpenAI ``logprobs`` field).

        Counts one call and ``len(token_ids)`` scored tokens in ``stats``.
        """
        raise NotImplementedError(f"the {self.name} engine does not report top log-probabilities")

    def metrics_text(self) -> str:
        """Extra Prometheus exposition text the engine contributes to ``/metrics``."""
        return ""

    async def check_health(self) -> None:  # noqa: B027 (optional hook)
        """Raise if the engine cannot serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Release the model and any background processes."""
