"""Synthetic Amazon-shaped data for scale checks: items with title, description, categories and
brand, and power-law user sequences, sized by items/users, seeded, written in the formats
ingest reads (inter-json; Amazon 2023 JSONL).

The model (all numpy, vectorised across users; one loop step per sequence position):
- every item belongs to one leaf category (24 top categories x 8 leaves), drawn Zipf-like, and
  has a brand from its leaf's 16 brands; its title and description are built from the leaf's
  own words, so text carries the category;
- item popularity is Zipf (weight ~ rank^-zipf over a random order of the catalogue);
- a user's length is min_length + a geometric tail with mean `mean_length`; the first item is
  drawn by popularity, and each next one, with probability `stay`, from the previous item's
  leaf (by popularity within it), else from the whole catalogue: sequences have structure a
  recommender can learn (the leaf of the next item), and a long tail.

Pure core: `generate` -> `SynthData` (numpy arrays + item text); writers `write_inter_json` and
`write_amazon_2023`. `jobs/synth.py` is the command line.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOP_CATEGORIES = 24
LEAVES_PER_TOP = 8
BRANDS_PER_LEAF = 16
WORDS_PER_LEAF = 12
BASE_TIME_MS = 1_500_000_000_000  # 2017-07-14, Amazon 2023 timestamps are in ms


@dataclass(frozen=True)
class SynthConfig:
    items: int = 10_000
    users: int = 5_000
    mean_length: float = 10.0   # interactions per user (>= min_length)
    min_length: int = 5         # as a 5-core dump guarantees per user
    zipf: float = 1.0           # popularity exponent
    stay: float = 0.6           # P(next item from the previous item's leaf category)
    seed: int = 0
    name: str = "Synth"

    def __post_init__(self) -> None:
        if self.items < 10 or self.users < 1:
            raise ValueError(f"synth: need items >= 10 and users >= 1, got items={self.items}, users={self.users}")
        if self.min_length < 2 or self.mean_length < self.min_length:
            raise ValueError(f"synth: need 2 <= min_length <= mean_length, got {self.min_length}, {self.mean_length}")
        if not 0 <= self.stay <= 1 or self.zipf < 0:
            raise ValueError(f"synth: stay must be in [0, 1] and zipf >= 0, got {self.stay}, {self.zipf}")


@dataclass(frozen=True)
class SynthData:
    """leaf: (N,) int leaf category per item; brand: (N,) int; offsets: (U + 1,) int64 into
    seq_items (U users' sequences back to back, oldest first); seq_time: (I,) int64 ms."""

    cfg: SynthConfig
    leaf: np.ndarray
    brand: np.ndarray
    popularity: np.ndarray
    offsets: np.ndarray
    seq_items: np.ndarray
    seq_time: np.ndarray
    words: list[list[str]]
    leaf_names: list[str]
    top_names: list[str]
    brand_names: list[str]

    def item_id(self, i: int) -> str:
        return f"S{i:08d}"

    def user_id(self, u: int) -> str:
        return f"U{u:08d}"

    def item_record(self, i: int) -> dict:
        """Amazon-like metadata of item i (title, description, brand, categories)."""
        leaf = int(self.leaf[i])
        w = self.words[leaf]
        h = (i * 2654435761) % 2**32  # a cheap, deterministic per-item mix of the leaf's words
        pick = [w[(h >> s) % len(w)] for s in (0, 5, 10, 15, 20)]
        brand = self.brand_names[int(self.brand[i])]
        return {
            "title": f"{brand} {pick[0]} {pick[1]} {self.leaf_names[leaf].split()[-1]} {h % 1000:03d}",
            "description": f"{pick[2].capitalize()} {pick[3]} for {pick[4]} use. Model {h % 100000:05d} by {brand}.",
            "brand": brand,
            "categories": [self.top_names[leaf // LEAVES_PER_TOP], self.leaf_names[leaf]],
        }


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = rng.choice(np.array(["ka", "lo", "mi", "ne", "ru", "ta", "vo", "xi", "pe", "sa", "do", "gu", "fi", "ze"]),
                       syllables)
    return "".join(parts)


def generate(cfg: SynthConfig) -> SynthData:
    """Items and sequences for `cfg` (deterministic in cfg.seed)."""
    rng = np.random.default_rng(cfg.seed)
    n_leaves = TOP_CATEGORIES * LEAVES_PER_TOP
    top_names = [f"{_word(rng, 3).capitalize()} Supplies" for _ in range(TOP_CATEGORIES)]
    leaf_names = [f"{top_names[t // LEAVES_PER_TOP].split()[0]} {_word(rng, 2).capitalize()}s" for t in range(n_leaves)]
    words = [[_word(rng, 2 + k % 2) for k in range(WORDS_PER_LEAF)] for _ in range(n_leaves)]
    brand_names = [_word(rng, 3).capitalize() for _ in range(n_leaves * BRANDS_PER_LEAF)]

    leaf_weight = 1.0 / np.arange(1, n_leaves + 1) ** 0.7
    leaf = rng.choice(n_leaves, cfg.items, p=leaf_weight / leaf_weight.sum())
    brand = leaf * BRANDS_PER_LEAF + rng.integers(0, BRANDS_PER_LEAF, cfg.items)
    popularity = np.empty(cfg.items)
    popularity[rng.permutation(cfg.items)] = 1.0 / np.arange(1, cfg.items + 1) ** cfg.zipf

    # Popularity-weighted draws, globally and within a leaf, by inverse CDF over the items
    # sorted by leaf: a leaf is one contiguous segment of the cumulative weights.
    by_leaf = np.argsort(leaf, kind="stable")
    cum = np.cumsum(popularity[by_leaf])
    start = np.searchsorted(leaf[by_leaf], np.arange(n_leaves), side="left")
    end = np.searchsorted(leaf[by_leaf], np.arange(n_leaves), side="right")
    lo = np.where(start > 0, cum[np.maximum(start - 1, 0)], 0.0)
    hi = np.where(end > 0, cum[np.maximum(end - 1, 0)], 0.0)

    def draw_global(n: int) -> np.ndarray:
        return by_leaf[np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), cfg.items - 1)]

    def draw_in_leaf(leaves: np.ndarray) -> np.ndarray:
        x = lo[leaves] + rng.random(len(leaves)) * (hi[leaves] - lo[leaves])
        return by_leaf[np.minimum(np.searchsorted(cum, x, side="right"), end[leaves] - 1)]

    extra = cfg.mean_length - cfg.min_length
    tail = rng.geometric(1.0 / (extra + 1.0), cfg.users) - 1 if extra > 0 else np.zeros(cfg.users, dtype=np.int64)
    lengths = (cfg.min_length + tail).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    seq_items = np.empty(offsets[-1], dtype=np.int64)
    seq_items[offsets[:-1]] = draw_global(cfg.users)
    for pos in range(1, int(lengths.max())):
        users = np.flatnonzero(lengths > pos)  # the users whose sequence reaches this position
        at = offsets[users] + pos
        prev = seq_items[at - 1]
        stay = rng.random(len(users)) < cfg.stay
        nxt = draw_global(len(users))
        nxt[stay] = draw_in_leaf(leaf[prev[stay]])
        seq_items[at] = nxt
    gaps = rng.exponential(86_400_000.0, offsets[-1]).astype(np.int64) + 1  # ~ a day apart, increasing
    starts = np.repeat(rng.integers(0, 365 * 86_400_000, cfg.users), lengths)
    seq_time = BASE_TIME_MS + starts + _segment_cumsum(gaps, offsets)
    return SynthData(cfg, leaf, brand, popularity, offsets, seq_items, seq_time, words, leaf_names, top_names,
                     brand_names)


def _segment_cumsum(x: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Cumulative sum restarting at every offset: (I,) -> (I,)."""
    total = np.cumsum(x)
    before = np.where(offsets[:-1] > 0, total[np.maximum(offsets[:-1] - 1, 0)], 0)
    return total - np.repeat(before, np.diff(offsets))


def write_inter_json(data: SynthData, folder: Path) -> list[Path]:
    """<folder>/<name>.inter.json ({user: [item, ...]}) and <name>.item.json ({item: meta})."""
    folder.mkdir(parents=True, exist_ok=True)
    name = data.cfg.name
    inter, items = folder / f"{name}.inter.json", folder / f"{name}.item.json"
    with open(inter, "w") as f:
        f.write("{")
        for u in range(len(data.offsets) - 1):
            seq = data.seq_items[data.offsets[u]:data.offsets[u + 1]]
            f.write(("," if u else "") + json.dumps(data.user_id(u)) + ":" + json.dumps([data.item_id(int(i)) for i in seq]))
        f.write("}")
    with open(items, "w") as f:
        f.write("{")
        for i in range(data.cfg.items):
            f.write(("," if i else "") + json.dumps(data.item_id(i)) + ":" + json.dumps(data.item_record(i)))
        f.write("}")
    return [inter, items]


def write_amazon_2023(data: SynthData, folder: Path, compress: bool = False) -> list[Path]:
    """<folder>/<name>.jsonl(.gz) reviews (user_id, parent_asin, rating, timestamp ms) and
    meta_<name>.jsonl(.gz) (parent_asin, title, description [list], store, categories)."""
    folder.mkdir(parents=True, exist_ok=True)
    name, ext = data.cfg.name, ".jsonl.gz" if compress else ".jsonl"
    opener = (lambda p: gzip.open(p, "wt", compresslevel=1)) if compress else (lambda p: open(p, "w"))
    reviews, meta = folder / f"{name}{ext}", folder / f"meta_{name}{ext}"
    rating = np.random.default_rng(data.cfg.seed + 1).integers(1, 6, len(data.seq_items))
    user_of = np.repeat(np.arange(len(data.offsets) - 1), np.diff(data.offsets))
    with opener(reviews) as f:
        for k in range(len(data.seq_items)):
            f.write(json.dumps({"user_id": data.user_id(int(user_of[k])), "parent_asin": data.item_id(int(data.seq_items[k])),
                                "rating": float(rating[k]), "timestamp": int(data.seq_time[k])}) + "\n")
    with opener(meta) as f:
        for i in range(data.cfg.items):
            r = data.item_record(i)
            f.write(json.dumps({"parent_asin": data.item_id(i), "title": r["title"], "description": [r["description"]],
                                "store": r["brand"], "categories": r["categories"]}) + "\n")
    return [reviews, meta]
