"""Distillation tests run the real pipeline on tiny random Llama checkpoints that carry the
embedded model's tokenizer (so prompts, chat templates and token ids are real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from powerserve.model_store import ensure_embedded_checkpoint
from powerserve_client.eval.tasks import arithmetic_prompts
from tests.tiny_model import save_tiny_checkpoint

# power_mcmc small enough for a tiny model in a test: 8 tokens in blocks of 4, 2 steps each.
TEACHER_ARGS = ["--param", "block_size=4", "--param", "mcmc_steps=2", "--max-tokens", "8", "--engine", "torch"]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-base")
    save_tiny_checkpoint(str(out), str(ensure_embedded_checkpoint()))
    return out


def write_prompts(path: Path, n: int, seed: int = 7) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_prompts(n, seed)))
    return path


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
