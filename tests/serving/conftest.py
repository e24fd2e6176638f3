"""API tests run the real HTTP app on the torch engine with a tiny random model that uses the
embedded model's tokenizer and chat template (so prompts, chat and detokenising are real)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from powerserve.engine.torch_engine import TorchEngine
from powerserve.model_store import ensure_embedded_checkpoint
from tests.serving.tiny_app import MAX_MODEL_LEN, MODEL, make_client, tiny_serving_model

__all__ = ["MAX_MODEL_LEN", "MODEL", "make_client", "tiny_serving_model"]  # also importable from here


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())


@pytest.fixture(scope="session")
def engine(tokenizer: Any) -> TorchEngine:
    model = tiny_serving_model(tokenizer)
    return TorchEngine(
        model,
        tokenizer,
        model_name=MODEL,
        max_model_len=MAX_MODEL_LEN,
        eos_token_ids=frozenset([tokenizer.eos_token_id]),
    )


@pytest.fixture(scope="session")
def client(engine: TorchEngine) -> Iterator[TestClient]:
    with make_client(engine) as c:
        yield c
