"""vLLM's engine arguments for powerserve: the fixed choices, the platform defaults, the scheduler.

Fixed for every engine: ``logprobs_mode="processed_logprobs"`` (the log-probability vLLM reports
for a sampled token is then log q, under the distribution it was drawn from), prefix caching on,
vLLM's own Prometheus stats on. On CPU: float32 (its kernels are exact in float32; bf16 changes
log p visibly), :data:`CPU_MEMORY_UTILIZATION` of host memory for the KV cache, and chunked
prefill off (:func:`scheduler_args`).
"""

from __future__ import annotations

from typing import Any, TypedDict

# On a CPU "GPU memory" is the share of host memory vLLM reserves for the KV cache; its default
# (0.92) refuses to start on a machine that also runs anything else.
CPU_MEMORY_UTILIZATION = 0.3


# oneDNN (vLLM's CPU matrix products) keeps a process-wide cache of compiled primitives, one per
# new input shape, 1,024 of them by default. Under varied prompt lengths every batch brings new
# shapes, and vLLM's model worker grew by about 1.5 MiB per request for as long as we measured
# (500 requests); with the cache off it stayed flat, at about 2.5% of throughput
# (docs/reliability.md, benchmarks/vllm_memory.py).
ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def worker_environment(on_cpu: bool) -> dict[str, str]:
    """Environment variables vLLM's worker processes get from powerserve unless already set: on
    CPU, oneDNN's primitive cache off. The workers are spawned, so they read it at start."""
    return {ONEDNN_CACHE: "0"} if on_cpu else {}


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


class EngineOptions(TypedDict, total=False):
    """The optional keyword arguments of :func:`engine_args` (and of ``VllmEngine.start``)."""

    dtype: str
    gpu_memory_utilization: float | None
    enforce_eager: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    seed: int
    chunked_prefill: bool | None
    max_loras: int
    max_lora_rank: int
    lora_target_modules: list[str] | None


def engine_args(
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
) -> Any:
    """``vllm.engine.arg_utils.AsyncEngineArgs`` for ``path``; the arguments are those of
    :meth:`powerserve.engine.vllm_engine.VllmEngine.start`."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform

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
    return AsyncEngineArgs(
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
