"""Generative + SASRec fusion on hand-computed candidates and scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from digr.data.metrics import EMPTY
from digr.eval.fusion import FusionConfig, choose, features, fit_linear, fuse, pick_weight, rank_linear, union_candidates


def test_union_keeps_each_items_first_occurrence_and_drops_empty_slots() -> None:
    beam = torch.tensor([[3, 1, -1], [0, 2, 4]])
    dense = torch.tensor([[1, 5], [4, -1]])
    cand, keep = union_candidates(beam, dense, n_items=6)
    assert cand.tolist() == [[3, 1, -1, 1, 5], [0, 2, 4, 4, -1]]
    assert keep.tolist() == [[True, True, False, False, True], [True, True, True, False, False]]


def test_fuse_ranks_by_the_weighted_sum_of_log_probs() -> None:
    # One row, three candidates. gen log p: a=-1, b=-2, c=-4; SASRec log p: a=-5, b=-1, c=-1.
    cand = torch.tensor([[10, 11, 12]])
    keep = torch.ones(1, 3, dtype=torch.bool)
    gen = torch.tensor([[-1.0, -2.0, -4.0]])
    dense = torch.tensor([[-5.0, -1.0, -1.0]])
    # w = 0: a, b, c. w = 1: b and c tie at -1 (candidate order: b first), then a.
    assert fuse(cand, keep, gen, dense, 0.0, 3).tolist() == [[10, 11, 12]]
    assert fuse(cand, keep, gen, dense, 1.0, 3).tolist() == [[11, 12, 10]]
    # w = 0.5: a = -3.0, b = -1.5, c = -2.5 -> b, c, a.
    assert fuse(cand, keep, gen, dense, 0.5, 3).tolist() == [[11, 12, 10]]
    # w = 0.25: a = -2.0, b = -1.75, c = -3.25 -> b, a, c.
    assert fuse(cand, keep, gen, dense, 0.25, 3).tolist() == [[11, 10, 12]]


def test_fuse_pads_with_empty_and_never_returns_a_dropped_candidate() -> None:
    cand = torch.tensor([[7, 8, 7]])
    keep = torch.tensor([[True, True, False]])  # the second 7 is a duplicate
    gen = torch.tensor([[-1.0, -math.inf, -0.1]])  # 8 was excluded on the generative side
    dense = torch.tensor([[-1.0, -0.5, -0.1]])
    assert fuse(cand, keep, gen, dense, 0.5, 4).tolist() == [[7, EMPTY, EMPTY, EMPTY]]
    # w = 1 ignores the generative side entirely: 8 comes back on SASRec's score.
    assert fuse(cand, keep, gen, dense, 1.0, 2).tolist() == [[8, 7]]
    with pytest.raises(ValueError, match="fusion weight"):
        fuse(cand, keep, gen, dense, 1.5, 2)


def test_pick_weight_takes_the_best_valid_ndcg_and_the_smallest_weight_on_ties() -> None:
    targets = np.array([5, 6])
    lists = np.full((2, 3, 10), EMPTY)
    lists[:, 0, 1] = targets       # weight 0.0: both hit at rank 1 -> ndcg 1/log2(3)
    lists[0, 1, 0] = 5             # weight 0.5: one at rank 0, one miss -> 0.5
    lists[:, 2, 0] = targets       # weight 1.0: both at rank 0 -> 1.0
    weight, curve = pick_weight(lists, targets, (0.0, 0.5, 1.0))
    assert weight == 1.0
    assert [round(r["ndcg@10"], 4) for r in curve] == [round(1 / math.log2(3), 4), 0.5, 1.0]
    lists[:, 0, 0] = targets       # now 0.0 ties 1.0: the smaller weight wins
    assert pick_weight(lists, targets, (0.0, 0.5, 1.0))[0] == 0.0
    with pytest.raises(ValueError, match="W=2"):
        pick_weight(lists, targets, (0.0, 1.0))


def test_config_errors_name_the_setting() -> None:
    with pytest.raises(ValueError, match="fusion.weights"):
        FusionConfig(weights=(0.5, 2.0))
    with pytest.raises(ValueError, match="fusion.candidates"):
        FusionConfig(candidates=0)
    with pytest.raises(ValueError, match="fusion.method"):
        FusionConfig(method="best")
    with pytest.raises(ValueError, match="fusion.l2"):
        FusionConfig(l2=-1.0)


def test_features_by_hand() -> None:
    # Beam [3, 1], SASRec [1, 5]: the second 1 is a duplicate (keep False), so the first 1 carries both flags.
    cand = torch.tensor([[3, 1, 1, 5]])
    keep = torch.tensor([[True, True, False, True]])
    gen = torch.tensor([[-1.0, -2.0, -2.0, -3.0]])
    dense = torch.tensor([[-4.0, -1.0, -1.0, -0.5]])
    log_pop = torch.tensor([0.0, 0.5, 0.0, 1.0, 0.0, 0.0])
    f = features(cand, keep, gen, dense, n_beam=2, log_pop=log_pop)
    assert f.shape == (1, 4, 7)
    assert f[0].tolist() == [
        [-1.0, -4.0, 1.0, -1.0, -4.0, 1.0, 0.0],   # 3: gen, dense, pop, gen*pop, dense*pop, in_beam, in_dense
        [-2.0, -1.0, 0.5, -1.0, -0.5, 1.0, 1.0],   # 1: in both lists
        [0.0] * 7,                                  # the duplicate
        [-3.0, -0.5, 0.0, -0.0, -0.0, 0.0, 1.0],   # 5: SASRec's only
    ]


def _head_tail_rows(copies: int) -> tuple[torch.Tensor, ...]:
    """Two kinds of row, two candidates each, same log-probs: gen prefers the first, SASRec the
    second. On a popular row (pop 1) the target is the generative pick, on a tail row (pop 0)
    SASRec's. No single weight gets both right; a popularity-aware combiner does."""
    cand = torch.tensor([[0, 1], [2, 3]]).repeat(copies, 1)
    keep = torch.ones_like(cand, dtype=torch.bool)
    gen = torch.tensor([[-1.0, -3.0]]).repeat(2 * copies, 1)
    dense = torch.tensor([[-3.0, -1.0]]).repeat(2 * copies, 1)
    log_pop = torch.tensor([1.0, 1.0, 0.0, 0.0])
    targets = torch.tensor([0, 3]).repeat(copies)
    return cand, keep, gen, dense, features(cand, keep, gen, dense, 2, log_pop), targets


def test_learned_combiner_uses_popularity_where_no_weight_can() -> None:
    cand, keep, gen, dense, feats, targets = _head_tail_rows(1)
    for w in (0.0, 0.5, 1.0):  # every weight ranks both rows' candidates the same way round
        assert fuse(cand, keep, gen, dense, w, 1)[:, 0].tolist() != targets.tolist()
    theta = fit_linear(feats, keep, cand, targets, l2=1e-3)
    assert rank_linear(cand, keep, feats, theta, 2).tolist() == [[0, 1], [3, 2]]
    # A row whose target is no candidate carries no signal: the fit is the same without it.
    more = fit_linear(torch.cat([feats, feats[:1]]), torch.cat([keep, keep[:1]]), torch.cat([cand, cand[:1]]),
                      torch.cat([targets, torch.tensor([9])]), l2=1e-3)
    assert torch.allclose(theta, more, atol=1e-4)


def test_choose_cross_fits_on_valid_and_refits_the_winner() -> None:
    cand, keep, gen, dense, feats, targets = _head_tail_rows(10)
    combiner, report = choose(FusionConfig(method="auto"), cand, keep, gen, dense, feats, targets)
    assert report["method"] == combiner.method == "learned" and report["weight"] is None
    assert report["cv_ndcg@10"]["learned"] == 1.0 > report["cv_ndcg@10"]["grid"]
    assert set(report["theta"]) == {"gen", "dense", "pop", "gen*pop", "dense*pop", "in_beam", "in_dense"}
    assert len(report["valid_curve"]) == 11  # the grid's curve is reported either way
    grid, report = choose(FusionConfig(method="grid"), cand, keep, gen, dense, feats, targets)
    assert grid.method == "grid" and "cv_ndcg@10" not in report and grid.weight == report["weight"]
    best = max(r["ndcg@10"] for r in report["valid_curve"])
    assert next(r["ndcg@10"] for r in report["valid_curve"] if r["weight"] == grid.weight) == best
    assert best == pytest.approx((1 + 1 / math.log2(3)) / 2)  # one kind of row right at rank 1, the other at 2
