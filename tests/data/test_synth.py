"""The synthetic generator: sizes, determinism, the structure it promises, and ingest reads it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from digr.data.ingest import IngestConfig, ingest
from digr.data.synth import SynthConfig, generate, write_amazon_2023, write_inter_json

CFG = SynthConfig(items=400, users=300, mean_length=8.0, seed=3)


def test_sizes_lengths_and_times() -> None:
    d = generate(CFG)
    lengths = np.diff(d.offsets)
    assert len(lengths) == 300 and lengths.min() >= CFG.min_length
    assert abs(lengths.mean() - 8.0) < 1.0  # the geometric tail's mean, within sampling noise
    assert d.seq_items.min() >= 0 and d.seq_items.max() < 400
    for u in range(300):  # strictly increasing times within each user
        assert (np.diff(d.seq_time[d.offsets[u]:d.offsets[u + 1]]) > 0).all()


def test_same_seed_same_data_other_seed_other_data() -> None:
    a, b, c = generate(CFG), generate(CFG), generate(SynthConfig(items=400, users=300, mean_length=8.0, seed=4))
    assert (a.seq_items == b.seq_items).all() and a.item_record(7) == b.item_record(7)
    assert not np.array_equal(a.seq_items[:50], c.seq_items[:50])


def test_next_items_stay_in_the_leaf_about_as_often_as_configured() -> None:
    d = generate(SynthConfig(items=2000, users=2000, mean_length=10.0, stay=0.6, seed=0))
    same = []
    for u in range(2000):
        s = d.seq_items[d.offsets[u]:d.offsets[u + 1]]
        same.append(d.leaf[s[1:]] == d.leaf[s[:-1]])
    rate = np.concatenate(same).mean()
    # stay = 0.6, plus the global draws that land in the same leaf by chance
    assert 0.6 <= rate <= 0.7, rate
    # popularity: the top 1% of items take a large share of interactions (a long tail)
    counts = np.bincount(d.seq_items, minlength=2000)
    assert np.sort(counts)[::-1][:20].sum() / counts.sum() > 0.15


def test_item_text_names_its_category_and_brand() -> None:
    d = generate(CFG)
    r = d.item_record(5)
    assert r["brand"] in r["title"] and r["categories"][1] == d.leaf_names[d.leaf[5]]
    assert r["categories"][1].split()[-1] in r["title"]


def test_both_formats_ingest_to_the_same_sequences(tmp_path) -> None:
    d = generate(CFG)
    write_inter_json(d, tmp_path / "ij")
    write_amazon_2023(d, tmp_path / "az", compress=True)
    a = ingest(IngestConfig(source="inter-json", path=str(tmp_path / "ij"), name="Synth"))
    b = ingest(IngestConfig(source="amazon-2023", path=str(tmp_path / "az"), name="Synth", min_interactions=1))
    ids_a = a.items.sort_by("item_idx")["item_id"].to_pylist()
    ids_b = b.items.sort_by("item_idx")["item_id"].to_pylist()
    seq_a = {u: [ids_a[i] for i in s] for u, s in zip(a.sequences["user_id"].to_pylist(),
                                                          a.sequences["item_idx"].to_pylist())}
    seq_b = {u: [ids_b[i] for i in s] for u, s in zip(b.sequences["user_id"].to_pylist(),
                                                          b.sequences["item_idx"].to_pylist())}
    assert seq_a == seq_b
    raw = json.loads((tmp_path / "ij" / "Synth.inter.json").read_text())
    assert seq_a == {u: s for u, s in raw.items() if u in seq_a} and len(seq_a) == len(raw)


def test_bad_sizes_name_the_setting() -> None:
    with pytest.raises(ValueError, match="items >= 10"):
        SynthConfig(items=3)
    with pytest.raises(ValueError, match="min_length"):
        SynthConfig(mean_length=2.0)
