"""Distillation tests run the real pipeline on tiny random Llama checkpoints that carry the
embedded model's tokenizer (so prompts, chat templates and token ids are real)."""

from __future__ import annotations

from pathlib import Path

import pytest

from powerserve.model_store import ensure_embedded_checkpoint
from tests.distill.support import TEACHER_ARGS, write_prompts
from tests.tiny_model import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-base")
    save_tiny_checkpoint(str(out), str(ensure_embedded_checkpoint()))
    return out


@pytest.fixture(scope="session")
def teacher_samples(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight power_mcmc samples (4 prompts x 2) from ``tiny_base``, drawn once per session."""
    from powerserve.cli import main

    work = tmp_path_factory.mktemp("teacher-session")
    prompts = write_prompts(work / "prompts.jsonl", 4)
    out = work / "samples.jsonl"
    args = ["distill", "teacher", "--prompts", str(prompts), "--out", str(out), "--model", str(tiny_base)]
    assert main([*args, *TEACHER_ARGS, "--samples-per-prompt", "2", "--no-progress"]) == 0
    return out
