"""The package layout: every digr subpackage says what it may import, and its modules keep to it.

Each `digr/<pkg>/__init__.py` docstring ends with a line `May import: digr.a, digr.b.` (or
"nothing else from digr"); this test parses every module's imports (function-local ones
included) and fails on any import of a digr package not on that line, which also rules out
cycles between packages (the lines form a strict order). The `__init__` files import nothing,
so importing one module never drags in its siblings (and stage code keys stay narrow).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

DIGR = Path(__file__).resolve().parents[1] / "digr"
PACKAGES = sorted(p.name for p in DIGR.iterdir() if (p / "__init__.py").is_file())


def allowed(pkg: str) -> set[str]:
    doc = ast.get_docstring(ast.parse((DIGR / pkg / "__init__.py").read_text())) or ""
    line = re.search(r"^May import: (.*)$", doc, re.M)
    assert line, f"digr/{pkg}/__init__.py: docstring lacks a 'May import:' line"
    return set(re.findall(r"digr\.(\w+)", line.group(1)))


def digr_imports(path: Path) -> set[str]:
    """The digr subpackages a module imports anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "digr" and len(parts) > 1:
                found.add(parts[1])
            elif parts == ["digr"] and isinstance(node, ast.ImportFrom):
                found |= {a.name for a in node.names}
    return found


def test_digr_is_only_subpackages() -> None:
    loose = sorted(p.name for p in DIGR.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside a stage package: {loose}"
    assert {"platform", "data", "evidence", "tokenizer", "rec", "rl", "eval", "serving", "pipeline"} <= set(PACKAGES)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_only_downward(pkg: str) -> None:
    ok = allowed(pkg) | {pkg}
    bad = {f"{path.relative_to(DIGR)} imports digr.{dep}"
           for path in (DIGR / pkg).rglob("*.py") for dep in digr_imports(path) - ok}
    assert not bad, sorted(bad)


@pytest.mark.parametrize("pkg", PACKAGES)
def test_init_imports_nothing(pkg: str) -> None:
    tree = ast.parse((DIGR / pkg / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_allowed_imports_form_an_order() -> None:
    """No two packages may import each other, directly or through others."""
    graph = {p: allowed(p) & set(PACKAGES) for p in PACKAGES}
    def reach(p: str, seen: set[str]) -> set[str]:
        for q in graph[p] - seen:
            seen.add(q)
            reach(q, seen)
        return seen
    assert not [p for p in PACKAGES if p in reach(p, set())]


def test_tests_mirror_the_packages() -> None:
    tests = Path(__file__).resolve().parent
    assert not [p.name for p in tests.glob("test_*.py") if p.name != "test_layout.py"]
    assert {p.name for p in tests.iterdir() if p.is_dir() and list(p.glob("test_*.py"))} <= set(PACKAGES)
