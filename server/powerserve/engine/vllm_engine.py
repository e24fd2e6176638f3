"""The production engine: a model held by vLLM's ``AsyncLLM``, through public vLLM APIs only.

Both log-probabilities decoders need come out of vLLM without patching it (see
:mod:`powerserve.engine.vllm_requests`): ``logq`` because the engine runs with
``logprobs_mode="processed_logprobs"``, ``logp`` from a prefill with ``prompt_logprobs``, which
vLLM computes from the raw logits whatever the logprobs mode.

vLLM batches concurrent requests from many asyncio tasks itself; breaking out of, closing or
cancelling :meth:`VllmEngine.generate` closes vLLM's own request stream, which aborts the
request in the engine core.

On CPU, chunked prefill is switched off (see :func:`powerserve.engine.vllm_args.scheduler_args`):
vLLM rewinds the random generator of a seeded request whose prompt was only partly prefilled in
a step, and a CPU ``torch.Generator`` cannot rewind, which killed the engine core under
concurrent seeded load. Once the engine core is dead, every call raises
:class:`~powerserve.errors.ServiceUnavailableError` (503, code ``engine_dead``) and
:meth:`VllmEngine.check_health` raises; the server's watchdog then exits the process
(``powerserve.server``).

LoRA (students of the ``distilled`` decoder): ``start(max_loras=N)`` enables vLLM's LoRA support
for up to N adapters in one batch; :meth:`VllmEngine.adapter` returns an
:class:`~powerserve.engine.lora.LoraEngine` view whose requests carry the adapter, so adapter
and base requests share the engine's batches; decoders never see vLLM types.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import AsyncGenerator, Iterable
from typing import Any, Unpack

from powerserve.engine import vllm_requests
from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep
from powerserve.engine.eos import eos_token_ids_at
from powerserve.engine.lora import LoraEngine
from powerserve.engine.vllm_args import EngineOptions, engine_args, worker_environment

log = logging.getLogger(__name__)


class VllmEngine(Engine):
    """An :class:`Engine` backed by ``vllm.v1.engine.async_llm.AsyncLLM``."""

    name = "vllm"

    def __init__(
        self, llm: Any, tokenizer: Any, *, model_name: str, max_model_len: int, eos_token_ids: Iterable[int]
    ) -> None:
        self.llm: Any = llm  # None once shut down
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = sorted(self.eos_token_ids)

    @classmethod
    async def start(
        cls,
        path: str,
        *,
        model_name: str,
        max_model_len: int,
        **options: Unpack[EngineOptions],
    ) -> VllmEngine:
        """Load ``path`` (a checkpoint directory or hub name) into a new vLLM engine.

        Blocks the event loop while vLLM starts (tens of seconds; its engine core runs in a
        spawned process, so the calling script needs an ``if __name__ == "__main__"`` guard):
        this runs once, before the server takes requests, and ``AsyncLLM`` must be built
        inside the event loop that will drive it. The arguments become vLLM's engine arguments
        in :func:`powerserve.engine.vllm_args.engine_args`: ``chunked_prefill`` (``None``, the
        default, is the safe choice for the platform); ``max_loras > 0`` enables LoRA adapters
        of rank up to ``max_lora_rank`` on ``lora_target_modules`` (None: every module vLLM
        supports, which wraps the output head too; on CPU vLLM then turns graph compilation off).
        End-of-sequence ids follow :mod:`powerserve.engine.eos`.
        """
        from transformers import AutoTokenizer
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(path, model_name=model_name, max_model_len=max_model_len, **options)
        for name, value in worker_environment(current_platform.is_cpu()).items():
            os.environ.setdefault(name, value)
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = eos_token_ids_at(path, tokenizer)
        log.info("starting vLLM on %s (dtype=%s, max_model_len=%d)", path, args.dtype, max_model_len)
        # No local name for the AsyncLLM: vLLM's start-up leaves a reference to this frame
        # behind, and a local here would keep the engine from being collected after shutdown.
        return cls(
            AsyncLLM.from_engine_args(args),
            tokenizer,
            model_name=model_name,
            max_model_len=max_model_len,
            eos_token_ids=eos,
        )

    def adapter(self, name: str, path: str, adapter_id: int) -> Engine:
        """A view of this engine that runs every request with the LoRA adapter at ``path``."""
        from vllm.lora.request import LoRARequest

        return LoraEngine(self, LoRARequest(lora_name=name, lora_int_id=adapter_id, lora_path=path), name)

    @property
    def async_llm(self) -> Any:
        """vLLM's ``AsyncLLM``; raises ``RuntimeError`` once the engine has been shut down."""
        if self.llm is None:
            raise RuntimeError("the vLLM engine has been shut down")
        return self.llm

    # --- Engine hooks (checks and counting are in Engine's template methods) ------------------

    def _generate(self, prompt: list[int], spec: SamplingSpec, stats: EngineStats) -> AsyncGenerator[TokenStep, None]:
        return vllm_requests.sample_steps(self.async_llm, prompt, spec, self.stop_token_ids)

    async def _score(self, prompt: list[int], tokens: list[int], stats: EngineStats) -> list[float]:
        return await vllm_requests.score_tokens(self.async_llm, prompt, tokens, self.max_model_len)

    async def _top_logprobs(
        self, prompt: list[int], tokens: list[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        return await vllm_requests.top_tokens(self.async_llm, prompt, tokens, k, self.max_model_len)

    # --- health and life cycle ----------------------------------------------------------------

    def num_unfinished_requests(self) -> int:
        """Requests vLLM still holds (running or queued)."""
        return int(self.async_llm.get_num_unfinished_requests())

    async def check_health(self) -> None:
        """Raise once vLLM's engine core is dead (it crashed, or its process was killed)."""
        await self.async_llm.check_health()

    async def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.shutdown()
        # Collect the AsyncLLM now (it sits in reference cycles): its __del__ shuts down again,
        # a no-op while the interpreter is whole, an error message during interpreter teardown.
        del llm
        gc.collect()

    # vLLM's own metrics (``vllm:*``) are registered in prometheus_client's global REGISTRY
    # of this process, which /metrics exports: metrics_text() has nothing to add.
