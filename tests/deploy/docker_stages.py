"""The Dockerfile's stages, parsed with BuildKit's own parser (the ``dockerfile`` package), for
the deploy tests (they import this, never another test module)."""

from __future__ import annotations

from pathlib import Path

import dockerfile

from tests.deploy.paths import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def stages(path: Path = DOCKERFILE) -> dict[str, list[dockerfile.Command]]:
    """Instructions per stage name (a stage's FROM line first)."""
    result: dict[str, list[dockerfile.Command]] = {}
    current: list[dockerfile.Command] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            value = command.value
            name = value[2] if len(value) == 3 and value[1].upper() == "AS" else f"#{len(result)}"
            current = result.setdefault(name, [])
        current.append(command)
    return result


def first(stage: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    found = [c for c in stage if c.cmd == cmd]
    assert found, f"no {cmd}"
    return found[-1]
