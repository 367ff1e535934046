"""Leave-last-out ranking metrics and the predictions file the independent scorer reads.

Protocol (TIGER, Rajput et al. 2023; SASRec, Kang & McAuley 2018): one held-out target per
user, ranked against the full catalogue. With a single relevant item,

    HR@K   = 1[rank < K]
    NDCG@K = 1[rank < K] / log2(rank + 2)        (rank 0-based, ideal DCG = 1)

averaged over users. `hr_ndcg` must agree with `../shared/tools/score.py`, which shares no
code with us on purpose: a target that appears twice in a list counts at its first position,
and a user without a prediction counts as a miss.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from os import PathLike
from typing import IO

import numpy as np

EMPTY = -1  # an unfilled slot in a ranked list (fewer than K candidates were left)


def hr_ndcg(ranked: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """Hit rate and NDCG at each K, averaged over rows.

    ranked: (B, K) int item_idx, best first; EMPTY (-1) marks an unfilled slot.
    targets: (B,) int item_idx, one held-out item per row (must be >= 0).
    Returns {"hr@5": ..., "ndcg@5": ..., "hr@10": ..., "ndcg@10": ...} (in the order of `ks`).
    """
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be (B, K), got shape {ranked.shape}")
    if targets.ndim != 1 or targets.shape[0] != ranked.shape[0]:
        raise ValueError(f"targets must be (B,) with B={ranked.shape[0]} rows of ranked, got shape {targets.shape}")
    if ranked.shape[0] == 0:
        raise ValueError("ranked has no rows: metrics over zero users are undefined")
    if not (np.issubdtype(ranked.dtype, np.integer) and np.issubdtype(targets.dtype, np.integer)):
        raise ValueError(f"ranked and targets must be integer item_idx, got {ranked.dtype} and {targets.dtype}")
    if (targets < 0).any():
        # A negative target would "hit" the EMPTY slots.
        raise ValueError(f"targets must be >= 0, got min {targets.min()}")
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    if max(ks) > ranked.shape[1]:
        # Scoring @10 from top-5 lists would silently under-report; ask for longer lists.
        raise ValueError(f"ks={ks} needs lists of length >= {max(ks)}, ranked has K={ranked.shape[1]}")

    hits = ranked == targets[:, None]  # (B, K)
    has_hit = hits.any(axis=1)
    # argmax gives the first True, i.e. the first occurrence, like score.py's list.index.
    rank = np.where(has_hit, hits.argmax(axis=1), ranked.shape[1])  # (B,), K = miss
    gain = np.where(has_hit, 1.0 / np.log2(rank + 2.0), 0.0)
    out: dict[str, float] = {}
    for k in ks:
        within = rank < k
        out[f"hr@{k}"] = float(within.mean())
        out[f"ndcg@{k}"] = float(np.where(within, gain, 0.0).mean())
    return out


def write_predictions(
    path_or_file: str | PathLike[str] | IO[str],
    user_ids: Sequence[str],
    ranked_item_ids: Sequence[Sequence[str]],
) -> None:
    """Write one JSONL line per user, {"user": "<id>", "items": ["<id>", ...]}, best first.

    Ids are written as strings, as keys and items appear in `<Name>.inter.json` (score.py
    compares them as strings). Map item_idx back to source ids and drop EMPTY slots before
    calling. Write a line for every user: score.py counts a missing user as a miss.
    """
    if len(user_ids) != len(ranked_item_ids):
        raise ValueError(f"user_ids has {len(user_ids)} entries but ranked_item_ids has {len(ranked_item_ids)}")
    lines = []
    for user, items in zip(user_ids, ranked_item_ids):
        items = [str(i) for i in items]
        if len(set(items)) != len(items):
            raise ValueError(f"user {user!r}: duplicate items in the ranked list {items}")
        lines.append(json.dumps({"user": str(user), "items": items}) + "\n")
    if hasattr(path_or_file, "write"):
        path_or_file.writelines(lines)  # type: ignore[union-attr]
    else:
        with open(path_or_file, "w", encoding="utf-8") as f:  # type: ignore[arg-type]
            f.writelines(lines)
