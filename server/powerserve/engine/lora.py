"""A LoRA adapter as an :class:`Engine`: the base vLLM engine with one adapter on every request.

The view owns nothing: it shares the base engine's ``AsyncLLM`` (so its requests batch with
the base model's), its tokenizer, context length and end-of-sequence ids. vLLM applies the
adapter per request (``LoRARequest``); requests without one run the plain base weights.
Shutting the view down is a no-op; the base engine's owner shuts the model down.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, Protocol

from powerserve.engine import vllm_requests
from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep


class VllmBase(Protocol):
    """What a view needs of its base engine (a :class:`~powerserve.engine.vllm_engine.VllmEngine`)."""

    max_model_len: int
    eos_token_ids: frozenset[int]
    tokenizer: Any
    stop_token_ids: list[int]

    @property
    def async_llm(self) -> Any: ...

    async def check_health(self) -> None: ...


class LoraEngine(Engine):
    """``base`` with the adapter ``lora`` (a ``vllm.lora.request.LoRARequest``) applied.

    Every log-probability it reports (log q while sampling, log p when scoring, top tokens) is
    under the *adapted* model (the student), not the base.
    """

    name = "vllm"

    def __init__(self, base: VllmBase, lora: Any, model_name: str) -> None:
        self.base = base
        self.lora = lora
        self.model_name = model_name
        self.max_model_len = base.max_model_len
        self.eos_token_ids = base.eos_token_ids
        self.tokenizer = base.tokenizer

    def _generate(self, prompt: list[int], spec: SamplingSpec, stats: EngineStats) -> AsyncGenerator[TokenStep, None]:
        return vllm_requests.sample_steps(self.base.async_llm, prompt, spec, self.base.stop_token_ids, self.lora)

    async def _score(self, prompt: list[int], tokens: list[int], stats: EngineStats) -> list[float]:
        return await vllm_requests.score_tokens(self.base.async_llm, prompt, tokens, self.max_model_len, self.lora)

    async def _top_logprobs(
        self, prompt: list[int], tokens: list[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        return await vllm_requests.top_tokens(self.base.async_llm, prompt, tokens, k, self.max_model_len, self.lora)

    async def check_health(self) -> None:
        await self.base.check_health()

    async def shutdown(self) -> None:
        """Nothing to release: the adapter lives in the base engine."""
