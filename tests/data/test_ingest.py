"""Ingest core: splits, k-core, each source format, quarantine, errors, and the real data."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from digr.data import formats
from digr.data.ingest import (
    EXAMPLES_SCHEMA,
    ITEMS_SCHEMA,
    QUARANTINE_SCHEMA,
    SEQUENCES_SCHEMA,
    IngestConfig,
    IngestError,
    examples_from_sequences,
    ingest,
    input_files,
    item_order,
    kcore_mask,
)


def _write(path: Path, lines: list[str], gz: bool = False) -> Path:
    data = ("\n".join(lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def _seqs(r) -> dict[str, list[str]]:
    """user -> item ids, to compare sequences independently of item_idx numbering."""
    ids = r.items.column("item_id").to_pylist()
    return {row["user_id"]: [ids[i] for i in row["item_idx"]] for row in r.sequences.to_pylist()}


def _quarantined(r) -> set[tuple[str, int | None, str]]:
    return {(Path(x["source"]).name, x["line"], x["reason"]) for x in r.quarantine.to_pylist()}


# ------------------------------------------------------------------------ pure core


def test_examples_leave_last_out_by_hand():
    seqs = pa.Table.from_pydict({"user_id": ["u", "v"], "item_idx": [[10, 11, 12, 13, 14], [7, 8]]},
                                schema=SEQUENCES_SCHEMA)
    # s = [a,b,c,d,e] = [10..14]: train b <- [a], c <- [a,b]; valid d <- [a,b,c];
    # test e <- [a,b,c,d]. v has 2 items (< 3): no rows.
    rows = examples_from_sequences(seqs, max_history=20).to_pylist()
    assert [(r["user_id"], r["split"], r["history"], r["target"]) for r in rows] == [
        ("u", "train", [10], 11), ("u", "train", [10, 11], 12),
        ("u", "valid", [10, 11, 12], 13), ("u", "test", [10, 11, 12, 13], 14)]
    # max_history=2 keeps the last two items before each target: [10], [10,11], [11,12], [12,13].
    capped = examples_from_sequences(seqs, max_history=2)
    assert capped.schema == EXAMPLES_SCHEMA
    assert capped.column("history").to_pylist() == [[10], [10, 11], [11, 12], [12, 13]]
    with pytest.raises(ValueError, match="max_history"):
        examples_from_sequences(seqs, max_history=0)


def test_kcore_needs_several_passes():
    # k=2. rows: u0-A u0-B u1-A u1-B u2-B u2-C u3-C  (A=0, B=1, C=2)
    # pass 1: u3 has 1 row -> drop u3-C.   pass 2: C now has 1 row -> drop u2-C.
    # pass 3: u2 now has 1 row -> drop u2-B.   pass 4: B still has 2 rows: stable.
    users = np.array([0, 0, 1, 1, 2, 2, 3])
    items = np.array([0, 1, 0, 1, 1, 2, 2])
    mask, passes = kcore_mask(users, items, 2)
    assert mask.tolist() == [True, True, True, True, False, False, False]
    assert passes == 3
    # A pass-0 mask may exclude rows up front; they then count for nobody: here dropping
    # u0-A leaves A with 1 row, u0 with 1 row, and the cascade empties everything.
    pre = np.array([False, True, True, True, True, True, True])
    assert not kcore_mask(users, items, 2, pre)[0].any()


def test_item_order_numeric_only_when_all_integers():
    assert item_order(["10", "9", "100"]) == [1, 0, 2]  # 9 < 10 < 100
    assert item_order(["b10", "a", "9"]) == [2, 1, 0]  # "9" < "a" < "b10"
    assert item_order(["10", "9", "x"]) == [0, 1, 2]  # "10" < "9" < "x" as strings


@pytest.mark.parametrize("kwargs, field", [
    ({"source": "movielens-1m"}, "source"),
    ({"max_history": 0}, "max_history"),
    ({"min_interactions": 0}, "min_interactions"),
    ({"max_users": -1}, "max_users"),
    ({"source": "inter-json", "name": "Scientific"}, "path"),
    ({"source": "amazon-2018", "path": "/x"}, "name"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        IngestConfig(**kwargs)


# ---------------------------------------------------------------------- raw formats


def test_amazon_2014_python_literal_meta(tmp_path):
    _write(tmp_path / "reviews_Toys_5.json.gz", [
        json.dumps({"reviewerID": "u1", "asin": "A1", "unixReviewTime": 100}),
        json.dumps({"reviewerID": "u2", "asin": "B2", "unixReviewTime": 50}),
        json.dumps({"reviewerID": "u1", "asin": "B2", "unixReviewTime": 200}),
        json.dumps({"reviewerID": "u2", "asin": "A1", "unixReviewTime": 60}),
        json.dumps({"reviewerID": "u3", "asin": "A1", "unixReviewTime": 10}),
        json.dumps({"reviewerID": "u1", "asin": "C3", "unixReviewTime": 300}),
        json.dumps({"reviewerID": "u2", "asin": "C3", "unixReviewTime": 70}),
    ], gz=True)
    _write(tmp_path / "meta_Toys.json.gz", [
        "{'asin': 'A1', 'title': 'Alpha', 'description': \"it's red\", "
        "'categories': [['Toys', 'Cars'], ['Toys', 'Gifts']], 'imUrl': 'http://i/a.jpg'}",
        "{'asin': 'B2', 'title': 'Beta', 'brand': 'Acme'}",
        "{'asin': 'Z9'}",  # no title, but no review names it: not examined
        "{'asin': 'C3', 'title': 'Gamma'",  # unterminated literal
        "{'asin': 'C3', 'title': 'Gamma', 'categories': [['Toys']]}",
    ], gz=True)
    r = ingest(IngestConfig(source="amazon-2014", path=str(tmp_path), name="Toys",
                            min_interactions=2))
    # u3 has one review -> k-core drops it; A1 keeps 2 reviews. By time:
    # u1 = A1@100, B2@200, C3@300; u2 = B2@50, A1@60, C3@70.
    assert _seqs(r) == {"u1": ["A1", "B2", "C3"], "u2": ["B2", "A1", "C3"]}
    assert r.items.schema == ITEMS_SCHEMA
    a1 = r.items.to_pylist()[0]
    assert a1 == {"item_idx": 0, "item_id": "A1", "title": "Alpha", "description": "it's red",
                  "brand": "", "categories": "Toys,Cars,Gifts", "image_url": "http://i/a.jpg"}
    assert r.items.column("brand").to_pylist() == ["", "Acme", ""]
    assert _quarantined(r) == {("meta_Toys.json.gz", 4, "malformed_literal")}
    assert r.stats["kcore_passes"] == 1 and r.stats["raw_interactions"] == 7
    assert r.stats["interactions"] == 6 and r.stats["test_examples"] == 2


def test_amazon_2018_quarantine_and_time_ties(tmp_path):
    rev = [
        {"reviewerID": "u1", "asin": "B2", "unixReviewTime": 5},
        {"reviewerID": "u1", "asin": "A1", "unixReviewTime": 5},  # same time as B2: A1 first
        '{"reviewerID": "u1", ',  # line 3: malformed
        {"reviewerID": "u1", "asin": "C3", "unixReviewTime": 1},
        {"reviewerID": "u1", "asin": "X0", "unixReviewTime": 9},  # line 5: no metadata
        {"reviewerID": "u1", "asin": "D4", "unixReviewTime": 7},  # line 6: title-less item
        {"asin": "A1", "unixReviewTime": 3},  # line 7: no reviewer
        {"reviewerID": "u2", "asin": "A1", "unixReviewTime": "soon"},  # line 8: bad time
    ]
    _write(tmp_path / "Tools_5.json", [x if isinstance(x, str) else json.dumps(x) for x in rev])
    _write(tmp_path / "meta_Tools.json", [json.dumps(x) for x in [
        {"asin": "A1", "title": "Alpha", "description": ["Line one", "line two"],
         "category": ["Tools", "Saws"], "imageURLHighRes": ["hi.jpg"], "imageURL": ["lo.jpg"]},
        {"asin": "B2", "title": "Beta", "imageURL": ["lo.jpg"]},
        {"asin": "C3", "title": "Gamma"},
        {"asin": "D4", "title": ""},  # line 4
    ]])
    r = ingest(IngestConfig(source="amazon-2018", path=str(tmp_path), name="Tools",
                            min_interactions=1))
    assert _seqs(r) == {"u1": ["C3", "A1", "B2"]}  # times 1, 5, 5 (tie broken by id)
    assert r.items.column("image_url").to_pylist() == ["hi.jpg", "lo.jpg", None]
    assert r.items.column("description").to_pylist()[0] == "Line one line two"
    assert r.items.column("categories").to_pylist()[0] == "Tools,Saws"
    assert _quarantined(r) == {
        ("Tools_5.json", 3, "malformed_json"), ("Tools_5.json", 7, "missing_field:reviewerID"),
        ("Tools_5.json", 8, "bad_field:unixReviewTime"), ("meta_Tools.json", 4, "missing_title"),
        ("Tools_5.json", 5, "unknown_item"), ("Tools_5.json", 6, "unknown_item")}
    assert r.quarantine.schema == QUARANTINE_SCHEMA
    assert r.stats["quarantined"] == 6 and r.stats["quarantined:unknown_item"] == 2
    assert r.stats["users"] == 1 and r.stats["items"] == 3


def test_amazon_2023_jsonl_gz_parent_asin_and_images(tmp_path):
    t0 = 1_600_000_000_000  # ms
    _write(tmp_path / "Beauty.jsonl.gz", [json.dumps(x) for x in [
        {"user_id": "U", "asin": "c1", "parent_asin": "P3", "timestamp": t0 + 2},
        {"user_id": "U", "asin": "c2", "parent_asin": "P1", "timestamp": t0},
        {"user_id": "U", "asin": "c3", "parent_asin": "P2", "timestamp": t0 + 1},
    ]], gz=True)
    _write(tmp_path / "meta_Beauty.jsonl.gz", [json.dumps(x) for x in [
        {"parent_asin": "P1", "title": "One", "store": "Brandy", "description": [],
         "categories": [], "images": [{"thumb": "t.jpg", "large": "L1.jpg", "hi_res": None,
                                       "variant": "MAIN"}]},
        {"parent_asin": "P2", "title": "Two", "description": ["Soft.", "Light."],
         "categories": ["Beauty", "Skin"], "images": [{"large": "L2.jpg", "hi_res": "H2.jpg"}]},
        {"parent_asin": "P3", "title": "Three", "images": []},
    ]], gz=True)
    cfg = IngestConfig(source="amazon-2023", path=str(tmp_path), name="Beauty", min_interactions=1)
    assert [Path(p).name for p in input_files(cfg)] == ["Beauty.jsonl.gz", "meta_Beauty.jsonl.gz"]
    r = ingest(cfg)
    assert _seqs(r) == {"U": ["P1", "P2", "P3"]}  # by ms timestamp, not file order
    assert r.items.to_pylist()[:2] == [
        {"item_idx": 0, "item_id": "P1", "title": "One", "description": "", "brand": "Brandy",
         "categories": "", "image_url": "L1.jpg"},  # hi_res null -> large
        {"item_idx": 1, "item_id": "P2", "title": "Two", "description": "Soft. Light.",
         "brand": "", "categories": "Beauty,Skin", "image_url": "H2.jpg"}]
    assert r.items.column("image_url").to_pylist()[2] is None
    ex = r.examples.to_pylist()  # n=3: no train; valid P2 <- [P1]; test P3 <- [P1, P2]
    assert [(e["split"], e["history"], e["target"]) for e in ex] == [("valid", [0], 1),
                                                                      ("test", [0, 1], 2)]


def test_inter_json_quarantine_unknown_and_untitled(tmp_path):
    (tmp_path / "Tiny.inter.json").write_text(json.dumps(
        {"a": [1, 2, 99, 3], "b": [3, "x"], "c": [1, 2, 3, 1]}))
    (tmp_path / "Tiny.item.json").write_text(json.dumps(
        {str(i): {"title": f"T{i}", "description": "", "brand": "B", "categories": "C1,C2"}
         for i in (1, 2, 3)} | {"x": {"title": "  "}}))
    r = ingest(IngestConfig(source="inter-json", path=str(tmp_path), name="Tiny"))
    # 99 has no entry and x has no title: both leave their sequence. No k-core: b keeps 1 item.
    assert _seqs(r) == {"a": ["1", "2", "3"], "b": ["3"], "c": ["1", "2", "3", "1"]}
    assert _quarantined(r) == {("Tiny.item.json", None, "missing_title"),
                               ("Tiny.inter.json", None, "unknown_item")}
    assert sorted(json.loads(x)["item"] for x in r.quarantine.column("raw").to_pylist()[1:]) \
        == ["99", "x"]
    assert r.stats["quarantined:unknown_item"] == 2 and r.stats["users_without_examples"] == 1
    assert r.stats["test_examples"] == 2  # a and c


# --------------------------------------------------------------------------- errors


def test_missing_file_names_the_path(tmp_path):
    cfg = IngestConfig(source="amazon-2018", path=str(tmp_path), name="Nope")
    with pytest.raises(IngestError, match=str(tmp_path / "Nope_5.json.gz")):
        ingest(cfg)
    with pytest.raises(IngestError, match="Nope_5.json"):
        input_files(cfg)


def test_unusable_files_raise(tmp_path):
    _write(tmp_path / "Bad_5.json", ["not json", "{also not"])
    _write(tmp_path / "meta_Bad.json", [json.dumps({"asin": "A", "title": "t"})])
    with pytest.raises(IngestError, match=r"Bad_5\.json: .*line 1: malformed_json"):
        ingest(IngestConfig(source="amazon-2018", path=str(tmp_path), name="Bad"))

    (tmp_path / "L.inter.json").write_text("[1, 2]")
    (tmp_path / "L.item.json").write_text("{}")
    with pytest.raises(IngestError, match=r"L\.inter\.json: top-level JSON must be an object"):
        ingest(IngestConfig(source="inter-json", path=str(tmp_path), name="L"))
    (tmp_path / "L.inter.json").write_text('{"u": [1,\n 2,,]}')
    with pytest.raises(IngestError, match=r"L\.inter\.json: line 2"):
        ingest(IngestConfig(source="inter-json", path=str(tmp_path), name="L"))

    # Well-formed but k-core leaves nothing: one user, one item.
    _write(tmp_path / "One_5.json", [json.dumps({"reviewerID": "u", "asin": "A",
                                                 "unixReviewTime": 1})])
    _write(tmp_path / "meta_One.json", [json.dumps({"asin": "A", "title": "t"})])
    with pytest.raises(IngestError, match="no usable interactions remain"):
        ingest(IngestConfig(source="amazon-2018", path=str(tmp_path), name="One"))


def test_movielens_without_recbole_says_how_to_set_up(monkeypatch):
    monkeypatch.setattr(formats.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(IngestError, match="README"):
        input_files(IngestConfig())


# ------------------------------------------------------------------------ real data


def test_real_scientific_unchanged(scientific_dir):
    r = ingest(IngestConfig(source="inter-json", path=str(scientific_dir), name="Scientific"))
    raw = json.loads((scientific_dir / "Scientific.inter.json").read_text())
    assert (r.stats["users"], r.stats["items"], r.stats["interactions"]) == (8317, 4344, 58492)
    assert r.stats["quarantined"] == 0 and r.quarantine.num_rows == 0
    assert _seqs(r) == {u: [str(i) for i in s] for u, s in raw.items()}
    ids = r.items.column("item_id").to_pylist()
    for split, back in (("test", 1), ("valid", 2)):
        rows = r.examples.filter(pc.equal(r.examples.column("split"), split)).to_pylist()
        assert len(rows) == 8317
        assert all(ids[x["target"]] == str(raw[x["user_id"]][-back]) for x in rows)
    # every user has >= 5 items: n-1 examples each, 58492 - 8317 = 50175 in all.
    assert r.examples.num_rows == 50175 and r.stats["train_examples"] == 50175 - 2 * 8317


@pytest.fixture(scope="module")
def movielens():
    return ingest(IngestConfig())


def test_movielens_100k_kcore(movielens):
    # 943 users x 1,682 movies, 100,000 ratings; every user has >= 20 ratings, so the 5-core
    # only removes movies: 333 with < 5 ratings (713 ratings), in one pass. Numbers checked
    # against a plain-Python k-core loop over the same file.
    s = movielens.stats
    assert (s["users"], s["items"], s["interactions"], s["kcore_passes"]) == (943, 1349, 99287, 1)
    toy = movielens.items.to_pylist()[0]
    assert (toy["item_id"], toy["title"], toy["description"], toy["categories"]) == (
        "1", "Toy Story", "Released 1995.", "Animation,Children's,Comedy")
    assert s["valid_examples"] == s["test_examples"] == 943
    assert s["train_examples"] == 99287 - 3 * 943


def test_movielens_max_users_slice(movielens):
    r = ingest(IngestConfig(max_users=3))
    full = _seqs(movielens)
    first3 = dict(list(full.items())[:3])
    assert list(first3) == ["196", "186", "22"]  # first users of ml-100k.inter
    assert _seqs(r) == first3  # sliced after k-core: same sequences as the full run
    touched = {i for s in first3.values() for i in s}
    assert set(r.items.column("item_id").to_pylist()) == touched
    assert r.items.column("item_idx").to_pylist() == list(range(len(touched)))


def test_movielens_format_from_a_folder(tmp_path):
    _write(tmp_path / "ml-100k.inter", [
        "user_id:token\titem_id:token\trating:float\ttimestamp:float",
        "1\t10\t5\t30", "1\t2\t4\t10", "1\t7\t3", "1\t7\t3\tlater", "1\t3\t3\t20"])
    _write(tmp_path / "ml-100k.item", [
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
        "2\tTwo\t1990\tDrama Comedy", "3\tThree\tunknown\tunknown", "10\tTen\t1999\tAction",
        "7\tSeven\t1997\tAction"])
    r = ingest(IngestConfig(path=str(tmp_path), min_interactions=1))
    # line 4 has 3 fields; line 5's time is not a number. Order by time: 2@10, 3@20, 10@30,
    # and ids are numbered numerically (2 < 3 < 10), not as strings ("10" < "2").
    assert _seqs(r) == {"1": ["2", "3", "10"]}
    assert r.sequences.column("item_idx").to_pylist() == [[0, 1, 2]]
    assert _quarantined(r) == {("ml-100k.inter", 4, "malformed_line"),
                               ("ml-100k.inter", 5, "bad_field:timestamp")}
    assert r.items.column("description").to_pylist() == ["Released 1990.", "", "Released 1999."]
    assert r.items.column("categories").to_pylist() == ["Drama,Comedy", "unknown", "Action"]
