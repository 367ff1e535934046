"""Generative + SASRec fusion at ranking time: a product of experts over both models' candidates.

The generative model wins on popular targets and loses on the tail; SASRec the other way round
(docs/results.md, "Where"). Fusing them at ranking time (as LIGER, Yang et al. 2024, fuses
generative and dense retrieval, here with a separately trained SASRec as the dense model, so
neither model's training is changed) ranks the union of the constrained beam's candidates
and SASRec's by

    s_w(item) = (1 - w) log p_gen(SID(item) | history) + w log p_sasrec(item | history)

with the exact teacher-forced generative log-prob for every candidate (also those only SASRec
found) and SASRec's full-catalogue log-softmax. w is picked on the valid split
(`pick_weight`); test is ranked once, with that w. w = 0 is the generative model over the
union, w = 1 SASRec over it.

Pure core: `union_candidates`, `fuse`, `pick_weight` (tensors in, tensors out). The Ray actor
that loads both models is `digr.eval.evaluate.FusionRanker`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from digr.data.metrics import EMPTY, hr_ndcg

DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass(frozen=True)
class FusionConfig:
    enabled: bool = False
    weights: tuple[float, ...] = DEFAULT_WEIGHTS   # the grid searched on valid
    candidates: int = 20                           # SASRec's top items added to the beam's
    valid_users: int = 0                           # valid rows the weight is picked on (0 = all)
    seed: int = 0                                  # which valid rows, when valid_users > 0

    def __post_init__(self) -> None:
        if not self.weights or any(not 0 <= w <= 1 for w in self.weights):
            raise ValueError(f"evaluate.fusion.weights must be a non-empty list in [0, 1], got {self.weights}")
        if self.candidates < 1:
            raise ValueError(f"evaluate.fusion.candidates must be >= 1, got {self.candidates}")
        if self.valid_users < 0:
            raise ValueError(f"evaluate.fusion.valid_users must be >= 0, got {self.valid_users}")


def union_candidates(first: torch.Tensor, second: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """first: (B, C1), second: (B, C2) item_idx, -1 = empty slot.

    Returns cand (B, C1 + C2) = both side by side, and keep (B, C1 + C2) bool: True at each
    item's first occurrence in its row (never at -1), so a duplicate is counted once.
    """
    cand = torch.cat([first, second], dim=1)
    b, c = cand.shape
    pos = torch.arange(c, device=cand.device).expand(b, c)
    first_pos = torch.full((b, n_items + 1), c, dtype=torch.long, device=cand.device)
    first_pos = first_pos.scatter_reduce(1, cand + 1, pos, reduce="amin")  # column 0 collects the -1s
    keep = (cand >= 0) & (first_pos.gather(1, cand + 1) == pos)
    return cand, keep


def fuse(cand: torch.Tensor, keep: torch.Tensor, gen_logp: torch.Tensor, dense_logp: torch.Tensor,
         weight: float, top_k: int) -> torch.Tensor:
    """cand, keep: from `union_candidates`; gen_logp, dense_logp: (B, C) each candidate's log-prob
    under the two models (-inf = excluded). Returns (B, top_k) item_idx by (1 - w) gen + w dense,
    best first, EMPTY where fewer than top_k candidates are left. Ties keep candidate order.
    A model's -inf is only multiplied in when its weight is > 0 (w = 0: SASRec's exclusions
    still hold through the generative side, which excludes the same items)."""
    if not 0 <= weight <= 1:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    parts = []
    if weight < 1:
        parts.append((1 - weight) * gen_logp)
    if weight > 0:
        parts.append(weight * dense_logp)
    score = sum(parts).masked_fill(~keep, float("-inf"))
    k = min(top_k, score.shape[1])
    # A stable descending sort keeps the beam's order among equal scores (the beam comes first).
    values, order = torch.sort(score, dim=1, descending=True, stable=True)
    items = cand.gather(1, order[:, :k]).masked_fill(torch.isinf(values[:, :k]), EMPTY)
    if k < top_k:
        items = torch.cat([items, items.new_full((items.shape[0], top_k - k), EMPTY)], dim=1)
    return items


def pick_weight(ranked: np.ndarray, targets: np.ndarray, weights: Sequence[float],
                metric: str = "ndcg@10") -> tuple[float, list[dict[str, float]]]:
    """ranked: (B, W, K) item_idx, one list per weight; targets: (B,) (valid split).
    Returns the weight with the best `metric` (the smallest weight among ties) and one row
    per weight: {"weight", "hr@10", "ndcg@10", ...}."""
    if ranked.ndim != 3 or ranked.shape[1] != len(weights):
        raise ValueError(f"ranked must be (B, W={len(weights)}, K), got shape {ranked.shape}")
    curve = [{"weight": float(w), **hr_ndcg(ranked[:, i], targets, (5, 10))} for i, w in enumerate(weights)]
    best = max(range(len(weights)), key=lambda i: (curve[i][metric], -weights[i]))
    return float(weights[best]), curve
