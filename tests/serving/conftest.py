"""API tests run the real HTTP app on the torch engine with a tiny random model that uses the
embedded model's tokenizer and chat template (so prompts, chat and detokenising are real)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from powerserve.app import create_app
from powerserve.engine.torch_engine import TorchEngine
from powerserve.model_store import ensure_embedded_checkpoint
from powerserve.settings import Settings
from tests.tiny_model import make_tiny_llama

MODEL = "tiny"
MAX_MODEL_LEN = 128


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())


def tiny_serving_model(tokenizer: Any) -> Any:
    """The tiny random Llama the serving tests run on, with the embedded model's vocabulary."""
    return make_tiny_llama(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=16,
        max_position_embeddings=MAX_MODEL_LEN,
        logit_scale=3.0,
    )


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


def make_client(engine: TorchEngine, **settings: Any) -> TestClient:
    defaults: dict[str, Any] = {"max_n": 4, "default_max_tokens": 16, "max_tokens_limit": 64}
    app = create_app(Settings(**{**defaults, **settings}), engine=engine)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="session")
def client(engine: TorchEngine) -> Iterator[TestClient]:
    with make_client(engine) as c:
        yield c
