"""The import graph of ``server/powerserve``: no cycle, and decoders named in one place only.

Both checks read the source with :mod:`ast` (nothing is imported), so a function-local import
counts like a top-level one: it still closes a cycle, only later. Importing ``a.b.c`` also
runs the packages ``a.b`` and ``a`` (their ``__init__``), so those are edges too, except from a
module to its own packages (they are already being imported when it runs). Imports under
``if TYPE_CHECKING:`` never run and are left out.

Each check is also run on a small planted tree, to show it fails on the violation it is for.
"""

from __future__ import annotations

import ast
from pathlib import Path

from powerserve.decoders.registry import DECODERS

ROOT = Path(__file__).resolve().parents[1] / "server"
PACKAGE = "powerserve"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` file of ``package`` under ``root``."""
    return {module_name(root, p): p for p in sorted((root / package).rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes inside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for child in node.body:
                    skip.update(id(n) for n in ast.walk(child))
    return skip


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``name`` (a module at ``path``) imports, anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)  # submodules by name
    out: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for k in range(1, len(parts) + 1):  # the module and every package it runs
            prefix = ".".join(parts[:k])
            if prefix in known and prefix != name and not name.startswith(prefix + "."):
                out.add(prefix)  # a module's own packages are already running when it runs
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    mods = modules(root, package)
    known = set(mods)
    return {name: imported_modules(name, path, known) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def decoder_naming_violations(
    root: Path, package: str, decoder_modules: dict[str, str], allowed_extra: set[str]
) -> list[str]:
    """Modules that import a decoder module or name a decoder class, other than that decoder's
    own module and ``allowed_extra`` (the registry). ``decoder_modules``: class name -> module."""
    mods = modules(root, package)
    known = set(mods)
    by_module = {m: c for c, m in decoder_modules.items()}
    found: list[str] = []
    for name, path in mods.items():
        if name in allowed_extra:
            continue
        for target in sorted(imported_modules(name, path, known) & set(by_module) - {name}):
            found.append(f"{name} imports {target}")
        tree = ast.parse(path.read_text(), str(path))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        for cls in sorted(names & set(decoder_modules)):
            if decoder_modules[cls] != name:
                found.append(f"{name} names {cls}")
    return found


# --- the real tree ------------------------------------------------------------------------------


def test_no_import_cycle() -> None:
    graph = import_graph(ROOT, PACKAGE)
    assert len(graph) > 40 and "powerserve.decoders.registry" in graph  # the walk found the package
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_only_the_registry_names_decoders() -> None:
    decoder_modules = {cls.__name__: cls.__module__ for cls in DECODERS.values()}
    assert len(decoder_modules) == len(DECODERS) >= 6
    violations = decoder_naming_violations(ROOT, PACKAGE, decoder_modules, {"powerserve.decoders.registry"})
    assert violations == []


# --- the checks can fail ------------------------------------------------------------------------


def _plant(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_function_local_cycle_is_found(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import f\n",
            "pkg/sub/__init__.py": "",
            "pkg/b.py": "def f():\n    from .sub import c\n",
            "pkg/sub/d.py": "from pkg.sub import c\n",  # a module's own package: no edge back
            "pkg/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.b\nimport pkg.a\n",
            "pkg/d.py": "if TYPE_CHECKING:\n    import pkg.e\n",
            "pkg/e.py": "import pkg.d\n",
        },
    )
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.b"] == {"pkg.sub", "pkg.sub.c"}  # relative, function-local, the package too
    assert graph["pkg.d"] == set()  # TYPE_CHECKING only
    assert graph["pkg.sub.d"] == {"pkg.sub.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (tmp_path / "pkg/b.py").write_text("def f():\n    pass\n")
    assert find_cycle(import_graph(tmp_path, "pkg")) is None


def test_a_planted_decoder_name_is_found(tmp_path: Path) -> None:
    _plant(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/decoders/__init__.py": "",
            "pkg/decoders/fancy.py": "class FancyDecoder:\n    pass\n",
            "pkg/decoders/registry.py": "from pkg.decoders.fancy import FancyDecoder\n",
            "pkg/app.py": "def f(state):\n    return state.FancyDecoder\n",
            "pkg/serving.py": "def g():\n    import pkg.decoders.fancy\n",
        },
    )
    classes = {"FancyDecoder": "pkg.decoders.fancy"}
    found = decoder_naming_violations(tmp_path, "pkg", classes, {"pkg.decoders.registry"})
    assert found == ["pkg.app names FancyDecoder", "pkg.serving imports pkg.decoders.fancy"]
