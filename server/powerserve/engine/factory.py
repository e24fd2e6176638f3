"""Choosing and starting an engine from the settings (the only place that names both)."""

from __future__ import annotations

import importlib.util
import logging

from powerserve.engine.base import Engine
from powerserve.model_store import resolve_model
from powerserve.settings import Settings

log = logging.getLogger(__name__)


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(settings: Settings) -> str:
    if settings.engine != "auto":
        return settings.engine
    return "vllm" if vllm_available() else "torch"


async def start_engine(
    settings: Settings,
    model: str | None = None,
    *,
    max_loras: int = 0,
    max_lora_rank: int = 16,
    lora_target_modules: list[str] | None = None,
) -> Engine:
    """Load ``model`` (default: the settings' model, or the embedded one) on the chosen engine.

    ``max_loras > 0`` (vLLM only) enables that many LoRA adapters of rank up to ``max_lora_rank``
    on ``lora_target_modules`` for the ``distilled`` decoder's students.
    """
    path, default_name = resolve_model(model if model is not None else settings.model, settings.cache_dir)
    name = (settings.served_model_name or default_name) if model is None else default_name
    kind = pick_engine(settings)
    log.info("starting the %s engine on %s", kind, path)
    if kind == "vllm":
        from powerserve.engine.vllm_engine import VllmEngine

        return await VllmEngine.start(
            path,
            model_name=name,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            enforce_eager=settings.enforce_eager,
            tensor_parallel_size=settings.tensor_parallel_size,
            pipeline_parallel_size=settings.pipeline_parallel_size,
            seed=settings.seed,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            lora_target_modules=lora_target_modules,
        )
    from powerserve.engine.torch_engine import TorchEngine

    return TorchEngine.load(path, model_name=name, max_model_len=settings.max_model_len, dtype=settings.dtype)


def served_checkpoint(settings: Settings) -> str:
    """The checkpoint path (or hub name) the settings serve: what a LoRA student must be trained on."""
    return resolve_model(settings.model, settings.cache_dir)[0]
