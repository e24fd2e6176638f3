from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.paths import DEPLOY


@pytest.fixture(scope="session")
def deploy_dir() -> Path:
    return DEPLOY
