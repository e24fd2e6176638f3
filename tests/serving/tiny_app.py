"""The tiny app the API tests run: a tiny random Llama with the embedded model's tokenizer and
chat template on the torch engine, behind the real HTTP app (tests import these; the shared
fixtures ``tokenizer``, ``engine`` and ``client`` are in conftest.py)."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from powerserve.app import create_app
from powerserve.engine.torch_engine import TorchEngine
from powerserve.settings import Settings
from tests.tiny_model import make_tiny_llama

MODEL = "tiny"
MAX_MODEL_LEN = 128


def tiny_serving_model(tokenizer: Any) -> Any:
    """The tiny random Llama the serving tests run on, with the embedded model's vocabulary."""
    return make_tiny_llama(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        hidden_size=16,
        max_position_embeddings=MAX_MODEL_LEN,
        logit_scale=3.0,
    )


def make_client(engine: TorchEngine, **settings: Any) -> TestClient:
    defaults: dict[str, Any] = {"max_n": 4, "default_max_tokens": 16, "max_tokens_limit": 64}
    app = create_app(Settings(**{**defaults, **settings}), engine=engine)
    return TestClient(app, raise_server_exceptions=False)
