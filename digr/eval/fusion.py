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

A learned combiner (`method: learned`, stacking on the valid split): a linear listwise
(softmax) ranker over a few features of each candidate: both log-probs, the item's training
popularity and their products with it (the generative model is strong on the head and weak on
the tail, so how much to trust each model depends on the item's popularity: docs/results.md,
"Where"), and which list found it. Fit by L-BFGS on the valid rows whose target is a candidate.
`method: auto` (the default) picks grid or learned by 2-fold cross-fitting on valid
(`choose`): fit on one half, score the other, both ways; test is ranked once, with the winner
refit on all of valid.

Pure core: `union_candidates`, `fuse`, `pick_weight`, `features`, `fit_linear`, `rank_linear`,
`choose` (tensors in, tensors out). The Ray actor that loads both models is
`digr.eval.evaluate.FusionRanker`; it returns each row's candidates and both log-probs once,
and every combination is computed from them here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from digr.data.metrics import EMPTY, hr_ndcg

DEFAULT_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
METHODS = ("grid", "learned", "auto")
FEATURES = ("gen", "dense", "pop", "gen*pop", "dense*pop", "in_beam", "in_dense")


@dataclass(frozen=True)
class FusionConfig:
    enabled: bool = False
    weights: tuple[float, ...] = DEFAULT_WEIGHTS   # the grid searched on valid
    candidates: int = 20                           # SASRec's top items added to the beam's
    valid_users: int = 0                           # valid rows the weight is picked on (0 = all)
    seed: int = 0                                  # which valid rows, when valid_users > 0
    # grid: the weight grid above; learned: the linear combiner; auto: whichever wins a 2-fold
    # cross-fit on valid (`choose`).
    method: str = "auto"
    l2: float = 1e-3                               # the learned combiner's L2 penalty (per row)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"evaluate.fusion.method must be one of {METHODS}, got {self.method!r}")
        if self.l2 < 0:
            raise ValueError(f"evaluate.fusion.l2 must be >= 0, got {self.l2}")
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
    return _top(cand, sum(parts).masked_fill(~keep, float("-inf")), top_k)


def _top(cand: torch.Tensor, score: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, top_k) of cand by score (-inf = never), best first, EMPTY-padded. A stable
    descending sort keeps candidate order among equal scores (the beam comes first)."""
    k = min(top_k, score.shape[1])
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


def features(cand: torch.Tensor, keep: torch.Tensor, gen_logp: torch.Tensor, dense_logp: torch.Tensor,
             n_beam: int, log_pop: torch.Tensor) -> torch.Tensor:
    """cand, keep: (B, C) from `union_candidates` (the first n_beam columns are the beam's);
    gen_logp, dense_logp: (B, C); log_pop: (n_items,) log(1 + training count) / its max, in [0, 1].

    Returns (B, C, F) float32 in `FEATURES` order; 0 wherever keep is False (those are masked
    out of every ranking). in_beam / in_dense: 1 if the item is in that model's list at all
    (a duplicate's first occurrence carries both flags)."""
    same = cand.unsqueeze(2) == cand.unsqueeze(1)                   # (B, C, C)
    in_beam = same[:, :, :n_beam].any(2).float()
    in_dense = same[:, :, n_beam:].any(2).float()
    pop = log_pop[cand.clamp(min=0)]
    g = gen_logp.masked_fill(~keep, 0.0)
    d = dense_logp.masked_fill(~keep, 0.0)
    out = torch.stack([g, d, pop, g * pop, d * pop, in_beam, in_dense], dim=2)
    return out.masked_fill(~keep.unsqueeze(2), 0.0).float()


def _target_pos(cand: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) the column holding each row's target among the kept candidates, -1 where absent."""
    hit = (cand == targets.unsqueeze(1)) & keep
    return torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(targets, -1))


def fit_linear(feats: torch.Tensor, keep: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor,
               l2: float = 1e-3, steps: int = 100) -> torch.Tensor:
    """Listwise softmax regression: theta (F,) maximising the mean log-softmax of the target's
    score feats @ theta over its row's kept candidates, minus l2 * |theta|^2, on the rows whose
    target is a candidate (the others carry no signal for reordering). Starts at the grid's
    w = 0.5 (theta = [0.5, 0.5, 0, ...]). feats (B, C, F), keep/cand (B, C), targets (B,)."""
    pos = _target_pos(cand, keep, targets)
    rows = pos >= 0
    x, k, y = feats[rows].double(), keep[rows], pos[rows]
    theta = torch.zeros(x.shape[2], dtype=torch.float64)
    theta[:2] = 0.5
    theta.requires_grad_(True)
    if not len(y):
        return theta.detach().float()
    opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (x @ theta).masked_fill(~k, float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits, y) + l2 * theta.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach().float()


def rank_linear(cand: torch.Tensor, keep: torch.Tensor, feats: torch.Tensor, theta: torch.Tensor,
                top_k: int) -> torch.Tensor:
    """(B, top_k) item_idx by feats @ theta, best first, EMPTY-padded (as `fuse`)."""
    return _top(cand, (feats @ theta).masked_fill(~keep, float("-inf")), top_k)


@dataclass(frozen=True)
class Combiner:
    """A fitted fusion: method "grid" with its weight, or "learned" with theta (FEATURES order)."""
    method: str
    weight: float = 0.5
    theta: tuple[float, ...] = ()

    def rank(self, cand: torch.Tensor, keep: torch.Tensor, gen_logp: torch.Tensor, dense_logp: torch.Tensor,
             feats: torch.Tensor, top_k: int) -> torch.Tensor:
        if self.method == "grid":
            return fuse(cand, keep, gen_logp, dense_logp, self.weight, top_k)
        return rank_linear(cand, keep, feats, torch.tensor(self.theta), top_k)


def _fit(method: str, cfg: FusionConfig, cand: torch.Tensor, keep: torch.Tensor, gen_logp: torch.Tensor,
         dense_logp: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor, top_k: int
         ) -> tuple[Combiner, list[dict[str, float]]]:
    if method == "grid":
        lists = np.stack([fuse(cand, keep, gen_logp, dense_logp, w, top_k).numpy() for w in cfg.weights], axis=1)
        weight, curve = pick_weight(lists, targets.numpy(), cfg.weights)
        return Combiner("grid", weight=weight), curve
    theta = fit_linear(feats, keep, cand, targets, cfg.l2)
    return Combiner("learned", theta=tuple(round(float(t), 6) for t in theta)), []


def choose(cfg: FusionConfig, cand: torch.Tensor, keep: torch.Tensor, gen_logp: torch.Tensor,
           dense_logp: torch.Tensor, feats: torch.Tensor, targets: torch.Tensor, top_k: int = 10
           ) -> tuple[Combiner, dict]:
    """The fusion to rank test with, fitted on these valid rows (all (B, C[, F]) / (B,) tensors).

    method grid / learned: that one, fit on all rows. auto: each method is fit on one half of
    the rows (a seeded split) and scored (NDCG@10) on the other, both ways; the better mean
    wins (grid on ties) and is refit on all rows. Returns (combiner, report) where report has
    "method", "weight" or "theta", "valid_curve" (the grid's, on all rows) and, for auto,
    "cv_ndcg@10" per method."""
    report: dict = {}
    methods = ("grid", "learned") if cfg.method == "auto" else (cfg.method,)
    if len(methods) > 1:
        order = torch.from_numpy(np.random.default_rng(cfg.seed).permutation(len(targets)))
        halves = (order[: len(order) // 2], order[len(order) // 2:])
        cv = {}
        for m in methods:
            scores = []
            for a, b in (halves, halves[::-1]):
                comb, _ = _fit(m, cfg, cand[a], keep[a], gen_logp[a], dense_logp[a], feats[a], targets[a], top_k)
                ranked = comb.rank(cand[b], keep[b], gen_logp[b], dense_logp[b], feats[b], top_k)
                scores.append(hr_ndcg(ranked.numpy(), targets[b].numpy(), (10,))["ndcg@10"])
            cv[m] = round(float(np.mean(scores)), 6)
        report["cv_ndcg@10"] = cv
        methods = (max(methods, key=lambda m: (cv[m], m == "grid")),)
    combiner, curve = _fit(methods[0], cfg, cand, keep, gen_logp, dense_logp, feats, targets, top_k)
    if combiner.method != "grid":
        _, curve = _fit("grid", cfg, cand, keep, gen_logp, dense_logp, feats, targets, top_k)
    report.update({"method": combiner.method, "weight": combiner.weight if combiner.method == "grid" else None,
                   "theta": dict(zip(FEATURES, combiner.theta)) if combiner.theta else None,
                   "valid_curve": curve})
    return combiner, report
