"""Helpers for the distillation tests (the tests import these; fixtures stay in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

from powerserve_client.eval.tasks import arithmetic_prompts

# power_mcmc small enough for a tiny model in a test: 8 tokens in blocks of 4, 2 steps each.
TEACHER_ARGS = ["--param", "block_size=4", "--param", "mcmc_steps=2", "--max-tokens", "8", "--engine", "torch"]


def write_prompts(path: Path, n: int, seed: int = 7) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in arithmetic_prompts(n, seed)))
    return path


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
