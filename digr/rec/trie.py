"""The prefix trie of valid Semantic IDs, stored as dense per-level lookup tables.

Constrained decoding (TIGER, Rajput et al. 2023) may only emit SIDs that belong to an
item. Each beam carries a node id; one level of the trie is a dense table

    children[l]: (n_nodes_l, level_size_l) int32,  children[l][node, code] = child node id
                 at level l + 1, or -1 when no item has that prefix,

and at the last (suffix) level the entry is the item index of the leaf instead of a node
id. A beam step is then one gather for the whole batch of beams, never a Python dict walk.

Size: level 0 has 1 node; level l has at most min(codebook_size ** l, N) nodes
(<= 256 at level 1, <= 65,536 at level 2 with 256 codes), and the suffix level has at
most N nodes. The tables therefore hold at most about N * codebook_size int32 entries
per level: ~1 MB per level for a 4,000-item catalogue, ~25 MB for 25,000 items.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch

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


def _check_unique(codes: np.ndarray) -> None:
    """Raise naming two items that share a SID (the trie could return only one of them)."""
    _, first, inverse, counts = np.unique(codes, axis=0, return_index=True, return_inverse=True, return_counts=True)
    dup = np.flatnonzero(counts > 1)
    if dup.size:
        group = dup[0]
        items = np.flatnonzero(inverse.reshape(-1) == group)
        raise ValueError(
            f"duplicate SID {codes[first[group]].tolist()} for items {items.tolist()}: "
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

    @classmethod
    def from_codes(cls, codes: np.ndarray | torch.Tensor, vocab: SidVocab) -> SidTrie:
        """codes: (N, sid_len) integer codes, row = item index. Raises on bad or duplicate SIDs."""
        arr = _as_numpy(codes)
        _check_codes(arr, vocab)
        if arr.shape[0] == 0:
            raise ValueError("codes is empty: a trie needs at least one item")
        _check_unique(arr)
        n = arr.shape[0]
        children: list[torch.Tensor] = []
        # node id of each item's prefix of length `level`; the empty prefix is node 0.
        node = np.zeros(n, dtype=np.int64)
        n_nodes = 1
        for level in range(vocab.sid_len):
            table = np.full((n_nodes, vocab.level_size(level)), -1, dtype=np.int32)
            if level + 1 < vocab.sid_len:
                # Child ids number the distinct prefixes of length level + 1 (sorted order).
                _, child = np.unique(arr[:, : level + 1], axis=0, return_inverse=True)
                child = child.reshape(-1)
                n_next = int(child.max()) + 1
            else:
                child, n_next = np.arange(n), n  # leaves hold the item index
            table[node, arr[:, level]] = child
            children.append(torch.from_numpy(table))
            node, n_nodes = child, n_next
        return cls(vocab=vocab, codes=torch.from_numpy(arr.copy()), children=children)

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    def to(self, device: torch.device | str) -> SidTrie:
        """The same trie with its tables on `device` (move it once, not per decode call)."""
        return SidTrie(self.vocab, self.codes.to(device), [t.to(device) for t in self.children])

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
        """A new trie with `codes` (M, sid_len) appended as items N .. N + M - 1.

        Rebuilt from all codes (milliseconds for tens of thousands of items), so node ids
        may change; item indices of the existing items do not.
        """
        new = _as_numpy(codes)
        _check_codes(new, self.vocab, first_item=self.num_items)
        return SidTrie.from_codes(np.concatenate([self.codes.cpu().numpy(), new], axis=0), self.vocab)

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
