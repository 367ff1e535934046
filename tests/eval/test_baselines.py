"""Popularity on a hand-made dataset; SASRec on a toy cycle it must learn, causality, exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digr.data.metrics import EMPTY, hr_ndcg
from digr.eval.baselines import (
    SASRec,
    SASRecConfig,
    popularity_counts,
    popularity_rank,
    sasrec_rank,
    seen_mask,
    train_sasrec,
    training_windows,
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: extra threads only add contention on shared cores. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Full sequences over 6 items; the last two items of each are the valid and test targets.
SEQS = [
    [0, 1, 2, 5, 5],  # train part [0, 1, 2]
    [1, 2, 3, 5, 4],  # train part [1, 2, 3]
    [2, 1, 4, 5],     # train part [2, 1]
]


def test_popularity_counts_skip_valid_and_test_targets() -> None:
    # Train parts hold 0:1, 1:3, 2:3, 3:1, 4:0, 5:0. Item 5 is the most frequent item
    # overall (4 times) but only ever as a valid/test target, so it must count 0.
    np.testing.assert_array_equal(popularity_counts(SEQS, 6), [1, 3, 3, 1, 0, 0])


def test_popularity_rank_ties_and_exclusion() -> None:
    counts = popularity_counts(SEQS, 6)
    # Order by count, ties by lower item_idx: 1, 2 (3 each), 0, 3 (1 each), 4, 5 (0 each).
    ranked = popularity_rank(counts, [[], [1, 3], [0, 1, 2, 3, 4]], k=3)
    np.testing.assert_array_equal(ranked, [
        [1, 2, 0],
        [2, 0, 4],           # 1 and 3 seen
        [5, EMPTY, EMPTY],   # only item 5 is left
    ])
    # Without exclusion every row gets the global top 3.
    np.testing.assert_array_equal(popularity_rank(counts, [[1, 3]], k=3, exclude_seen=False), [[1, 2, 0]])


def test_popularity_rank_from_train_sequences_matches_counts() -> None:
    train = [s[:-2] for s in SEQS]
    hist = [[1], [2, 3]]
    np.testing.assert_array_equal(
        popularity_rank(train, hist, k=4, n_items=6), popularity_rank(popularity_counts(SEQS, 6), hist, k=4)
    )
    with pytest.raises(ValueError, match="outside"):
        popularity_rank([[0, 9]], hist, k=2, n_items=6)
    with pytest.raises(ValueError, match="k must be"):
        popularity_rank(popularity_counts(SEQS, 6), hist, k=0)


def _cycle_sequences(n_items: int, n_users: int, length: int) -> list[list[int]]:
    """Every user walks the cycle 0 -> 1 -> ... -> n_items-1 -> 0 from a different start."""
    return [[(start + t) % n_items for t in range(length)] for start in range(n_users)]


@pytest.mark.parametrize("norm,examples", [("post", "prefixes"), ("pre", "windows")])
def test_sasrec_learns_a_cycle_and_stops_early(norm: str, examples: str) -> None:
    # 30 items so that valid NDCG@10 cannot saturate by chance (6 seen items excluded
    # leave 24 candidates); it reaches 1.0 (every target at rank 0) around epoch 7.
    n_items = 30
    seqs = _cycle_sequences(n_items, n_users=60, length=8)
    cfg = SASRecConfig(hidden=32, layers=1, heads=2, dropout=0.0, max_len=8, epochs=40,
                       batch_size=16, lr=1e-2, patience=3, seed=0, norm=norm, examples=examples)
    model, history = train_sasrec(seqs, n_items, cfg, log=lambda _: None)
    assert len(history) < 40, "patience 3 should stop well before 40 epochs once NDCG stays at 1"
    assert history[-1]["loss"] < history[0]["loss"]
    # Test protocol: history s[:-1], target s[-1] = (s[-2] + 1) mod 30. Chance HR@1 ~ 1/23.
    hist = [s[:-1] for s in seqs]
    ranked = sasrec_rank(model, hist, k=1, exclude=seen_mask(hist, n_items))
    assert hr_ndcg(ranked, np.array([s[-1] for s in seqs]), ks=(1,))["hr@1"] >= 0.95


def test_sasrec_is_deterministic_for_a_seed() -> None:
    seqs = _cycle_sequences(6, n_users=8, length=6)
    cfg = SASRecConfig(hidden=8, layers=1, heads=1, max_len=6, epochs=2, batch_size=4, seed=3)
    (m1, h1), (m2, h2) = (train_sasrec(seqs, 6, cfg, log=lambda _: None) for _ in range(2))
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_sasrec_bce_loss_trains() -> None:
    seqs = _cycle_sequences(8, n_users=16, length=6)
    cfg = SASRecConfig(hidden=16, layers=1, heads=1, dropout=0.0, max_len=6, epochs=5, batch_size=8,
                       lr=1e-2, loss="bce", seed=0)
    _, history = train_sasrec(seqs, 8, cfg, log=lambda _: None)
    # BCE of an untrained model is about 2 * log 2 = 1.39 (one positive + one negative term).
    assert history[0]["loss"] < 1.5 and history[-1]["loss"] < history[0]["loss"]


def test_sasrec_causal_mask() -> None:
    torch.manual_seed(0)
    model = SASRec(10, SASRecConfig(hidden=16, layers=2, heads=2, max_len=6)).eval()
    a = torch.tensor([[1, 2, 3, 4, 5, 6]])
    b = torch.tensor([[1, 2, 3, 9, 10, 6]])  # positions 3 and 4 changed
    ha, hb = model(a), model(b)
    torch.testing.assert_close(ha[:, :3], hb[:, :3])  # earlier positions untouched
    assert not torch.allclose(ha[:, 3], hb[:, 3])  # the changed position does move


def test_sasrec_rank_respects_exclude_and_padding() -> None:
    torch.manual_seed(0)
    model = SASRec(5, SASRecConfig(hidden=8, layers=1, heads=1, max_len=4)).eval()
    hist = [[0, 1], [2, 3, 4, 0, 1]]  # the second is longer than max_len: its last 4 are read
    exclude = np.zeros((2, 5), dtype=bool)
    exclude[0, [1, 2, 3]] = True  # row 0 may only get items 0 and 4
    ranked = sasrec_rank(model, hist, k=3, exclude=exclude)
    assert set(ranked[0, :2]) == {0, 4} and ranked[0, 2] == EMPTY
    assert sorted(ranked[1]) == sorted(set(ranked[1])) and EMPTY not in ranked[1]
    # Scores for row 1 equal those of its truncated history scored alone.
    np.testing.assert_array_equal(ranked[1], sasrec_rank(model, [[3, 4, 0, 1]], k=3)[0])
    # Batch composition (padding of a shorter row) does not change a row's ranking.
    np.testing.assert_array_equal(ranked[0, :2], sasrec_rank(model, [[0, 1]], k=5, exclude=exclude[:1])[0, :2])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"hidden": 10, "heads": 3}, "divisible"), ({"loss": "mse"}, "loss"), ({"dropout": 1.0}, "dropout"),
     ({"patience": 0}, "patience")],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SASRecConfig(**kwargs)


def test_sasrec_rank_bad_input() -> None:
    model = SASRec(5, SASRecConfig(hidden=8, layers=1, heads=1, max_len=4))
    with pytest.raises(ValueError, match="history 1 is empty"):
        sasrec_rank(model, [[0], []], k=2)
    with pytest.raises(ValueError, match="exclude must be"):
        sasrec_rank(model, [[0]], k=2, exclude=np.zeros((1, 4), dtype=bool))
    with pytest.raises(ValueError, match="outside"):
        sasrec_rank(model, [[7]], k=2)
    with pytest.raises(ValueError, match="outside"):
        train_sasrec([[0, 1, 2, 9]], 5, SASRecConfig(epochs=1), log=lambda _: None)


def test_training_windows_by_hand() -> None:
    # train part of [5, 6, 7, 8, 1, 2] is [5, 6, 7, 8] (the last two are valid and test targets)
    seqs = [[5, 6, 7, 8, 1, 2], [3, 4, 9]]  # the second's train part [3] is too short to train on
    assert training_windows(seqs, 2, "prefixes") == [[5, 6], [5, 6, 7], [6, 7, 8]]
    assert training_windows(seqs, 2, "windows") == [[6, 7, 8]]


def test_recipe_names_what_differs_from_recbole() -> None:
    assert SASRecConfig(seed=3).recipe() == "RecBole 1.2.1 SASRec settings (CE)"
    assert SASRecConfig(epochs=30, norm="pre").recipe() == "in-house recipe, not RecBole-grade: epochs=30, norm=pre"
