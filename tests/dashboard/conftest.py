"""Dashboard tests reuse the API tests' tiny model and app factory."""

from __future__ import annotations

import pytest

from tests.serving.conftest import engine, tokenizer
from tests.serving.tiny_app import make_client

__all__ = ["engine", "make_client", "tokenizer"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives the page in headless Chromium (apt-get install -y chromium)")
