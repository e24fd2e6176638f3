"""A LoRA adapter as an :class:`Engine`: the base vLLM engine with one adapter on every request.

The view owns nothing: it shares the base engine's ``AsyncLLM`` (so its requests batch with
the base model's), its tokenizer, context length and end-of-sequence ids. vLLM applies the
adapter per request (``LoRARequest``); requests without one run the plain base weights.
Shutting the view down is a no-op; the base engine's owner shuts the model down.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep

if TYPE_CHECKING:
    from powerserve.engine.vllm_engine import VllmEngine


class LoraEngine(Engine):
    """``base`` with the adapter ``lora`` (a ``vllm.lora.request.LoRARequest``) applied."""

    name = "vllm"

    def __init__(self, base: VllmEngine, lora: Any, model_name: str) -> None:
        self.base = base
        self.lora = lora
        self.model_name = model_name
        self.max_model_len = base.max_model_len
        self.eos_token_ids = base.eos_token_ids
        self.tokenizer = base.tokenizer

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats
    ) -> AsyncIterator[TokenStep]:
        """The base engine's :meth:`generate` with the adapter: log q is under the adapted model."""
        async for step in self.base.generate(prompt_ids, spec, stats, lora=self.lora):
            yield step

    async def score(self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats) -> list[float]:
        """log p of ``token_ids`` under the *adapted* model (the student), not the base."""
        return await self.base.score(prompt_ids, token_ids, stats, lora=self.lora)

    async def check_health(self) -> None:
        await self.base.check_health()

    async def shutdown(self) -> None:
        """Nothing to release: the adapter lives in the base engine."""
