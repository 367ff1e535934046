"""Stage code keys: an edit re-runs the stages whose code it touches, and only those."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from digr.pipeline import stages
from digr.platform.codekey import Package, code_hash, function_code
from digr.platform.runs import Run

FILES = {
    "__init__.py": "",
    "a.py": "from pkg import b\n\ndef fa():\n    return b.fb()\n",
    "b.py": '"""Module b."""\n\ndef fb():\n    """One."""\n    return 1  # a comment\n',
    "c.py": "def fc():\n    return 2\n",
    "d.py": "X = 1\n",
    "e.py": "from . import c\n\ndef fe():\n    return c.fc()\n",
    "glue.py": (
        "import json\n"
        "from pkg.a import fa\n"
        "from pkg import c\n"
        "LIMIT = 3\n\n"
        "def helper():\n    return LIMIT\n\n"
        "def stage_one():\n    return fa() + helper()\n\n"
        "def stage_two():\n    from pkg import d\n    return c.fc() + d.X\n\n"
        "def stage_three():\n    return json.dumps({})\n"
    ),
}


def _write(root: Path, **changes: str) -> Package:
    for name, text in {**FILES, **changes}.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Package(root, "pkg")


def _ref(name: str, module: str = "pkg.glue") -> Any:
    """A stand-in for a function object: what code_hash reads of one."""
    def fn() -> None: ...
    fn.__module__, fn.__qualname__ = module, name
    return fn


def _hashes(pkg: Package) -> dict[str, str]:
    return {n: code_hash(_ref(n), pkg) for n in ("stage_one", "stage_two", "stage_three")}


def _closure(pkg: Package, module: str, name: str) -> set[str]:
    return pkg.closure(function_code(pkg, module, name)[1])


def test_closure_follows_imports_in_files_and_functions(tmp_path) -> None:
    pkg = _write(tmp_path)
    assert _closure(pkg, "pkg.glue", "stage_one") == {"pkg", "pkg.a", "pkg.b"}  # b through a
    assert _closure(pkg, "pkg.glue", "stage_two") == {"pkg", "pkg.c", "pkg.d"}  # d imported inside it
    assert _closure(pkg, "pkg.glue", "stage_three") == {"pkg"}  # json is not the package's
    assert _closure(pkg, "pkg.e", "fe") == {"pkg", "pkg.c"}  # a relative import
    defs, _ = function_code(pkg, "pkg.glue", "stage_one")
    assert len(defs) == 3  # stage_one, helper and LIMIT, not the other stages


@pytest.mark.parametrize("change, rerun", [
    ({"b.py": "def fb():\n    return 5\n"}, {"stage_one"}),  # a module stage_one reaches through another
    ({"d.py": "X = 2\n"}, {"stage_two"}),  # imported inside the function
    ({"glue.py": FILES["glue.py"].replace("LIMIT = 3", "LIMIT = 4")}, {"stage_one"}),  # a constant it uses
    ({"glue.py": FILES["glue.py"].replace("return LIMIT", "return LIMIT + 1")}, {"stage_one"}),  # a helper
    ({"glue.py": FILES["glue.py"] + "print('loaded')\n"}, {"stage_one", "stage_two", "stage_three"}),
    ({"__init__.py": "VERSION = 2\n"}, {"stage_one", "stage_two", "stage_three"}),
    # what does not change behaviour does not count:
    ({"b.py": "def fb():\n\n    return 1\n"}, set()),  # docstrings, comments, blank lines
    ({"glue.py": FILES["glue.py"] + "\ndef stage_four():\n    return 4\n"}, set()),  # a new stage
    ({"c.py": "def other():\n    return 0\n\ndef fc():\n    return 2\n"}, {"stage_two"}),  # c is used whole
])
def test_an_edit_changes_the_keys_of_the_stages_that_can_run_it(tmp_path, change, rerun) -> None:
    before = _hashes(_write(tmp_path / "before"))
    after = _hashes(_write(tmp_path / "after", **change))
    assert {n for n in before if before[n] != after[n]} == rerun


def test_definition_order_does_not_count(tmp_path) -> None:
    glue = FILES["glue.py"]
    head, rest = glue.split("def helper", 1)
    helper, stages_part = ("def helper" + rest).split("def stage_one", 1)
    reordered = head + "def stage_one" + stages_part + "\n" + helper
    assert _hashes(_write(tmp_path / "a")) == _hashes(_write(tmp_path / "b", **{"glue.py": reordered}))


def test_unknown_function_is_a_clear_error(tmp_path) -> None:
    pkg = _write(tmp_path)
    with pytest.raises(ValueError, match="no module-level definition 'missing'"):
        code_hash(_ref("missing"), pkg)
    with pytest.raises(ValueError, match="not a module of package 'pkg'"):
        code_hash(_ref("x", module="other.mod"), pkg)


def test_run_reruns_only_the_stage_whose_code_changed(tmp_path) -> None:
    calls: list[str] = []

    def run_all(root: Path, **change: str) -> Run:
        run = Run(str(tmp_path / "run"), {}, log=lambda _: None)
        run._package = _write(root, **change)
        for name in ("stage_one", "stage_two"):
            run.stage(name, {}, lambda out, n=name: calls.append(n) or {}, code=_ref(name))
        return run

    run_all(tmp_path / "v1")
    run_all(tmp_path / "v1")
    assert calls == ["stage_one", "stage_two"]  # the second run skipped both
    run = run_all(tmp_path / "v2", **{"d.py": "X = 2\n"})
    assert calls == ["stage_one", "stage_two", "stage_two"]
    manifest = run.manifest()
    assert manifest["stages"]["stage_two"]["code"] == code_hash(_ref("stage_two"), run._package)


def test_the_pipeline_stages_reach_only_their_own_modules() -> None:
    pkg = Package(Path(stages.__file__).resolve().parents[2], "digr")

    def reach(fn: Any) -> set[str]:
        return {m.removeprefix("digr.") for m in _closure(pkg, fn.__module__, fn.__name__)}

    assert reach(stages.ingest_stage) == {"digr", "data", "data.formats", "data.ingest", "platform",
                                          "platform.storage"}
    evaluate = reach(stages.evaluate_stage)
    assert {"eval.evaluate", "eval.baselines", "rec.decode", "rec.sft"} <= evaluate
    assert not evaluate & {"data.ingest", "data.formats", "evidence.embed", "tokenizer.tokenize", "tokenizer.rqvae",
                           "rl.grpo"}
    sft = reach(stages.sft_stage)
    assert {"rec.sft", "rec.decode", "rec.seqmodel", "evidence.embed"} <= sft
    assert not sft & {"eval.evaluate", "eval.baselines", "data.ingest", "rl.grpo"}
    assert "eval.evaluate" not in reach(stages.tokenize_stage) | reach(stages.embed_stage)


def test_relative_imports_resolve_from_modules_and_packages(tmp_path) -> None:
    pkg = _write(tmp_path, **{"sub/__init__.py": "from . import inner\n", "sub/inner.py": "from .. import c\n"})
    assert pkg.closure(["pkg.sub"]) == {"pkg", "pkg.sub", "pkg.sub.inner", "pkg.c"}


def test_source_is_read_once_so_an_edit_during_a_run_does_not_relabel_it(tmp_path) -> None:
    pkg = _write(tmp_path)
    key = code_hash(_ref("stage_two"), pkg)
    (tmp_path / "pkg" / "d.py").write_text("X = 2\n")  # edited after the run started
    assert code_hash(_ref("stage_two"), pkg) == key
    assert code_hash(_ref("stage_two"), Package(tmp_path, "pkg")) != key  # the next run sees it


def test_context_counts_its_own_definition_only(tmp_path) -> None:
    glue = FILES["glue.py"] + "\ndef orchestrate():\n    from pkg import d\n    return stage_one() + 1\n"
    base = code_hash(_ref("stage_three"), _write(tmp_path / "a", **{"glue.py": glue}), [_ref("orchestrate")])
    edited = glue.replace("stage_one() + 1", "stage_one() + 2")
    assert code_hash(_ref("stage_three"), _write(tmp_path / "b", **{"glue.py": edited}), [_ref("orchestrate")]) != base
    # ... but not what it imports: d is the stages' business
    assert code_hash(_ref("stage_three"), _write(tmp_path / "c", **{"glue.py": glue, "d.py": "X = 2\n"}),
                     [_ref("orchestrate")]) == base
    with pytest.raises(ValueError, match="no module-level definition 'gone'"):
        code_hash(_ref("stage_three"), _write(tmp_path / "d"), [_ref("gone")])


def test_every_pipeline_stage_names_its_code() -> None:
    import ast
    import inspect

    from digr.pipeline import run as pipeline

    calls = [node for node in ast.walk(ast.parse(inspect.getsource(pipeline.run_pipeline)))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stage"]
    assert len(calls) == len(pipeline.STAGES)
    assert all(any(k.arg == "code" for k in call.keywords) for call in calls)
