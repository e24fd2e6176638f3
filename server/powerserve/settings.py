"""Server settings: one frozen object, read from ``POWERSERVE_*`` environment variables and
overridden by ``powerserve serve`` options of the same names."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from powerserve.model_store import default_cache_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POWERSERVE_", frozen=True, extra="ignore")

    # Model and engine
    model: str | None = Field(
        None, description="local Hugging Face checkpoint directory or hub name; default: the embedded model"
    )
    served_model_name: str | None = Field(None, description="name clients use; default: the checkpoint's")
    engine: Literal["auto", "vllm", "torch"] = Field(
        "auto", description="auto picks vllm when it is importable, else torch"
    )
    cache_dir: Path = Field(default_factory=default_cache_dir, description="where converted models live")
    max_model_len: int = Field(2048, ge=16, description="context length (prompt + output tokens)")
    dtype: str = Field("auto", description="model dtype: auto (float32 on CPU, bfloat16 on GPU), float32, ...")
    seed: int = Field(0, description="engine-wide seed for requests that give none")
    # vLLM only
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM memory share (on CPU: share of host memory for the KV cache)"
    )
    enforce_eager: bool = Field(False, description="vLLM: skip graph compilation (faster start, slower steps)")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism (GPUs per replica)")
    pipeline_parallel_size: int = Field(1, ge=1, description="vLLM pipeline parallelism")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="if set, /v1/* requires 'Authorization: Bearer <key>'")

    # Limits
    max_n: int = Field(8, ge=1, description="largest n a request may ask for")
    max_tokens_limit: int = Field(4096, ge=1, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_engine_tokens_per_request: int = Field(
        200_000, ge=1, description="ceiling on the engine tokens one request may be expected to spend"
    )

    # Admission control, deadlines, shutdown
    max_running_weight: float = Field(
        64,
        ge=1,
        description="cost weight allowed to run at once (a standard sequence weighs 1, a power_mcmc "
        "sequence its expected cost multiplier)",
    )
    max_queued_weight: float = Field(512, ge=0, description="cost weight allowed to wait; beyond it: 429")
    request_timeout_s: float = Field(600, gt=0, description="deadline per request, queueing included")
    drain_timeout_s: float = Field(30, ge=0, description="on SIGTERM: time to finish running work before cancelling it")
    progress_interval_s: float = Field(
        1.0, gt=0, le=60, description="seconds between progress comments in streams of decoders that answer late"
    )

    # Decoders
    distilled: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="a student for the 'distilled' decoder: [NAME=]PATH, a LoRA adapter (served on the vLLM "
        "engine beside the base) or a full checkpoint (torch engine); repeatable (env: comma-separated)",
    )

    @field_validator("distilled", mode="before")
    @classmethod
    def _students(cls, value: object) -> object:
        """Accept one path (str or Path), a comma-separated string (the environment) or a list."""
        if value is None:
            return []
        if isinstance(value, Path):
            return [str(value)]
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple):
            return [str(v) for v in value]
        return value

    log_level: Literal["debug", "info", "warning", "error"] = "info"
