"""The README's layout section names every module of ``server/powerserve`` (issue 15): a module
added without a word in the layout fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "server" / "powerserve"


def layout() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Layout\n+```\n(.*?)```", text, flags=re.S)
    assert match, "README.md has no fenced '## Layout' section"
    return match.group(1)


def unnamed(section: str, package: Path) -> list[str]:
    """Modules (package-relative paths) whose name (stem) the section does not mention."""
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", section))
    return sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.stem != "__init__" and path.stem not in words
    )


def test_readme_layout_names_every_module() -> None:
    assert unnamed(layout(), PACKAGE) == []


def test_the_check_fails_for_a_module_left_out(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "named.py").write_text("")
    (tmp_path / "forgotten.py").write_text("")
    assert unnamed("sub/  named.py does a thing", tmp_path) == ["forgotten.py"]
