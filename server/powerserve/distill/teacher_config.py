"""What the teacher stage draws, from where, and how much (``powerserve distill teacher``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_PARAMS: dict[str, Any] = {"alpha": 4.0}


@dataclass(frozen=True, slots=True)
class TeacherConfig:
    prompts: Path
    out: Path
    decoder: str = "power_mcmc"
    params: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    samples_per_prompt: int = 1
    max_tokens: int = 256
    seed: int = 0
    concurrency: int = 1
    limit: int | None = None  # only the first N prompts
    # in-process: the base model (None: the embedded one) and its engine
    model: str | None = None
    engine: str = "torch"
    max_model_len: int = 2048
    # over HTTP
    server: str | None = None
    api_key: str | None = None
    tokenizer: str | None = None  # local tokenizer for HTTP mode (default: --model, else embedded)
