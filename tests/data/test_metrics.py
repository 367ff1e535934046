"""HR/NDCG on hand-computed rankings, and agreement with the independent scorer."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from digr.data.metrics import EMPTY, hr_ndcg, write_predictions

SCORE_PY = Path(__file__).resolve().parents[3] / "shared" / "tools" / "score.py"


def test_hr_ndcg_hand_computed() -> None:
    ranked = np.array([
        [7, 1, 2, 3, 4, 5, 6, 8, 9, 10],   # target 7 at rank 0: hr 1, ndcg 1/log2(2) = 1
        [1, 2, 7, 3, 4, 5, 6, 8, 9, 10],   # rank 2: ndcg 1/log2(4) = 0.5
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],   # rank 6: miss @5; @10 ndcg 1/log2(8) = 1/3
        [1, 2, 3, 4, 5, 6, 8, 9, 10, 11],  # miss
        [1, 2, 3, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY, EMPTY],  # short list, miss
    ])
    targets = np.array([7, 7, 7, 7, 7])
    got = hr_ndcg(ranked, targets)
    # hr@5 = 2/5; ndcg@5 = (1 + 0.5)/5 = 0.3; hr@10 = 3/5; ndcg@10 = (1 + 0.5 + 1/3)/5 = 0.36667
    assert got == pytest.approx({"hr@5": 0.4, "ndcg@5": 0.3, "hr@10": 0.6, "ndcg@10": (1.5 + 1 / 3) / 5})
    assert list(got) == ["hr@5", "ndcg@5", "hr@10", "ndcg@10"]


def test_empty_slots_never_hit_and_duplicates_count_first() -> None:
    # Row 0: target 3 appears at ranks 1 and 2 -> counted at rank 1, ndcg 1/log2(3) = 0.63093.
    # Row 1: all slots empty -> miss. Mean ndcg@3 = 0.63093 / 2 = 0.31546, hr@3 = 0.5.
    ranked = np.array([[0, 3, 3], [EMPTY, EMPTY, EMPTY]])
    got = hr_ndcg(ranked, np.array([3, 0]), ks=(3,))
    assert got == pytest.approx({"hr@3": 0.5, "ndcg@3": 1 / math.log2(3) / 2})


@pytest.mark.parametrize(
    "ranked, targets, ks, match",
    [
        (np.array([1, 2]), np.array([1]), (1,), "ranked must be"),
        (np.array([[1, 2]]), np.array([1, 2]), (1,), "targets must be"),
        (np.array([[1, 2]]), np.array([-1]), (1,), "targets must be >= 0"),
        (np.array([[1, 2]]), np.array([1]), (5,), "needs lists of length >= 5"),
        (np.array([[1.0, 2.0]]), np.array([1]), (1,), "integer"),
        (np.zeros((0, 2), dtype=int), np.zeros(0, dtype=int), (1,), "no rows"),
    ],
)
def test_bad_input_raises(ranked, targets, ks, match) -> None:
    with pytest.raises(ValueError, match=match):
        hr_ndcg(ranked, targets, ks)


def test_write_predictions_format() -> None:
    buf = io.StringIO()
    write_predictions(buf, ["u1", "u2"], [[3, "5"], []])
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines == [{"user": "u1", "items": ["3", "5"]}, {"user": "u2", "items": []}]
    with pytest.raises(ValueError, match="duplicate"):
        write_predictions(io.StringIO(), ["u"], [["1", "1"]])
    with pytest.raises(ValueError, match="user_ids has 1"):
        write_predictions(io.StringIO(), ["u"], [])


def test_agrees_with_score_py(scientific_dir: Path, tmp_path: Path) -> None:
    """Mixed predictions on the real data: for every third user their own test target at
    rank (user % 10) (hits at every rank, so NDCG is exercised), for the rest the most
    popular items (a few hits by chance). Ours and score.py's must agree to 5 decimals."""
    if not SCORE_PY.exists():
        pytest.fail(f"independent scorer missing: {SCORE_PY}")
    seqs = json.loads(next(scientific_dir.glob("*.inter.json")).read_text())
    users = list(seqs)
    counts: dict[int, int] = {}
    for s in seqs.values():
        for i in s[:-2]:
            counts[i] = counts.get(i, 0) + 1
    popular = sorted(counts, key=lambda i: (-counts[i], i))[:10]
    ranked = np.full((len(users), 10), EMPTY, dtype=np.int64)
    for row, u in enumerate(users):
        if row % 3 == 0:
            target = seqs[u][-1]
            others = [i for i in popular if i != target][:9]
            r = row % 10
            items = others[:r] + [target] + others[r:]
        else:
            items = popular[: 5 + row % 6]  # lists of 5..10 items, EMPTY-padded
        ranked[row, : len(items)] = items
    ours = hr_ndcg(ranked, np.array([seqs[u][-1] for u in users]))
    assert 0.3 < ours["hr@10"] < 0.4  # the planted third of users, plus chance hits

    preds = tmp_path / "preds.jsonl"
    write_predictions(preds, users, [[i for i in r if i != EMPTY] for r in ranked.tolist()])
    done = subprocess.run([sys.executable, str(SCORE_PY), str(scientific_dir), str(preds)],
                          capture_output=True, text=True, check=True, timeout=60)
    theirs = json.loads(done.stdout)
    assert theirs["missing"] == 0 and theirs["users"] == len(users)
    for key, value in ours.items():
        assert round(value, 5) == theirs[key], key
