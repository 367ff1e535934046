"""Run directories: stage caching, resumption and the run manifest.

A run directory holds one sub-directory per stage plus `manifest.json`. A stage is keyed by
sha256(stage name, its config, the keys of the stages it reads, hashes of its input files,
its code): the code is what the stage's function can run (`digr.platform.codekey`), so an edit to
evaluation code re-runs evaluation, not training. On a re-run:
- `<stage>/_SUCCESS.json` holds the same key  -> the stage is skipped (its recorded info reused);
- `<stage>/_STARTED.json` holds the same key  -> it was killed part-way: the stage runs again
  in the same folder, so a stage that checkpoints (SFT) resumes from its last checkpoint;
- any other key (config, inputs or code changed) -> the folder is cleared and the stage reruns.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from digr.platform import storage
from digr.platform.codekey import Package, code_hash
from digr.platform.config import config_hash, to_dict

_PKG_ROOT = Path(__file__).resolve().parents[1]  # digr/
RUN_OUTPUTS = ("metrics.json", "report.md")
_VERSIONED = ("ray", "torch", "transformers", "sentence-transformers", "pyarrow", "numpy", "deepspeed", "vllm")


def code_version(package: Package) -> dict[str, Any]:
    info: dict[str, Any] = {"source_hash": package.source_hash()}
    try:
        repo = _PKG_ROOT.parent
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "digr", "jobs"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip()
        info["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_hash(path: str) -> str:
    """sha256 of a file's bytes (streamed: raw dumps can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class StageRecord:
    name: str
    key: str
    skipped: bool
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    code: str = ""


class Run:
    """A run directory (local or s3://) and the record of what each stage did in it.

    code_context: functions whose own definitions count in every stage's code key (the
    pipeline that wires the stages together), without what they import.
    """

    def __init__(self, run_dir: str, config: Any, log: Callable[[str], None] = print,
                 code_context: tuple[Callable[..., Any], ...] = ()) -> None:
        self.dir = storage.absolute(run_dir)
        self.config = config
        self.log = log
        # The package's source, read once: every stage is keyed on the code as the run started.
        self._package = Package(_PKG_ROOT.parent, _PKG_ROOT.name)
        self.code = code_version(self._package)
        self.code_context = code_context
        self.records: dict[str, StageRecord] = {}
        self.input_hashes: dict[str, str] = {}
        self.started = time.time()
        storage.makedirs(self.dir)

    def path(self, *parts: str) -> str:
        return storage.join(self.dir, *parts)

    def code_key(self, code: Callable[..., Any] | None) -> str:
        """The code part of a stage key: what `code` (the stage's function) can run, or the
        whole package's source where a stage names no function."""
        if code is None:
            return self.code["source_hash"]
        return code_hash(code, self._package, self.code_context)

    def stage_key(self, name: str, cfg: Any, depends: tuple[str, ...], inputs: dict[str, str], code: str) -> str:
        payload = {
            "stage": name,
            "config": config_hash(cfg),
            "depends": {d: self.records[d].key for d in depends},
            "inputs": inputs,
            "code": code,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def stage(
        self,
        name: str,
        cfg: Any,
        fn: Callable[[str], dict[str, Any]],
        depends: tuple[str, ...] = (),
        inputs: dict[str, str] | None = None,
        code: Callable[..., Any] | None = None,
    ) -> dict[str, Any]:
        """Run `fn(stage_dir) -> info` unless a finished run with the same key is there.
        code: the package function `fn` calls (a module-level def), whose code keys the stage."""
        inputs = inputs or {}
        self.input_hashes.update({f"{name}:{k}": v for k, v in inputs.items()})
        code_key = self.code_key(code)
        key = self.stage_key(name, cfg, depends, inputs, code_key)
        sdir = self.path(name)
        done, started = storage.join(sdir, "_SUCCESS.json"), storage.join(sdir, "_STARTED.json")
        if storage.exists(done) and storage.read_json(done).get("key") == key:
            info = storage.read_json(done)["info"]
            self.records[name] = StageRecord(name, key, True, 0.0, info, code_key)
            self.log(f"[{name}] up to date (key {key}), skipped")
            return info
        if storage.exists(sdir) and not (storage.exists(started) and storage.read_json(started).get("key") == key):
            storage.delete_dir(sdir)  # stale output from another config, input or code version
        elif storage.exists(started):
            self.log(f"[{name}] resuming an unfinished run (key {key})")
        for stale in RUN_OUTPUTS:  # run-level results describe the old stage output until re-made
            storage.delete_file(self.path(stale))
        storage.write_json(started, {"key": key, "time": time.time()})
        self.log(f"[{name}] running (key {key})")
        t0 = time.time()
        info = fn(sdir)
        seconds = time.time() - t0
        storage.write_json(done, {"key": key, "info": info, "seconds": seconds, "config": to_dict(cfg)})
        self.records[name] = StageRecord(name, key, False, seconds, info, code_key)
        self.log(f"[{name}] done in {seconds:.1f} s")
        return info

    def manifest(self) -> dict[str, Any]:
        return {
            "run_dir": self.dir,
            "config": to_dict(self.config),
            "config_hash": config_hash(self.config),
            "code_version": self.code,
            "packages": package_versions(),
            "argv": sys.argv,
            "input_hashes": self.input_hashes,
            "stages": {
                n: {"key": r.key, "code": r.code, "skipped": r.skipped, "seconds": round(r.seconds, 2),
                    **_summary(r.info)}
                for n, r in self.records.items()
            },
            "wall_seconds": round(time.time() - self.started, 2),
        }

    def write_manifest(self) -> None:
        storage.write_json(self.path("manifest.json"), self.manifest())


def _summary(info: dict[str, Any]) -> dict[str, Any]:
    """The manifest keeps counts and scalar stats; bulky per-epoch histories stay in the stage folder."""
    return {k: v for k, v in info.items() if k in ("rows", "stats", "metrics", "outputs")}
