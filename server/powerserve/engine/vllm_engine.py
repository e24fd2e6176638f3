"""The production engine: a model held by vLLM's ``AsyncLLM``, through public vLLM APIs only.

Both log-probabilities decoders need come out of vLLM without patching it:

- ``logq``: the engine runs with ``logprobs_mode="processed_logprobs"`` (an engine-wide
  setting), so the log-probability vLLM reports for each sampled token is taken after
  temperature, top-k and top-p, i.e. under the distribution the token was drawn from.
- ``logp``: :meth:`VllmEngine.score` sends prompt + tokens as a prompt with
  ``prompt_logprobs=0``; vLLM computes prompt log-probabilities from the raw logits whatever
  the logprobs mode, so they are log p under the raw model.

vLLM batches concurrent requests from many asyncio tasks itself; breaking out of, closing or
cancelling :meth:`VllmEngine.generate` closes vLLM's own request stream, which aborts the
request in the engine core.

On CPU, chunked prefill is switched off (see :func:`scheduler_args`): vLLM rewinds the random
generator of a seeded request whose prompt was only partly prefilled in a step, and a CPU
``torch.Generator`` cannot rewind, which killed the engine core under concurrent seeded load.
Once the engine core is dead, every call raises :class:`~powerserve.errors.ServiceUnavailableError`
(503, code ``engine_dead``) and :meth:`VllmEngine.check_health` raises; the server's watchdog
then exits the process (``powerserve.server``).

LoRA (students of the ``distilled`` decoder): ``start(max_loras=N)`` enables vLLM's LoRA support
for up to N adapters in one batch; ``generate``/``score`` take a ``lora`` (a ``LoRARequest``) that
applies to that request only, so adapter and base requests share the engine's batches.
:meth:`VllmEngine.adapter` returns an :class:`~powerserve.engine.lora.LoraEngine` view that
carries the request for decoders, which never see vLLM types.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any

from powerserve.engine.base import Engine, EngineStats, SamplingSpec, TokenStep
from powerserve.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

# On a CPU "GPU memory" is the share of host memory vLLM reserves for the KV cache; its default
# (0.92) refuses to start on a machine that also runs anything else.
CPU_MEMORY_UTILIZATION = 0.3

ENGINE_DEAD_MESSAGE = "The inference engine stopped working; the server is restarting. Retry shortly."


def scheduler_args(on_cpu: bool, max_model_len: int, chunked_prefill: bool | None = None) -> dict[str, Any]:
    """vLLM scheduler settings: chunked prefill off on CPU, vLLM's defaults elsewhere.

    Why: a seeded request whose prompt is only partly prefilled in a step (chunked prefill split
    it because the step's token budget ran out) has its sampled token discarded, and vLLM then
    rewinds that request's generator (``gpu_model_runner._bookkeeping_sync``:
    ``gen.set_offset(gen.get_offset() - 4)``). A CUDA generator can; a CPU one raises
    ``RuntimeError: CPU Generator does not use offset`` and the engine core dies. Without
    chunked prefill the scheduler never splits a prompt (one that does not fit the step's budget
    waits for the next step), so no sampled token is discarded. The budget
    ``max_num_batched_tokens = max(max_model_len, 2048)`` lets a prompt of ``max_model_len``
    tokens fit one step -- vLLM's own CPU platform makes the same choice for MLA models.

    ``chunked_prefill`` overrides the choice (``True`` restores vLLM's default on CPU; used only
    by benchmarks/bench_vllm_scheduler.py to measure what the setting costs).
    """
    from vllm.config import SchedulerConfig

    chunked = (not on_cpu) if chunked_prefill is None else chunked_prefill
    if chunked:
        return {} if chunked_prefill is None else {"enable_chunked_prefill": True}
    budget = max(max_model_len, SchedulerConfig.DEFAULT_MAX_NUM_BATCHED_TOKENS)
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": budget}


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
        self._stop_token_ids = sorted(self.eos_token_ids)

    @classmethod
    async def start(
        cls,
        path: str,
        *,
        model_name: str,
        max_model_len: int,
        dtype: str = "auto",
        gpu_memory_utilization: float | None = None,
        enforce_eager: bool = False,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        seed: int = 0,
        chunked_prefill: bool | None = None,
        max_loras: int = 0,
        max_lora_rank: int = 16,
        lora_target_modules: list[str] | None = None,
    ) -> VllmEngine:
        """Load ``path`` (a checkpoint directory or hub name) into a new vLLM engine.

        Blocks the event loop while vLLM starts (tens of seconds; its engine core runs in a
        spawned process, so the calling script needs an ``if __name__ == "__main__"`` guard):
        this runs once, before the server takes requests, and ``AsyncLLM`` must be built
        inside the event loop that will drive it. ``chunked_prefill``: see :func:`scheduler_args`
        (``None``, the default, is the safe choice for the platform).
        ``max_loras > 0`` enables LoRA adapters of
        rank up to ``max_lora_rank`` on ``lora_target_modules`` (None: every module vLLM supports,
        which wraps the output head too; on CPU vLLM then turns graph compilation off).
        """
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = current_platform.is_cpu()
        if dtype == "auto" and on_cpu:
            dtype = "float32"  # CPU kernels are exact in float32; bf16 changes log p visibly
        if gpu_memory_utilization is None and on_cpu:
            gpu_memory_utilization = CPU_MEMORY_UTILIZATION
        extra: dict[str, Any] = {}
        if gpu_memory_utilization is not None:
            extra["gpu_memory_utilization"] = gpu_memory_utilization
        extra.update(scheduler_args(on_cpu, max_model_len, chunked_prefill))
        if max_loras > 0:
            # One slot more than adapters, left empty: vLLM's torch LoRA ops (the CPU punica path)
            # index the stacked weights with -1 for rows without an adapter, which selects the
            # *last* slot, so in a mixed batch base rows got the adapter held there. An empty
            # (zero) last slot makes that a no-op. Seen with vLLM 0.32 on CPU.
            extra.update(enable_lora=True, max_loras=max_loras + 1, max_lora_rank=max_lora_rank)
            extra["lora_target_modules"] = lora_target_modules
        args = AsyncEngineArgs(
            model=path,
            served_model_name=[model_name],  # the label on vLLM's own Prometheus metrics
            max_model_len=max_model_len,
            dtype=dtype,  # type: ignore[arg-type]
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            seed=seed,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            disable_log_stats=False,  # keeps vLLM's Prometheus stat logger on
            **extra,
        )
        tokenizer = AutoTokenizer.from_pretrained(path)
        eos = eos_token_ids(path, tokenizer)
        log.info("starting vLLM on %s (dtype=%s, max_model_len=%d)", path, dtype, max_model_len)
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

        from powerserve.engine.lora import LoraEngine

        return LoraEngine(self, LoRARequest(lora_name=name, lora_int_id=adapter_id, lora_path=path), name)

    async def generate(
        self, prompt_ids: Sequence[int], spec: SamplingSpec, stats: EngineStats, lora: Any = None
    ) -> AsyncIterator[TokenStep]:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k,  # 0 disables top-k in vLLM as in SamplingSpec
            seed=spec.seed,
            logprobs=0,  # only the sampled token's (processed) log-probability
            # vLLM's own EOS rule (tokenizer + generation config) is switched off for ours, so
            # it stops on exactly the tokens that finish_reason() calls "stop"; a stop token
            # stays in the output token ids.
            ignore_eos=True,
            stop_token_ids=self._stop_token_ids,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        stats.calls += 1
        raw = spec.is_raw
        prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
        stream = _alive(self._llm.generate(prompt, params, _request_id(), lora_request=lora))
        try:
            async for out in stream:
                completion = out.outputs[0]
                # DELTA outputs carry the tokens sampled since the last output (usually one).
                logprobs = completion.logprobs or []
                for token_id, entry in zip(completion.token_ids, logprobs, strict=True):
                    logq = float(entry[token_id].logprob)
                    stats.tokens_generated += 1
                    yield TokenStep(token_id, logq, logq if raw else None)
        finally:
            # Closing vLLM's stream before it finished aborts the request in the engine core;
            # after a normal finish this is a no-op.
            await stream.aclose()

    async def score(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], stats: EngineStats, lora: Any = None
    ) -> list[float]:
        stats.calls += 1
        stats.tokens_scored += len(token_ids)
        if not token_ids:
            return []
        entries = await self._prompt_logprobs(prompt_ids, token_ids, top_k=0, lora=lora)
        return [float(entry[token].logprob) for entry, token in zip(entries, token_ids, strict=True)]

    async def top_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], k: int, stats: EngineStats
    ) -> list[dict[int, float]]:
        stats.calls += 1
        stats.tokens_scored += len(token_ids)
        if not token_ids:
            return []
        entries = await self._prompt_logprobs(prompt_ids, token_ids, top_k=k)
        top = [sorted(entry.items(), key=lambda item: -item[1].logprob)[:k] for entry in entries]
        return [{token: float(lp.logprob) for token, lp in row} for row in top]

    async def _prompt_logprobs(
        self, prompt_ids: Sequence[int], token_ids: Sequence[int], top_k: int, lora: Any = None
    ) -> list[dict[int, Any]]:
        """vLLM's log-probability entries (raw model) at each position of ``token_ids``.

        One prefill of prompt + tokens with ``prompt_logprobs=top_k``: each entry holds the
        token itself and the ``top_k`` most likely tokens. vLLM refuses a prompt that fills
        the whole context (it must sample at least one token), so a sequence of exactly
        ``max_model_len`` tokens is sent without its last token, whose entry then comes from
        the sampled position (temperature 1, no truncation, so processed = raw): there it
        holds the token itself when ``top_k == 0``, else the ``top_k`` most likely tokens.
        """
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if not prompt_ids:
            raise ValueError("the prompt must hold at least one token")
        ids = [*prompt_ids, *token_ids]
        last: dict[str, Any] = {}
        whole_context = len(ids) >= self.max_model_len
        if whole_context:
            ids.pop()
            last = {"logprobs": top_k} if top_k else {"logprob_token_ids": [token_ids[-1]]}
        params = SamplingParams(
            max_tokens=1,
            temperature=1.0,
            prompt_logprobs=top_k,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
            **last,
        )
        final = None
        request = TokensPrompt(prompt_token_ids=ids)
        async for out in _alive(self._llm.generate(request, params, _request_id(), lora_request=lora)):
            final = out
        assert final is not None and final.prompt_logprobs is not None
        entries = list(final.prompt_logprobs[len(prompt_ids) :])
        if whole_context:
            entries.append(final.outputs[0].logprobs[0])
        assert len(entries) == len(token_ids)
        return entries

    def num_unfinished_requests(self) -> int:
        """Requests vLLM still holds (running or queued)."""
        return int(self._llm.get_num_unfinished_requests())

    async def check_health(self) -> None:
        """Raise once vLLM's engine core is dead (it crashed, or its process was killed)."""
        await self._llm.check_health()

    async def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        llm.shutdown()
        # Collect the AsyncLLM now (it sits in reference cycles): its __del__ shuts down again,
        # a no-op while the interpreter is whole, an error message during interpreter teardown.
        del llm
        gc.collect()

    @property
    def _llm(self) -> Any:
        if self.llm is None:
            raise RuntimeError("the vLLM engine has been shut down")
        return self.llm

    # vLLM's own metrics (``vllm:*``) are registered in prometheus_client's global REGISTRY
    # of this process, which /metrics exports: metrics_text() has nothing to add.


def eos_token_ids(path: str, tokenizer: Any) -> set[int]:
    """End-of-sequence ids, chosen as the torch engine chooses them: the union of those in the
    generation config and the model config (an int or a list), else the tokenizer's."""
    from transformers import AutoConfig, GenerationConfig

    ids = _as_ids(getattr(AutoConfig.from_pretrained(path), "eos_token_id", None))
    with contextlib.suppress(OSError):  # no generation_config.json
        ids |= _as_ids(GenerationConfig.from_pretrained(path).eos_token_id)
    if not ids:
        ids = _as_ids(getattr(tokenizer, "eos_token_id", None))
    return ids


def _as_ids(value: int | Sequence[int] | None) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


async def _alive(stream: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    """``stream`` (vLLM's request outputs), with vLLM's ``EngineDeadError`` raised as a 503.

    A dead engine core cannot come back in this process: the request fails with an
    OpenAI-shaped 503 (code ``engine_dead``) rather than a 500, and the server's watchdog exits.
    Closing this generator closes ``stream`` (which aborts an unfinished request in vLLM).
    """
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        async for out in stream:
            yield out
    except EngineDeadError as exc:
        raise ServiceUnavailableError(ENGINE_DEAD_MESSAGE, code="engine_dead") from exc
    finally:
        await stream.aclose()


def _request_id() -> str:
    return f"ps-{uuid.uuid4().hex}"
