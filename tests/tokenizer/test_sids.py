"""SID assignment, statistics and persistence (digr/tokenizer/sids.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from digr.tokenizer.sids import (
    add_collision_suffix,
    codebook_usage,
    codebook_version,
    collision_rate,
    prefix_labels,
    sid_table,
    sids_from_table,
)

# Items 0, 2, 3 share (1,2); items 1 and 4 are unique.
CODES = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [5, 5]])


def test_collision_suffix_numbers_shared_tuples_in_item_order():
    sids = add_collision_suffix(CODES)
    assert sids.dtype == np.int64 and sids.shape == (5, 3)
    # Suffix: unique tuples get 0; the (1,2) group gets 0,1,2 in item_idx order (0, 2, 3).
    assert sids[:, -1].tolist() == [0, 0, 1, 2, 0]
    np.testing.assert_array_equal(sids[:, :2], CODES)
    assert len(np.unique(sids, axis=0)) == 5


def test_collision_suffix_all_unique_is_all_zero():
    assert add_collision_suffix(np.array([[0, 1], [1, 0]]))[:, -1].tolist() == [0, 0]


def test_collision_rate():
    # 3 of the 5 items share their tuple.
    assert collision_rate(CODES) == pytest.approx(0.6)
    assert collision_rate(np.array([[0], [1], [2]])) == 0.0


def test_codebook_usage():
    # Level 0 uses {1,3,5} of 8 codes = 0.375; level 1 uses {2,4,5} = 0.375.
    assert codebook_usage(CODES, 8) == pytest.approx([0.375, 0.375])
    # Level 0 uses {0,3} of 4 = 0.5; level 1 uses {1} = 0.25.
    assert codebook_usage(np.array([[0, 1], [3, 1], [0, 1]]), 4) == pytest.approx([0.5, 0.25])
    with pytest.raises(ValueError, match="codebook_size=4"):
        codebook_usage(np.array([[4, 0]]), 4)


@pytest.mark.parametrize(
    "bad, match",
    [(np.array([1, 2]), r"\(N, L\)"), (np.array([[0.5, 1.0]]), "integer"), (np.array([[-1, 0]]), ">= 0")],
)
def test_bad_codes_raise(bad: np.ndarray, match: str):
    with pytest.raises(ValueError, match=match):
        add_collision_suffix(bad)


def test_sid_table_round_trip():
    sids = add_collision_suffix(CODES)
    table = sid_table(sids)
    assert table.schema.field("item_idx").type == pa.int32()
    assert table.schema.field("sid").type == pa.list_(pa.int32())
    assert table["item_idx"].to_pylist() == [0, 1, 2, 3, 4]
    assert table["sid"].to_pylist()[2] == [1, 2, 1]
    # Row order in the file must not matter.
    shuffled = table.take([3, 0, 4, 1, 2])
    np.testing.assert_array_equal(sids_from_table(shuffled), sids)
    with pytest.raises(ValueError, match="columns"):
        sids_from_table(table.drop_columns(["sid"]))


def test_codebook_version_stable_and_sensitive():
    state = {"codebooks": torch.arange(12, dtype=torch.float32).reshape(2, 3, 2), "encoder.0.weight": torch.ones(2)}
    sids = add_collision_suffix(CODES)
    v = codebook_version(state, sids)
    assert len(v) == 12 and int(v, 16) >= 0
    assert codebook_version({k: t.clone() for k, t in state.items()}, sids.copy()) == v
    # Non-codebook weights do not enter the hash; codebooks and SIDs do.
    assert codebook_version({**state, "encoder.0.weight": torch.zeros(2)}, sids) == v
    assert codebook_version({**state, "codebooks": state["codebooks"] + 1}, sids) != v
    other = sids.copy()
    other[0, 0] = 9
    assert codebook_version(state, other) != v
    with pytest.raises(ValueError, match="codebook"):
        codebook_version({"encoder.0.weight": torch.ones(2)}, sids)


def test_prefix_labels_name_the_prefix_not_the_residual():
    # Code 2 at level 1 sits under parents 1 and 3: two different prefixes, so two labels.
    labels, size = prefix_labels(np.array([[1, 2, 0], [3, 2, 0], [1, 2, 1]]))
    assert labels.tolist() == [[1, 0, 0], [3, 1, 0], [1, 0, 1]] and size == 4  # level 0 keeps code 3
    # Three RQ levels: level 2's labels rank the distinct (c0, c1, c2) prefixes:
    # (0,0,5) < (0,1,5) < (2,0,5), so items get 0, 1, 2 at level 2 even though all share code 5.
    sids = np.array([[0, 0, 5, 0], [0, 1, 5, 0], [2, 0, 5, 0], [0, 0, 5, 1]])
    labels, size = prefix_labels(sids)
    assert labels.tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [2, 2, 2, 0], [0, 0, 0, 1]] and size == 3


def test_prefix_labels_keep_the_tree():
    """Two items share a length-k labelled prefix exactly when they share the length-k code prefix."""
    codes = np.random.default_rng(0).integers(0, 4, size=(300, 3))
    sids = add_collision_suffix(codes)
    labels, size = prefix_labels(sids)
    assert size == labels[:, :3].max() + 1 and labels[:, -1].tolist() == sids[:, -1].tolist()
    for k in range(1, 5):
        same_codes = (sids[:, None, :k] == sids[None, :, :k]).all(-1)
        same_labels = (labels[:, None, :k] == labels[None, :, :k]).all(-1)
        np.testing.assert_array_equal(same_codes, same_labels)
    with pytest.raises(ValueError, match="suffix last"):
        prefix_labels(np.array([[1], [2]]))
    with pytest.raises(ValueError, match=">= 0"):
        prefix_labels(np.array([[1, -1, 0]]))
