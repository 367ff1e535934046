"""A worker node killed mid-SFT on a local 3-node Ray (head + 2 workers): the run completes with
the unfaulted run's rows, metrics and predictions (benchmarks/bench_faults.py, which also kills
mid-embed and mid-evaluate)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_a_node_killed_mid_sft_changes_nothing(scientific_dir) -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_faults.py"), "--stages", "sft",
                          "--users", "150"], capture_output=True, text=True, timeout=1200, cwd=REPO)
    tail = (out.stdout + out.stderr)[-4000:]
    assert out.returncode == 0, tail
    assert "*** killed node" in out.stdout and "PASS" in out.stdout, tail
    assert "| sft | " in out.stdout and out.stdout.count("| True | True | True |") == 2, tail
    assert "the restart resumed after epoch" in out.stdout, tail  # from its checkpoint, not from scratch
