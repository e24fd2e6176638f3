"""Reliability tests drive the real app over real sockets: in-process under uvicorn (a tiny
random model on the torch engine, so gauges and counters can be read from this process) or as
a ``powerserve serve`` subprocess on a tiny checkpoint (signals, exit codes, resident memory).

Every helper here only talks to 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.testing import ServerProcess
from tests.serving.conftest import engine, tokenizer  # noqa: F401 (session fixtures shared with tests/serving)
from tests.tiny_model import save_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Llama with the embedded model's tokenizer and chat template, on disk."""
    out = tmp_path_factory.mktemp("tiny-checkpoint")
    return save_tiny_checkpoint(str(out), str(ensure_embedded_checkpoint()))


@pytest.fixture
def server_factory(tiny_checkpoint: str, tmp_path: Path) -> Iterator[Any]:
    """Start ``powerserve serve`` subprocesses on the tiny checkpoint; all are stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        log = tmp_path / f"server-{len(started)}.log"
        proc = ServerProcess(model=tiny_checkpoint, engine="torch", extra_args=list(args), log_path=log)
        started.append(proc)
        proc.wait_ready(timeout_s=300)
        return proc

    yield start
    for proc in started:
        proc.kill()
