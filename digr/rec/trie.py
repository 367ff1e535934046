"""The prefix trie of valid Semantic IDs, stored as dense per-level lookup tables.

Constrained decoding (TIGER, Rajput et al. 2023) may only emit SIDs that belong to an
item. Each beam carries a node id; one level of the trie is a dense table

    children[l]: (n_nodes_l, level_size_l) int32,  children[l][node, code] = child node id
                 at level l + 1, or -1 when no item has that prefix,

and at the last (suffix) level the entry is the item index of the leaf instead of a node
id. A beam step is then one gather for the whole batch of beams, never a Python dict walk.

Built vectorised: each item's prefix of length l is one int64 key (mixed radix over the level
sizes), so the distinct prefixes are one 1-D `np.unique` per level (a 1M-item catalogue builds
in seconds). `add` is O(batch): new prefixes get the next node ids at the end of each table
(existing ids never move), and the grown trie remembers its parent and the parent's node
counts, so the decoder extends its per-node states for the new rows only
(`digr.rec.decode._cached_prefix_states`).

Size: level 0 has 1 node; level l has at most min(codebook_size ** l, N) nodes
(<= 256 at level 1, <= 65,536 at level 2 with 256 codes), and the suffix level has at
most N nodes. The tables therefore hold at most about N * codebook_size int32 entries
per level: ~1 MB per level for a 4,000-item catalogue, ~25 MB for 25,000 items.
"""

from __future__ import annotations

import io
import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from digr.rec.rows import append_rows
from digr.rec.seqmodel import SidVocab


def _check_codes(codes: np.ndarray, vocab: SidVocab, first_item: int = 0) -> None:
    """Raise naming the first item whose SID has the wrong length or an out-of-range code."""
    if codes.ndim != 2 or codes.shape[1] != vocab.sid_len:
        raise ValueError(f"codes must be (N, sid_len={vocab.sid_len}), got shape {tuple(codes.shape)}")
    for level in range(vocab.sid_len):
        col = codes[:, level]
        bad = np.flatnonzero((col < 0) | (col >= vocab.level_size(level)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"item {first_item + i}: code {int(col[i])} at level {level} is outside "
                f"[0, {vocab.level_size(level)}) (SID {codes[i].tolist()})"
            )


def _prefix_keys(codes: np.ndarray, vocab: SidVocab, length: int) -> np.ndarray:
    """(N,) int64: each row's first `length` codes as one mixed-radix number (lexicographic order)."""
    key = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(length):
        key = key * vocab.level_size(level) + codes[:, level]
    return key


def _check_unique(codes: np.ndarray, vocab: SidVocab, first_item: int = 0) -> None:
    """Raise naming two items that share a SID (the trie could return only one of them)."""
    key = _prefix_keys(codes, vocab, vocab.sid_len)
    order = np.argsort(key, kind="stable")
    same = np.flatnonzero(key[order][1:] == key[order][:-1])
    if same.size:
        a, b = sorted(int(i) for i in order[same[0]: same[0] + 2])
        raise ValueError(
            f"duplicate SID {codes[a].tolist()} for items {[first_item + a, first_item + b]}: "
            "every item needs a distinct SID (the tokenizer's suffix code separates collisions)"
        )


def _as_numpy(codes: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(codes, torch.Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
    return codes.astype(np.int64, copy=False)


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no truth value
class SidTrie:
    """Valid SIDs as dense per-level child tables (see the module docstring).

    vocab: the SID layout the codes follow.
    codes: (N, sid_len) int64, row i = the SID codes of item i (kept to rebuild, save, extend).
    children: sid_len tables; children[l] is (n_nodes_l, level_size_l) int32.
    """

    vocab: SidVocab
    codes: torch.Tensor
    children: list[torch.Tensor]
    # Set by `add`: the trie this one grew from (weak: a parent's tables are not kept alive)
    # and its node count per level; nodes below those counts are the parent's, unchanged.
    parent: weakref.ref | None = None
    parent_nodes: tuple[int, ...] = ()
    parent_items: int = 0

    @classmethod
    def from_codes(cls, codes: np.ndarray | torch.Tensor, vocab: SidVocab) -> SidTrie:
        """codes: (N, sid_len) integer codes, row = item index. Raises on bad or duplicate SIDs."""
        arr = _as_numpy(codes)
        _check_codes(arr, vocab)
        if arr.shape[0] == 0:
            raise ValueError("codes is empty: a trie needs at least one item")
        if math.prod(vocab.level_size(level) for level in range(vocab.sid_len)) >= 2**63:
            raise ValueError(f"{vocab} has more SIDs than an int64 prefix key can number")
        _check_unique(arr, vocab)
        n = arr.shape[0]
        children: list[torch.Tensor] = []
        # node id of each item's prefix of length `level`; the empty prefix is node 0.
        node = np.zeros(n, dtype=np.int64)
        n_nodes = 1
        for level in range(vocab.sid_len):
            table = np.full((n_nodes, vocab.level_size(level)), -1, dtype=np.int32)
            if level + 1 < vocab.sid_len:
                # Child ids number the distinct prefixes of length level + 1 (sorted order).
                keys, child = np.unique(_prefix_keys(arr, vocab, level + 1), return_inverse=True)
                child, n_next = child.reshape(-1), len(keys)
            else:
                child, n_next = np.arange(n), n  # leaves hold the item index
            table[node, arr[:, level]] = child
            children.append(torch.from_numpy(table))
            node, n_nodes = child, n_next
        return cls(vocab=vocab, codes=torch.from_numpy(arr.copy()), children=children)

    def num_nodes(self) -> tuple[int, ...]:
        """Nodes per level (rows of each table)."""
        return tuple(int(t.shape[0]) for t in self.children)

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def to(self, device: torch.device | str) -> SidTrie:
        """The same trie with its tables on `device` (move it once, not per decode call)."""
        return SidTrie(self.vocab, self.codes.to(device), [t.to(device) for t in self.children],
                       self.parent, self.parent_nodes, self.parent_items)

    def allowed(self, level: int, nodes: torch.Tensor) -> torch.Tensor:
        """nodes: (M,) int64 node ids at `level` (-1 = dead beam) -> (M, level_size) bool."""
        table = self.children[level]
        rows = table.index_select(0, nodes.clamp(min=0).to(torch.long))
        return (rows >= 0) & (nodes >= 0).unsqueeze(-1)

    def step(self, level: int, nodes: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """nodes, codes: (M,) int64 -> (M,) int64 child node ids at level + 1, or the item
        index at the last level; -1 where the prefix + code is not a valid SID prefix."""
        table = self.children[level]
        out = table[nodes.clamp(min=0).to(torch.long), codes.to(torch.long)].to(torch.long)
        return torch.where(nodes >= 0, out, torch.full_like(out, -1))

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (M, sid_len) int64 in-range codes -> (M,) item index, -1 for SIDs no item has."""
        nodes = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        for level in range(self.vocab.sid_len):
            nodes = self.step(level, nodes, codes[:, level])
        return nodes

    def add(self, codes: np.ndarray | torch.Tensor) -> SidTrie:
        """A new trie with `codes` (M, sid_len) appended as items N .. N + M - 1. O(M) walks plus
        one copy of each table (this trie stays valid and unchanged): existing node ids and item
        indices do not move, new prefixes get the next ids of their level. Raises on a bad code
        or a SID that an existing or another new item has."""
        new = _as_numpy(codes)
        n = self.num_items
        _check_codes(new, self.vocab, first_item=n)
        if new.shape[0] == 0:
            return self
        _check_unique(new, self.vocab, first_item=n)
        device = self.children[0].device
        tables = [t.cpu().numpy().copy() for t in self.children]
        node = np.zeros(new.shape[0], dtype=np.int64)
        last = self.vocab.sid_len - 1
        for level in range(self.vocab.sid_len):
            code = new[:, level]
            child = tables[level][node, code].astype(np.int64)
            if level == last:
                taken = np.flatnonzero(child >= 0)
                if taken.size:
                    m = int(taken[0])
                    raise ValueError(f"duplicate SID {new[m].tolist()} for items {[int(child[m]), n + m]}: "
                                     "every item needs a distinct SID (the tokenizer's suffix code separates collisions)")
                child = n + np.arange(new.shape[0])
                tables[level][node, code] = child
                break
            missing = child < 0
            if missing.any():  # new prefixes: numbered after the level's existing nodes
                pairs, inverse = np.unique(node[missing] * self.vocab.level_size(level) + code[missing],
                                           return_inverse=True)
                ids = tables[level + 1].shape[0] + np.arange(len(pairs))
                child[missing] = ids[inverse.reshape(-1)]
                tables[level][pairs // self.vocab.level_size(level), pairs % self.vocab.level_size(level)] = ids
                grow = np.full((len(pairs), tables[level + 1].shape[1]), -1, dtype=np.int32)
                tables[level + 1] = np.concatenate([tables[level + 1], grow])
            node = child
        return SidTrie(self.vocab, append_rows(self.codes, torch.from_numpy(new)),
                       [torch.from_numpy(t).to(device) for t in tables], parent=weakref.ref(self),
                       parent_nodes=self.num_nodes(), parent_items=n)

    # Persistence: only the codes and the vocabulary are stored; the tables are rebuilt
    # on load, so a file cannot hold tables that disagree with its codes.
    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(
            buf,
            codes=self.codes.cpu().numpy(),
            vocab=np.array([self.vocab.levels, self.vocab.codebook_size, self.vocab.suffix_size], dtype=np.int64),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SidTrie:
        with np.load(io.BytesIO(data)) as npz:
            levels, codebook_size, suffix_size = (int(v) for v in npz["vocab"])
            return cls.from_codes(npz["codes"], SidVocab(levels, codebook_size, suffix_size))

    def save(self, path: str) -> None:
        """Write an .npz file at a local path (s3 callers use to_bytes)."""
        with open(path, "wb") as f:
            f.write(self.to_bytes())

    @classmethod
    def load(cls, path: str) -> SidTrie:
        with open(path, "rb") as f:
            return cls.from_bytes(f.read())
