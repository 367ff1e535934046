"""Every bad-input case of the command line: one line on stderr naming the file or field, exit 2,
no traceback (a traceback with --debug). Each case runs `python -m jobs.ingest` for real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.ingest", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})


def write_inter_json(folder: Path, inter: str | dict, items: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Toy.inter.json").write_text(inter if isinstance(inter, str) else json.dumps(inter))
    (folder / "Toy.item.json").write_text(json.dumps(items or {f"i{k}": {"title": f"item {k}"} for k in range(6)}))
    return folder


def error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def inter_args(folder: Path) -> list[str]:
    return ["ingest.source=inter-json", f"ingest.path={folder}", "ingest.name=Toy"]


CASES = {
    "missing config file": (lambda t: ["--config", str(t / "nope.yaml")], "config file not found"),
    "config not YAML": (lambda t: ["--config", str(_write(t / "bad.yaml", "sft: [1, 2\n"))], "not valid YAML"),
    "unknown key": (lambda t: ["sft.epoch=3"], "sft.epoch"),
    "bad value": (lambda t: ["sft.epochs=ten"], "sft.epochs"),
    "missing data folder": (lambda t: inter_args(t / "nowhere"), "Toy.inter.json"),
    "bad JSON line": (lambda t: inter_args(write_inter_json(t / "d", '{"u1": ["i0", "i1"],\n  "u2": [i2]}')),
                      "line 2"),
    "nothing left after k-core": (lambda t: ["ingest.min_interactions=100000"], "no usable interactions"),
    "no known items": (lambda t: inter_args(write_inter_json(t / "d", {"u1": ["x0", "x1", "x2"]})),
                       "no usable interactions"),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case: str, tmp_path: Path) -> None:
    make_args, expected = CASES[case]
    line = error_line(run_cli("--output", str(tmp_path / "run"), *make_args(tmp_path)))
    assert expected in line and "--debug" in line, line


def test_output_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    assert "is a file" in error_line(run_cli("--output", str(tmp_path / "f")))
    assert "is a file" in error_line(run_cli("--output", str(tmp_path / "f" / "run")))


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = run_cli("--debug", "--output", str(tmp_path / "run"), "sft.epochs=ten")
    assert res.returncode != 0 and "Traceback" in res.stderr and "sft.epochs" in res.stderr
