"""Semantic IDs from RQ-VAE codes: collision suffix, code statistics, persistence.

A SID is the item's `L` RQ-VAE codes plus one suffix code, for every item: fixed length
`L + 1` keeps the SID vocabulary and the decoding trie uniform (digr/rec/seqmodel.py). The
suffix is 0 for an item whose L-tuple is unique, so the trie forces it for those items,
and 0, 1, 2, ... (in item_idx order) among items sharing an L-tuple (TIGER, Rajput et al. 2023).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import torch


def _check_codes(codes: np.ndarray, name: str = "codes") -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty (N, L) array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{name} must be integer, got dtype {codes.dtype}")
    if (codes < 0).any():
        raise ValueError(f"{name} must be >= 0")
    return codes


def _groups(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """codes: (N, L) -> (group id per item (N,), group sizes (G,)) over identical rows."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def add_collision_suffix(codes: np.ndarray) -> np.ndarray:
    """codes: (N, L) int -> sids: (N, L + 1) int64, the last column the collision suffix.

    E.g. rows [[1,2],[3,4],[1,2]] -> [[1,2,0],[3,4,0],[1,2,1]]: item 0 keeps suffix 0,
    item 2 (later item_idx, same tuple) gets 1. Every output row is unique.
    """
    codes = _check_codes(codes)
    inverse, counts = _groups(codes)
    order = np.argsort(inverse, kind="stable")  # grouped, item_idx order within a group
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    suffix = np.empty(len(codes), dtype=np.int64)
    suffix[order] = np.arange(len(codes)) - starts[inverse[order]]
    return np.concatenate([codes.astype(np.int64), suffix[:, None]], axis=1)


def prefix_labels(sids: np.ndarray) -> tuple[np.ndarray, int]:
    """sids: (N, L + 1) codes + suffix -> (labels (N, L + 1) int64, codebook_size): every RQ
    level after the first relabelled so that its code names the whole prefix, not a residual.

    Level 0 and the suffix keep their codes. At level l >= 1 an item's label is the rank of its
    prefix (codes 0..l) among the distinct prefixes of that length, so two items share a level-l
    token only if they share the prefix: the tree (and hence the trie) is unchanged, but no
    token stands for unrelated items under different parents any more, and a rarely-seen
    item's deep tokens are its own. codebook_size = the largest label + 1 over the RQ levels
    (at least level 0's largest code + 1): every level gets that many token slots.

    E.g. [[1,2,0],[3,2,0],[1,2,1]] -> [[1,0,0],[3,1,0],[1,0,1]], codebook_size 4: code 2
    under parents 1 and 3 becomes labels 0 and 1.
    """
    sids = _check_codes(sids, "sids")
    if sids.shape[1] < 2:
        raise ValueError(f"sids must be (N, levels + 1) with the suffix last, got shape {sids.shape}")
    out = sids.astype(np.int64).copy()
    for level in range(1, sids.shape[1] - 1):
        out[:, level] = _groups(sids[:, : level + 1])[0]  # group ids number the prefixes in sorted order
    return out, int(out[:, :-1].max()) + 1


def collision_rate(codes: np.ndarray) -> float:
    """Fraction of items whose L-tuple (before the suffix) is shared with another item."""
    inverse, counts = _groups(_check_codes(codes))
    return float((counts[inverse] > 1).mean())


def codebook_usage(codes: np.ndarray, codebook_size: int) -> list[float]:
    """Per level, the fraction of the `codebook_size` codes that at least one item uses."""
    codes = _check_codes(codes)
    if codebook_size < 1 or codes.max() >= codebook_size:
        raise ValueError(f"codes must lie in [0, codebook_size={codebook_size}), max is {codes.max()}")
    return [len(np.unique(codes[:, lv])) / codebook_size for lv in range(codes.shape[1])]


def sid_table(sids: np.ndarray) -> pa.Table:
    """sids: (N, L + 1) -> Table(item_idx int32, sid list<int32>), row i = item_idx i."""
    sids = _check_codes(sids, "sids")
    if sids.max() > np.iinfo(np.int32).max:
        raise ValueError("sids do not fit in int32")
    n, width = sids.shape
    offsets = pa.array(np.arange(0, n * width + 1, width, dtype=np.int32))
    values = pa.array(sids.reshape(-1).astype(np.int32))
    return pa.table(
        {
            "item_idx": pa.array(np.arange(n, dtype=np.int32)),
            "sid": pa.ListArray.from_arrays(offsets, values),
        }
    )


def sids_from_table(table: pa.Table) -> np.ndarray:
    """Inverse of `sid_table`: -> (N, L + 1) int64, rows ordered by item_idx."""
    missing = {"item_idx", "sid"} - set(table.column_names)
    if missing:
        raise ValueError(f"SID table lacks columns {sorted(missing)}")
    item_idx = table.column("item_idx").to_numpy()
    if not np.array_equal(np.sort(item_idx), np.arange(len(item_idx))):
        raise ValueError("SID table item_idx must be exactly 0..N-1")
    sid = table.column("sid").combine_chunks()
    lengths = sid.value_lengths().to_numpy(zero_copy_only=False)
    if len(lengths) and (lengths != lengths[0]).any():
        raise ValueError("SID table rows have different lengths; SIDs must be fixed length")
    width = int(lengths[0]) if len(lengths) else 0
    flat = sid.flatten().to_numpy().astype(np.int64).reshape(len(item_idx), width)
    out = np.empty_like(flat)
    out[item_idx] = flat
    return out


def codebook_version(model_state: dict, sids: np.ndarray) -> str:
    """12-hex-char sha256 over the codebook tensors (state-dict keys containing "codebook",
    sorted) and the SIDs: names the SID space an SFT checkpoint was trained against."""
    keys = sorted(k for k in model_state if "codebook" in k)
    if not keys:
        raise ValueError("model_state has no codebook tensors (no key contains 'codebook')")
    h = hashlib.sha256()
    for k in keys:
        t = model_state[k]
        arr = t.detach().cpu().to(torch.float32).contiguous().numpy() if torch.is_tensor(t) else np.asarray(t, np.float32)
        h.update(k.encode())
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    s = np.ascontiguousarray(_check_codes(sids, "sids"), dtype="<i8")
    h.update(str(s.shape).encode())
    h.update(s.tobytes())
    return h.hexdigest()[:12]
