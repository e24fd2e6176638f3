"""The serving layer never imports the web framework: only the app/router layer
(``powerserve/app.py`` and its route modules) speaks HTTP, so serving code can be driven
without FastAPI or Starlette (style.md, principle 1; cancellation on disconnect lives in the
router's ``with_cancellation``)."""

from __future__ import annotations

import ast
from pathlib import Path

import powerserve.serving

SERVING = Path(powerserve.serving.__file__).parent
WEB_FRAMEWORKS = {"fastapi", "starlette"}


def imported_roots(source: str) -> set[str]:
    """The top-level package of every ``import`` and ``from ... import`` in ``source``
    (function-local and ``TYPE_CHECKING`` imports included; relative imports are ours)."""
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_imported_roots_sees_every_form() -> None:
    src = "import fastapi.responses\ndef f():\n    from starlette.requests import Request\nfrom . import x\n"
    assert imported_roots(src) == {"fastapi", "starlette"}


def test_serving_does_not_import_fastapi_or_starlette() -> None:
    files = sorted(SERVING.rglob("*.py"))
    assert len(files) >= 5, f"no serving modules found under {SERVING}"
    offenders = {str(f.relative_to(SERVING)): sorted(imported_roots(f.read_text()) & WEB_FRAMEWORKS) for f in files}
    offenders = {name: roots for name, roots in offenders.items() if roots}
    assert not offenders, f"serving modules import the web framework: {offenders}"
