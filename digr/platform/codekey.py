"""Which source a stage can run, hashed: the code part of a stage's cache key (`digr.platform.runs`).

A stage's code is its function, the module-level definitions of the function's own file
that it uses (transitively), and every package module it imports or names, in full, with
the package modules those import (anywhere in them, function-local imports included). So
editing `digr/eval/evaluate.py` re-runs the evaluate stage only, while editing `digr/data/ingest.py`
re-runs ingest and, through the stage keys chained by `depends`, everything after it.

Source is compared as syntax trees without docstrings: comments, formatting, docstrings and
the order of definitions in the stage's own file do not count; any other edit does (and a
new Python version, whose syntax trees print differently). Files that are not Python (prompt
templates, data) are not covered: the pipeline passes their hashes as the stages' inputs.

Written here rather than taken from a library: `modulefinder` executes nothing but follows
every third-party import too (slow, and third-party versions belong to the manifest), and
neither it nor `importlib` can narrow a file to the definitions one function uses.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any

_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


class Package:
    """The modules of one package under `root` (the folder holding `name/`), read once, when
    this is made: a run keys every stage on the source as it was when the run started (the
    code it imported then), even if a file is edited while it runs."""

    def __init__(self, root: Path, name: str) -> None:
        self.root = root
        self.name = name
        self._source: dict[str, tuple[Path, bytes]] = {}
        for path in sorted((root / name).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            self._source[module] = (path, path.read_bytes())
        self._tree = cache(self._parse)
        # Per module, shared by every stage's key: its dump and the package modules it imports.
        self._dump = cache(lambda module: ast.dump(self._tree(module)))
        self._module_imports = cache(lambda module: self.imports(self._tree(module), module))

    def source_hash(self) -> str:
        """Hash of all of the package's Python source as read (the manifest's code version)."""
        h = hashlib.sha256()
        for path, source in sorted(self._source.values()):
            h.update(path.relative_to(self.root / self.name).as_posix().encode())
            h.update(source)
        return h.hexdigest()[:16]

    def file(self, module: str) -> Path | None:
        """The source file of a dotted module name of this package; None if there is none."""
        found = self._source.get(module)
        return found[0] if found else None

    def tree(self, module: str) -> ast.Module:
        return self._tree(module)

    def dump(self, module: str) -> str:
        """`ast.dump` of the module's tree (docstrings stripped), computed once."""
        return self._dump(module)

    def _parse(self, module: str) -> ast.Module:
        if module not in self._source:
            raise ValueError(f"{module!r} is not a module of package {self.name!r} under {self.root}")
        path, source = self._source[module]
        return _without_docstrings(ast.parse(source, filename=str(path)))  # bytes: the file's own encoding

    def imports(self, node: ast.AST, module: str) -> set[str]:
        """Package modules imported anywhere under `node` (found in `module`), with the
        packages that contain them (importing digr.a.b runs digr/__init__ and digr/a/__init__)."""
        found: set[str] = set()
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = self._absolute(sub, module)
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in sub.names)  # `from pkg import submodule`
        out: set[str] = set()
        for name in found:
            parts = name.split(".")
            out.update(m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if self.file(m))
        return out

    def closure(self, modules: Iterable[str]) -> set[str]:
        """`modules` and every package module they import, transitively."""
        seen: set[str] = set()
        todo = list(modules)
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(self._module_imports(module) - seen)
        return seen

    def _absolute(self, node: ast.ImportFrom, module: str) -> str:
        if not node.level:
            return node.module or ""
        path = self.file(module)
        parts = module.split(".")
        if path is not None and path.name == "__init__.py":  # a package's `.` is the package itself
            parts.append("")
        return ".".join(parts[: len(parts) - node.level] + ([node.module] if node.module else []))


def _without_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, *_DEFS)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                node.body = node.body[1:] or [ast.Pass()]
    return tree


def _top_level(tree: ast.Module) -> dict[str, ast.stmt]:
    """Name -> the module-level statement that defines it (def, class, assignment)."""
    out: dict[str, ast.stmt] = {}
    for stmt in tree.body:
        if isinstance(stmt, _DEFS):
            out[stmt.name] = stmt
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        out[sub.id] = stmt
    return out


def _bindings(pkg: Package, tree: ast.Module, module: str) -> dict[str, set[str]]:
    """Name bound by a module-level import (also inside if/try) -> the package modules behind it."""
    out: dict[str, set[str]] = {}
    for stmt in tree.body:
        if isinstance(stmt, _DEFS):
            continue
        for sub in ast.walk(stmt):
            if isinstance(sub, (ast.Import, ast.ImportFrom)):
                modules = pkg.imports(sub, module)
                for alias in sub.names:
                    name = alias.asname or alias.name.split(".")[0]
                    if modules:
                        out.setdefault(name, set()).update(modules)
    return out


def function_code(pkg: Package, module: str, name: str) -> tuple[list[str], set[str]]:
    """The definitions `name` uses in its own file, as dumped syntax trees, and the package
    modules it reaches from there (module-level imports it names, imports inside them)."""
    tree = pkg.tree(module)
    top, bindings = _top_level(tree), _bindings(pkg, tree, module)
    if name not in top:
        raise ValueError(f"{module} has no module-level definition {name!r}")
    # Module-level code that is neither a definition nor an import (an `if` or `try` block, a
    # call) runs on import and may change what the function sees: it always counts.
    loose = [stmt for stmt in tree.body
             if not isinstance(stmt, (*_DEFS, ast.Assign, ast.AnnAssign, ast.AugAssign, ast.Import, ast.ImportFrom))]
    used: dict[int, ast.stmt] = {}
    modules = {module.split(".")[0]}  # the package's __init__ always runs
    pending = [top[name], *loose]
    while pending:
        node = pending.pop()
        if id(node) in used:
            continue
        used[id(node)] = node
        modules |= pkg.imports(node, module)
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                if sub.id in top:
                    pending.append(top[sub.id])
                modules |= bindings.get(sub.id, set())
    return sorted(ast.dump(node) for node in used.values()), modules


def code_hash(func: Callable[..., Any], pkg: Package, context: Iterable[Callable[..., Any]] = ()) -> str:
    """Hash of the code `func` can run (see the module docstring). `context`: functions whose
    own definitions (not what they import) count too, e.g. the pipeline that calls the stage."""
    defs, modules = function_code(pkg, func.__module__, func.__qualname__)
    h = hashlib.sha256()
    for part in defs:
        h.update(part.encode())
    for module in sorted(pkg.closure(modules)):
        h.update(module.encode())
        h.update(pkg.dump(module).encode())
    for other in context:
        node = _top_level(pkg.tree(other.__module__)).get(other.__qualname__)
        if node is None:
            raise ValueError(f"{other.__module__} has no module-level definition {other.__qualname__!r}")
        h.update(f"context {other.__module__}.{other.__qualname__}".encode())
        h.update(ast.dump(node).encode())
    return h.hexdigest()[:16]
