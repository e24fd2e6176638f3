"""Choosing and starting engines from the settings (the only place that names both): the
served model's, and the ``--distilled`` students' beside it."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

from powerserve.distill.students import StudentError, StudentSpec, lora_modules, lora_rank, read_specs
from powerserve.engine.base import Engine, EngineStats, SamplingSpec
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


# --- the --distilled students ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StudentEngines:
    """The loaded ``--distilled`` students: name -> (spec, engine), in ``--distilled`` order.

    ``owned`` are the engines started for them (shut down at exit; a LoRA view of the base
    engine is not owned); ``error`` says why students were left out (None: none was).
    """

    engines: dict[str, tuple[StudentSpec, Engine]] = field(default_factory=dict)
    owned: list[Engine] = field(default_factory=list)
    error: str | None = None

    async def shutdown(self) -> None:
        for engine in self.owned:
            await engine.shutdown()


def read_students(settings: Settings) -> list[StudentSpec]:
    """The settings' ``--distilled`` entries, checked before any engine starts (:class:`StudentError`)."""
    return read_specs(settings.distilled, lambda: served_checkpoint(settings))


def lora_args(specs: list[StudentSpec]) -> dict[str, Any]:
    """The LoRA keyword arguments of :func:`start_engine` that serve the adapters among ``specs``."""
    adapters = sum(1 for s in specs if s.kind == "lora")
    return {"max_loras": adapters, "max_lora_rank": lora_rank(specs) or 16, "lora_target_modules": lora_modules(specs)}


async def start_students(specs: list[StudentSpec], settings: Settings, base: Engine) -> StudentEngines:
    """Load every student beside the ``base`` engine.

    1. A LoRA adapter on the vLLM engine becomes a view of it (:meth:`VllmEngine.adapter`) and
       generates one token, so vLLM loads the adapter now: a broken one stops the start-up
       (:class:`StudentError`) instead of failing requests.
    2. A LoRA adapter on the torch engine, or a full checkpoint, loads on a torch engine of its
       own (transformers attaches an adapter through peft). A full checkpoint that is missing,
       unfinished or made for another tokenizer leaves that student out with the reason; the
       server still serves everything else.
    """
    from powerserve.engine.vllm_engine import VllmEngine

    owned: list[Engine] = []
    students: dict[str, tuple[StudentSpec, Engine]] = {}
    reasons: list[str] = []
    for adapter_id, spec in enumerate(specs, start=1):
        if spec.kind == "lora" and isinstance(base, VllmEngine):
            view = base.adapter(spec.name, str(spec.path), adapter_id)
            try:
                async for _ in view.generate([0], SamplingSpec(max_tokens=1), EngineStats()):
                    pass
            except Exception as exc:
                raise StudentError(f"--distilled {spec.name}={spec.path}: vLLM cannot load the adapter: {exc}") from exc
            students[spec.name] = (spec, view)
            continue
        engine, reason = await asyncio.to_thread(_load_torch_student, spec, settings, base)
        if engine is not None:
            owned.append(engine)
        if reason is not None:
            log.error("the distilled student %s is unavailable: %s", spec.name, reason)
            reasons.append(reason)
        elif engine is not None:
            students[spec.name] = (spec, engine)
    return StudentEngines(students, owned, "; ".join(reasons) or None)


def _load_torch_student(spec: StudentSpec, settings: Settings, base: Engine) -> tuple[Engine | None, str | None]:
    from powerserve.distill.manifest import MANIFEST_NAME
    from powerserve.distill.records import tokenizer_fingerprint
    from powerserve.engine.torch_engine import TorchEngine
    from powerserve.model_store import is_complete

    path = spec.path
    if spec.kind == "full" and not (path / "config.json").is_file():
        return None, f"--distilled {path} is not a checkpoint directory (no config.json)"
    if (path / MANIFEST_NAME).is_file() and not is_complete(path):
        return None, f"--distilled {path} is an unfinished checkpoint"
    try:
        student = TorchEngine.load(
            str(path), model_name=spec.name, max_model_len=base.max_model_len, dtype=settings.dtype
        )
    except Exception as exc:  # any load failure leaves only this student out
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"cannot load --distilled {path}: {first}"
    if base.tokenizer is not None and tokenizer_fingerprint(student.tokenizer) != tokenizer_fingerprint(base.tokenizer):
        return student, f"--distilled {path} has another tokenizer than the served model"
    return student, None
