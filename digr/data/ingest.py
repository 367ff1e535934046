"""Ingest: a source dataset -> items, sequences, leave-last-out examples, quarantine.

Pure Python + pyarrow + numpy, no Ray; readers for each format live in `digr.data.formats`.
Steps: read (bad rows -> quarantine) -> drop interactions whose item has no usable
metadata ("unknown_item") -> iterative k-core (raw dumps and MovieLens only) -> optional
first-N-users slice -> order each user's interactions by (time, item) -> tables.

Tables (module constants below):

- `ITEMS_SCHEMA`: `item_idx` int32, dense 0..N-1 in numeric order of `item_id` when every
  id is an integer, else lexicographic; `item_id` string as in the source; `title` string
  (non-empty); `description` string ("" when absent); `brand` string; `categories` string
  (comma-joined); `image_url` string, null where the source has none (2014 `imUrl`, 2018
  `imageURLHighRes`/`imageURL`, 2023 `images[].hi_res`/`large`).
- `SEQUENCES_SCHEMA`: `user_id` string, `item_idx` list<int32>: the user's whole
  chronological sequence after filtering; users in source order (first appearance).
- `EXAMPLES_SCHEMA`: `user_id` string, `split` string ('train'|'valid'|'test'), `history`
  list<int32> (oldest first, the last `max_history` items before the target), `target`
  int32. For a sequence s of length n >= 3: train targets s[t] for 1 <= t <= n-3 with
  history s[:t], valid target s[n-2], test target s[n-1] (chronological leave-last-out).
  Users with n < 3 have no examples. Rows per user in target order.
- `QUARANTINE_SCHEMA`: `source` string (file path), `line` int64 nullable (1-based; null for
  whole-file JSON), `reason` string (malformed_json, malformed_literal, malformed_line,
  malformed_record, missing_field:<name>, bad_field:<name>, missing_title, unknown_item),
  `raw` string (the line or record, at most 500 characters; for unknown_item the
  interaction re-serialised as JSON).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from digr.data.formats import SOURCES, IngestError, Quarantine, read_source, resolve_files

__all__ = [
    "EXAMPLES_SCHEMA", "ITEMS_SCHEMA", "QUARANTINE_SCHEMA", "SEQUENCES_SCHEMA", "IngestConfig",
    "IngestError", "IngestResult", "examples_from_sequences", "ingest", "input_files",
    "item_order", "kcore_mask",
]

ITEMS_SCHEMA = pa.schema([
    pa.field("item_idx", pa.int32(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("title", pa.string(), nullable=False),
    pa.field("description", pa.string(), nullable=False),
    pa.field("brand", pa.string(), nullable=False),
    pa.field("categories", pa.string(), nullable=False),
    pa.field("image_url", pa.string(), nullable=True),
])
SEQUENCES_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_idx", pa.list_(pa.int32()), nullable=False),
])
EXAMPLES_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("history", pa.list_(pa.int32()), nullable=False),
    pa.field("target", pa.int32(), nullable=False),
])
QUARANTINE_SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("line", pa.int64(), nullable=True),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("raw", pa.string(), nullable=False),
])

_NEEDS_NAME = ("inter-json", "amazon-2014", "amazon-2018", "amazon-2023")


@dataclass(frozen=True)
class IngestConfig:
    source: str = "movielens-100k"  # one of formats.SOURCES
    path: str = ""  # folder of the source files; "" for movielens = the recbole package's copy
    name: str = ""  # file stem: "Scientific" (inter-json), "Industrial_and_Scientific" (amazon)
    max_history: int = 20  # histories keep the last N items
    # Iterative k-core on users and items. Not applied to inter-json: it is already 5-core
    # and must keep exactly the users and sequences the independent scorer reads.
    min_interactions: int = 5
    max_users: int = 0  # 0 = all; else the first N users (source order) after filtering

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"source: {self.source!r} is not one of {SOURCES}")
        if self.source != "movielens-100k" and not self.path:
            raise ValueError(f"path: required for source {self.source!r} (the folder of its files)")
        if self.source in _NEEDS_NAME and not self.name:
            raise ValueError(f"name: required for source {self.source!r} (the file-name stem)")
        for f, lo in (("max_history", 1), ("min_interactions", 1), ("max_users", 0)):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{f}: must be an integer >= {lo}, got {v!r}")


@dataclass
class IngestResult:
    items: pa.Table
    sequences: pa.Table
    examples: pa.Table
    quarantine: pa.Table
    stats: dict[str, int] = field(default_factory=dict)


def input_files(cfg: IngestConfig) -> list[str]:
    """The source files `ingest(cfg)` reads, for cache keys; IngestError if one is missing."""
    return [str(p) for p in resolve_files(cfg.source, cfg.path, cfg.name).values()]


# ----------------------------------------------------------------- pure core pieces


_INT = re.compile(r"-?[0-9]+")


def item_order(ids: Sequence[str]) -> list[int]:
    """Indices that sort `ids`: numerically when every id is an integer (so ids "0".."4343"
    keep their numbers as item_idx), else lexicographically."""
    if all(_INT.fullmatch(i) for i in ids):
        return sorted(range(len(ids)), key=lambda k: (int(ids[k]), ids[k]))
    return sorted(range(len(ids)), key=ids.__getitem__)


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int,
               keep: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Iterative k-core: drop interactions of users or items with fewer than k (kept)
    interactions until none is dropped (removing an item can push a user below k).

    users, items: (M,) int64 codes >= 0; keep: (M,) bool rows still in play (default all).
    Returns the (M,) bool mask of the k-core and the number of passes that removed rows.
    """
    keep = np.ones(len(users), bool) if keep is None else keep.copy()
    passes = 0
    while True:
        u_n = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        i_n = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        new = keep & (u_n[users] >= k) & (i_n[items] >= k)
        if new.sum() == keep.sum():
            return keep, passes
        keep, passes = new, passes + 1


def examples_from_sequences(sequences: pa.Table, max_history: int) -> pa.Table:
    """Leave-last-out examples (see EXAMPLES_SCHEMA) from a SEQUENCES_SCHEMA table.

    Vectorised: for sequence offsets o (U+1,) every target position t in 1..n-1 of a user
    with n >= 3 becomes one row with history values[max(o_u, o_u+t-H) : o_u+t].
    """
    if max_history < 1:
        raise ValueError(f"max_history: must be >= 1, got {max_history}")
    seqs = sequences.column("item_idx").combine_chunks()
    offsets = seqs.offsets.to_numpy().astype(np.int64)
    values = seqs.values.to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    users = np.flatnonzero(lengths >= 3)
    per_user = lengths[users] - 1  # targets t = 1..n-1
    row_user = np.repeat(users, per_user)  # (E,)
    t = np.arange(len(row_user)) - np.repeat(np.cumsum(per_user) - per_user, per_user) + 1
    n = lengths[row_user]
    split = np.where(t == n - 1, "test", np.where(t == n - 2, "valid", "train"))
    target_at = offsets[row_user] + t
    start = np.maximum(offsets[row_user], target_at - max_history)
    h_len = target_at - start
    h_off = np.concatenate([[0], np.cumsum(h_len)])
    h_idx = np.repeat(start - h_off[:-1], h_len) + np.arange(h_off[-1])
    history = pa.ListArray.from_arrays(pa.array(h_off, pa.int32()),
                                       pa.array(values[h_idx], pa.int32()))
    return pa.Table.from_arrays(
        [sequences.column("user_id").take(pa.array(row_user, pa.int64())),
         pa.array(split, pa.string()), history, pa.array(values[target_at], pa.int32())],
        schema=EXAMPLES_SCHEMA)


# ------------------------------------------------------------------------- pipeline


def ingest(cfg: IngestConfig) -> IngestResult:
    """Reads `cfg.source` and returns the four tables plus counts (see module docstring)."""
    files = resolve_files(cfg.source, cfg.path, cfg.name)
    q = Quarantine()
    raw = read_source(cfg.source, files, q)
    inter = raw.interactions
    users = np.array(inter.user, np.int64)
    items = np.array(inter.item, np.int64)
    times = np.array(inter.time, np.float64)
    user_names = list(inter.user_codes)
    item_names = list(inter.item_codes)

    known = np.array([i in raw.meta for i in item_names], bool)
    keep = known[items] if len(items) else np.zeros(0, bool)
    for r in np.flatnonzero(~keep):
        line = inter.line[r]
        q.add(raw.interactions_file, None if line < 0 else line, "unknown_item",
              json.dumps({"user": user_names[users[r]], "item": item_names[items[r]],
                          "time": times[r]}))
    passes = 0
    if cfg.source != "inter-json":
        keep, passes = kcore_mask(users, items, cfg.min_interactions, keep)
    if cfg.max_users:
        # Sliced after filtering, so a slice's sequences equal the full run's for those users.
        remaining = np.unique(users[keep])
        if len(remaining) > cfg.max_users:
            keep &= users <= remaining[cfg.max_users - 1]
    if not keep.any():
        raise IngestError(
            f"{', '.join(map(str, files.values()))}: no usable interactions remain "
            f"({len(inter)} read, {int(known[items].sum()) if len(items) else 0} with known items, "
            f"min_interactions={cfg.min_interactions}): lower ingest.min_interactions, or check that "
            "the interactions name items of the item file")

    kept_codes = np.unique(items[keep])
    kept_ids = [item_names[c] for c in kept_codes]
    order = item_order(kept_ids)
    idx_of_code = np.full(len(item_names), -1, np.int64)
    idx_of_code[kept_codes[order]] = np.arange(len(order))
    u, it, t = users[keep], idx_of_code[items[keep]], times[keep]
    perm = np.lexsort((it, t, u))  # by user (source order), then time, ties by item
    u, it = u[perm], it[perm]
    seq_users, starts = np.unique(u, return_index=True)
    offsets = np.append(starts, len(u)).astype(np.int32)
    sequences = pa.Table.from_arrays(
        [pa.array([user_names[c] for c in seq_users], pa.string()),
         pa.ListArray.from_arrays(pa.array(offsets), pa.array(it, pa.int32()))],
        schema=SEQUENCES_SCHEMA)

    metas = [raw.meta[kept_ids[k]] for k in order]
    items_tbl = pa.Table.from_pydict({
        "item_idx": np.arange(len(order), dtype=np.int32),
        "item_id": [kept_ids[k] for k in order],
        "title": [m.title for m in metas], "description": [m.description for m in metas],
        "brand": [m.brand for m in metas], "categories": [m.categories for m in metas],
        "image_url": [m.image_url for m in metas],
    }, schema=ITEMS_SCHEMA)
    examples = examples_from_sequences(sequences, cfg.max_history)
    quarantine = pa.Table.from_pydict({"source": q.source, "line": q.line, "reason": q.reason,
                                       "raw": q.raw}, schema=QUARANTINE_SCHEMA)

    split_counts = dict(zip(*np.unique(examples.column("split").to_numpy(zero_copy_only=False),
                                       return_counts=True)))
    stats = {
        "raw_interactions": len(inter), "interactions": int(len(u)),
        "users": len(seq_users), "items": len(order), "kcore_passes": passes,
        "users_without_examples": int((np.diff(offsets) < 3).sum()),
        **{f"{s}_examples": int(split_counts.get(s, 0)) for s in ("train", "valid", "test")},
        "quarantined": len(q), **{f"quarantined:{r}": c for r, c in sorted(q.counts().items())},
    }
    return IngestResult(items_tbl, sequences, examples, quarantine, stats)
