"""Client tests reuse the API tests' tiny model; the SDK talks to the app in-process through
the test client (an httpx client), or to a live loopback server for the load generator."""

from __future__ import annotations

from tests.serving.conftest import engine, tokenizer
from tests.serving.tiny_app import make_client

__all__ = ["engine", "make_client", "tokenizer"]
