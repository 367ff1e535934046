"""Stage caching: finished stages are skipped, changed config reruns, killed stages resume in place."""

from __future__ import annotations

import json

import pytest

from digr.platform import storage
from digr.platform.runs import Run


def _stage(calls: list[str], name: str):
    def fn(out: str) -> dict:
        calls.append(name)
        storage.write_text(storage.join(out, "artifact.txt"), name)
        return {"rows": {"n": 1}}
    return fn


def test_skip_rerun_and_invalidate_downstream(tmp_path) -> None:
    calls: list[str] = []
    run = Run(str(tmp_path), {"x": 1}, log=lambda _: None)
    run.stage("a", {"k": 1}, _stage(calls, "a"))
    run.stage("b", {"k": 1}, _stage(calls, "b"), depends=("a",))
    assert calls == ["a", "b"]

    run = Run(str(tmp_path), {"x": 1}, log=lambda _: None)
    run.stage("a", {"k": 1}, _stage(calls, "a"))
    run.stage("b", {"k": 1}, _stage(calls, "b"), depends=("a",))
    assert calls == ["a", "b"]  # both cached
    assert run.records["a"].skipped and run.records["b"].skipped

    run = Run(str(tmp_path), {"x": 1}, log=lambda _: None)
    run.stage("a", {"k": 2}, _stage(calls, "a"))  # config change in a ...
    run.stage("b", {"k": 1}, _stage(calls, "b"), depends=("a",))  # ... reruns b too
    assert calls == ["a", "b", "a", "b"]


def test_input_hash_change_reruns(tmp_path) -> None:
    calls: list[str] = []
    Run(str(tmp_path), {}, log=lambda _: None).stage("a", {}, _stage(calls, "a"), inputs={"f": "h1"})
    Run(str(tmp_path), {}, log=lambda _: None).stage("a", {}, _stage(calls, "a"), inputs={"f": "h1"})
    Run(str(tmp_path), {}, log=lambda _: None).stage("a", {}, _stage(calls, "a"), inputs={"f": "h2"})
    assert calls == ["a", "a"]


def test_killed_stage_resumes_in_place_but_stale_output_is_cleared(tmp_path) -> None:
    def killed(out: str) -> dict:
        storage.write_text(storage.join(out, "checkpoint.txt"), "epoch 3")
        raise KeyboardInterrupt

    run = Run(str(tmp_path), {}, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        run.stage("sft", {"epochs": 5}, killed)
    seen: list[bool] = []
    run = Run(str(tmp_path), {}, log=lambda _: None)
    run.stage("sft", {"epochs": 5}, lambda out: seen.append(storage.exists(storage.join(out, "checkpoint.txt"))) or {})
    assert seen == [True]  # same key: the partial checkpoint is still there to resume from

    run = Run(str(tmp_path), {}, log=lambda _: None)
    run.stage("sft", {"epochs": 6}, lambda out: seen.append(storage.exists(storage.join(out, "checkpoint.txt"))) or {})
    assert seen == [True, False]  # new config: the old stage folder was cleared first


def test_manifest_records_versions_and_stages(tmp_path) -> None:
    run = Run(str(tmp_path), {"x": 1}, log=lambda _: None)
    run.stage("a", {"k": 1}, _stage([], "a"), inputs={"data.json": "abc"})
    run.write_manifest()
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["packages"]["torch"] and m["packages"]["ray"] == "2.58.0"
    assert m["code_version"]["source_hash"]
    assert m["stages"]["a"]["rows"] == {"n": 1} and m["input_hashes"] == {"a:data.json": "abc"}
