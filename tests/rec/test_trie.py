"""SidTrie on a hand-made 5-item codebook (3 levels of 4 codes + a 2-code suffix)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digr.rec.seqmodel import SidVocab
from digr.rec.trie import SidTrie

VOCAB = SidVocab(levels=3, codebook_size=4, suffix_size=2)
# Items 0 and 1 share the 3-tuple (0, 1, 2); the suffix code tells them apart.
CODES = np.array(
    [
        [0, 1, 2, 0],  # item 0
        [0, 1, 2, 1],  # item 1 (collides with item 0)
        [0, 3, 0, 0],  # item 2
        [2, 0, 1, 0],  # item 3
        [2, 0, 3, 0],  # item 4
    ]
)
# Node ids number the distinct prefixes of each length in sorted order:
#   level 1: (0,)=0 (2,)=1;  level 2: (0,1)=0 (0,3)=1 (2,0)=2;
#   level 3: (0,1,2)=0 (0,3,0)=1 (2,0,1)=2 (2,0,3)=3;  suffix level: leaves = item index.
EXPECTED = [
    [[0, -1, 1, -1]],  # root: code 0 -> node 0, code 2 -> node 1
    [[-1, 0, -1, 1], [2, -1, -1, -1]],  # (0,): 1 -> (0,1), 3 -> (0,3); (2,): 0 -> (2,0)
    [[-1, -1, 0, -1], [1, -1, -1, -1], [-1, 2, -1, 3]],  # (0,1): 2; (0,3): 0; (2,0): 1 and 3
    [[0, 1], [2, -1], [3, -1], [4, -1]],  # suffix codes -> items
]


@pytest.fixture(scope="module")
def trie() -> SidTrie:
    return SidTrie.from_codes(CODES, VOCAB)


def test_tables_match_hand_built(trie: SidTrie) -> None:
    assert len(trie.children) == VOCAB.sid_len
    for level, expected in enumerate(EXPECTED):
        assert trie.children[level].tolist() == expected, f"level {level}"
    assert trie.num_items == 5


def test_allowed(trie: SidTrie) -> None:
    assert trie.allowed(0, torch.tensor([0])).tolist() == [[True, False, True, False]]
    # node 2 at level 2 is the prefix (2, 0): codes 1 and 3; a dead beam (-1) allows nothing
    got = trie.allowed(2, torch.tensor([2, 0, -1]))
    assert got.tolist() == [[False, True, False, True], [False, False, True, False], [False] * 4]
    # suffix level: (0, 1, 2) has two items, (0, 3, 0) one
    assert trie.allowed(3, torch.tensor([0, 1])).tolist() == [[True, True], [True, False]]


def test_step(trie: SidTrie) -> None:
    # root --0--> node 0, root --2--> node 1, root --1--> nothing
    assert trie.step(0, torch.tensor([0, 0, 0]), torch.tensor([0, 2, 1])).tolist() == [0, 1, -1]
    # (2, 0) --3--> node 3; a dead beam stays dead even with a code that exists elsewhere
    assert trie.step(2, torch.tensor([2, -1]), torch.tensor([3, 1])).tolist() == [3, -1]
    # last level yields item indices: (0,1,2)+0 -> item 0, (0,1,2)+1 -> item 1, (0,3,0)+1 -> none
    assert trie.step(3, torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1])).tolist() == [0, 1, -1]


def test_lookup(trie: SidTrie) -> None:
    assert trie.lookup(torch.as_tensor(CODES)).tolist() == [0, 1, 2, 3, 4]
    # (2, 0, 1, 1): valid prefix, unused suffix; (1, 0, 0, 0): no item starts with code 1
    assert trie.lookup(torch.tensor([[2, 0, 1, 1], [1, 0, 0, 0]])).tolist() == [-1, -1]


def test_duplicate_sids_raise_naming_items() -> None:
    codes = np.concatenate([CODES, CODES[[3]]])  # item 5 repeats item 3's SID
    with pytest.raises(ValueError, match=r"duplicate SID \[2, 0, 1, 0\] for items \[3, 5\]"):
        SidTrie.from_codes(codes, VOCAB)


@pytest.mark.parametrize(
    ("item", "level", "value", "message"),
    [(2, 1, 4, r"item 2: code 4 at level 1 is outside \[0, 4\)"), (4, 3, 2, r"item 4: code 2 at level 3 .*\[0, 2\)")],
)
def test_out_of_range_codes_raise_naming_item(item: int, level: int, value: int, message: str) -> None:
    codes = CODES.copy()
    codes[item, level] = value
    with pytest.raises(ValueError, match=message):
        SidTrie.from_codes(codes, VOCAB)


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="sid_len=4"):
        SidTrie.from_codes(CODES[:, :3], VOCAB)
    with pytest.raises(ValueError, match="empty"):
        SidTrie.from_codes(np.zeros((0, 4), dtype=np.int64), VOCAB)
    with pytest.raises(ValueError, match="integers"):
        SidTrie.from_codes(CODES.astype(np.float32), VOCAB)


def test_add_extends_without_renumbering_items(trie: SidTrie) -> None:
    # (2, 0, 1, 1) collides with item 3 on the 3-tuple; (3, 3, 3, 0) opens a new root branch.
    bigger = trie.add(torch.tensor([[2, 0, 1, 1], [3, 3, 3, 0]]))
    assert bigger.num_items == 7 and trie.num_items == 5  # the original is unchanged
    assert bigger.lookup(torch.as_tensor(CODES)).tolist() == [0, 1, 2, 3, 4]
    assert bigger.lookup(torch.tensor([[2, 0, 1, 1], [3, 3, 3, 0]])).tolist() == [5, 6]
    assert bigger.allowed(0, torch.tensor([0])).tolist() == [[True, False, True, True]]
    # O(batch): existing node ids stay, new prefixes take the next ids of their level.
    # (3,) is level-1 node 2, (3, 3) level-2 node 3, (3, 3, 3) level-3 node 4; (2, 0, 1) reuses node 2.
    assert bigger.num_nodes() == (1, 3, 4, 5) and bigger.parent() is trie and bigger.parent_nodes == (1, 2, 3, 4)
    assert bigger.children[0].tolist() == [[0, -1, 1, 2]]
    assert bigger.children[1].tolist() == EXPECTED[1] + [[-1, -1, -1, 3]]
    assert bigger.children[2].tolist() == EXPECTED[2] + [[-1, -1, -1, 4]]
    assert bigger.children[3].tolist() == [[0, 1], [2, -1], [3, 5], [4, -1], [6, -1]]
    assert trie.children[3].tolist() == EXPECTED[3]  # the parent's tables are untouched
    assert bigger.add(np.zeros((0, 4), np.int64)) is bigger
    with pytest.raises(ValueError, match=r"items \[0, 5\]"):
        trie.add(CODES[[0]])
    with pytest.raises(ValueError, match=r"items \[5, 6\]"):  # twice in one batch
        trie.add(np.array([[3, 3, 3, 0], [3, 3, 3, 0]]))
    with pytest.raises(ValueError, match="item 5: code 9 at level 0"):
        trie.add(np.array([[9, 0, 0, 0]]))


def test_save_load_round_trip(trie: SidTrie, tmp_path) -> None:
    path = str(tmp_path / "trie.npz")
    trie.save(path)
    for loaded in (SidTrie.load(path), SidTrie.from_bytes(trie.to_bytes())):
        assert loaded.vocab == VOCAB
        assert torch.equal(loaded.codes, trie.codes)
        for got, want in zip(loaded.children, trie.children, strict=True):
            assert torch.equal(got, want)


def test_a_large_catalogue_builds_like_the_sorted_definition() -> None:
    """The vectorised build against the definition (node ids = sorted distinct prefixes), and
    a grown trie answers every lookup as a trie rebuilt from all codes does."""
    vocab = SidVocab(levels=3, codebook_size=8, suffix_size=4)
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, [8, 8, 8, 4], size=(900, 4)), axis=0)
    codes = codes[rng.permutation(len(codes))]
    head, tail = codes[:700], codes[700:]
    trie = SidTrie.from_codes(head, vocab)
    for level in range(vocab.sid_len - 1):
        prefixes = sorted({tuple(r) for r in head[:, : level + 1].tolist()})
        parent = {p: i for i, p in enumerate(sorted({tuple(r) for r in head[:, :level].tolist()}))}
        for node, p in enumerate(prefixes):
            assert int(trie.children[level][parent[p[:-1]], p[-1]]) == node
    grown = trie.add(tail[:50]).add(tail[50:])
    rebuilt = SidTrie.from_codes(codes, vocab)
    assert grown.lookup(torch.as_tensor(codes)).tolist() == list(range(len(codes)))
    assert rebuilt.lookup(torch.as_tensor(codes)).tolist() == list(range(len(codes)))
    assert grown.num_nodes() == rebuilt.num_nodes()
