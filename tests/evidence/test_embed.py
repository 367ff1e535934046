"""Embed stage: the text the encoder reads, and the Ray Data actor-pool path with the real
packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from digr.evidence.embed import EmbedConfig, TextEmbedder, default_model_path, item_text, run_embed
from digr.platform import storage


def test_item_text_skips_empty_fields_and_truncates() -> None:
    row = {"title": "Drill ", "brand": "", "categories": "Tools,Power", "description": "Cordless."}
    assert item_text(row) == "Title: Drill. Categories: Tools,Power. Description: Cordless."
    assert item_text(row, ("title",)) == "Title: Drill"
    assert item_text(row, max_chars=8) == "Title: D"


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="embed.fields"):
        EmbedConfig(fields=("title", "price"))


def test_embedder_gives_unit_vectors_that_separate_topics() -> None:
    emb = TextEmbedder(default_model_path(), ("title",), 200, device="cpu")
    batch = {"item_idx": np.array([0, 1, 2]),
             "title": np.array(["cordless power drill", "electric drill driver", "chocolate chip cookies"])}
    out = emb(batch)["embedding"]
    assert out.shape == (3, 384) and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    sims = out @ out.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # two drills are closer than a drill and cookies


def test_run_embed_on_ray_orders_rows_by_item_idx(ray_local, tmp_path) -> None:
    n = 40
    titles = [f"lab pipette model {i}" if i % 2 else f"garden hose {i}" for i in range(n)]
    table = pa.table({"item_idx": pa.array(range(n)[::-1], pa.int32()), "title": titles[::-1],
                      "brand": [""] * n, "categories": ["x"] * n, "description": [""] * n})
    storage.write_table(str(tmp_path / "items.parquet"), table)
    emb = run_embed(str(tmp_path / "items.parquet"), str(tmp_path / "out"), EmbedConfig(batch_size=16))
    assert emb.shape == (n, 384)
    direct = TextEmbedder(default_model_path(), EmbedConfig().fields, 2000, 128, device="cpu")
    row = {"item_idx": np.array([3]), "title": np.array([titles[3]]), "brand": np.array([""]),
           "categories": np.array(["x"]), "description": np.array([""])}
    assert np.allclose(emb[3], direct(row)["embedding"][0], atol=1e-5)


# ---------------------------------------------------------------- IEID: evidence before quantisation


def _evidence_tables() -> tuple[pa.Table, pa.Table, pa.Table, pa.Table]:
    from digr.evidence.mine import INTENTS_SCHEMA

    items = pa.table({"item_idx": pa.array([0, 1, 2], pa.int32()), "item_id": ["a", "b", "c"],
                      "title": ["Pipette", "Goggles", "Beaker"], "brand": ["", "", ""],
                      "categories": ["Lab", "Lab", "Lab"], "description": ["", "", ""]})
    captions = pa.table({"item_idx": pa.array([1, 0], pa.int32()), "caption": ["safety glasses on a desk", None]})

    def ds(*pairs: tuple[str, float]) -> list[dict]:
        return [{"intent": t, "confidence": c, "models": ["m"]} for t, c in pairs]
    intents = pa.table({"item_idx": pa.array([0, 1, 2], pa.int32()), "item_id": ["a", "b", "c"],
                        "intents": [ds(("measure tiny volumes", 0.4), ("run lab assays", 0.9)),
                                    ds(("pipette", 0.9)), []],
                        "status": ["ok", "ok", "failed"], "notes": [[], [], []]}, schema=INTENTS_SCHEMA)
    labels = pa.table({"item_id": ["a", "a", "b"], "intent": ["measure tiny volumes", "run lab assays", "pipette"],
                       "label": pa.array([1, 1, 0], pa.int8())})
    return items, captions, intents, labels


def test_with_evidence_adds_captions_and_kept_intents_and_counts_fallbacks() -> None:
    from digr.evidence.embed import with_evidence

    items, captions, intents, labels = _evidence_tables()
    out, fallback = with_evidence(items, captions, intents, labels, ("title", "categories"))
    assert out["caption"].to_pylist() == ["", "safety glasses on a desk", ""]
    # most confident first; b's only intent is labelled bad and c has none: both fall back to their text
    assert out["intents"].to_pylist() == ["run lab assays; measure tiny volumes", "Title: Goggles. Categories: Lab",
                                          "Title: Beaker. Categories: Lab"]
    assert fallback == 2
    unlabelled, fallback = with_evidence(items, None, intents, None, ("title",))
    assert "caption" not in unlabelled.column_names and unlabelled["intents"][1].as_py() == "pipette" and fallback == 1


def test_embed_stage_with_intents_concatenates_content_and_weighted_interest(ray_local, tmp_path) -> None:
    from digr.evidence.embed import load_embeddings
    from digr.pipeline.stages import embed_stage

    items, captions, intents, labels = _evidence_tables()
    for name, table in (("ingest/items", items), ("caption/captions", captions), ("mine/intents", intents),
                        ("label/labels", labels)):
        storage.write_table(str(tmp_path / f"{name}.parquet"), table)
    cfg = EmbedConfig(evidence=("caption", "intents"), interest_weight=0.5, batch_size=2)
    info = embed_stage(cfg, str(tmp_path / "ingest"), str(tmp_path / "embed"), str(tmp_path / "caption"),
                       str(tmp_path / "mine"), str(tmp_path / "label"))
    assert info["stats"] == {"evidence": ["caption", "intents"], "items_without_intents": 2, "dim": 768}
    emb = load_embeddings(str(tmp_path / "embed" / "embeddings"))
    assert emb.shape == (3, 768)
    np.testing.assert_allclose(np.linalg.norm(emb[:, :384], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb[:, 384:], axis=1), 0.5, atol=1e-5)
    direct = TextEmbedder(default_model_path(), ("intents",), 2000, 128, device="cpu")
    want = direct({"item_idx": np.array([0]), "intents": np.array(["run lab assays; measure tiny volumes"])})
    np.testing.assert_allclose(emb[0, 384:], 0.5 * want["embedding"][0], atol=1e-5)
    with_caption = TextEmbedder(default_model_path(), ("title", "brand", "categories", "description", "caption"),
                                2000, 128, device="cpu")
    row1 = {k: np.array([v]) for k, v in {"item_idx": 1, "title": "Goggles", "brand": "", "categories": "Lab",
                                         "description": "", "caption": "safety glasses on a desk"}.items()}
    np.testing.assert_allclose(emb[1, :384], with_caption(row1)["embedding"][0], atol=1e-5)


def test_embed_stage_with_image_appends_vector_and_flag(ray_local, tmp_path) -> None:
    from digr.evidence.embed import load_embeddings
    from digr.evidence.images import IMAGES_SCHEMA
    from digr.pipeline.stages import embed_stage

    items, *_ = _evidence_tables()
    storage.write_table(str(tmp_path / "ingest/items.parquet"), items)
    images = pa.table({"item_idx": pa.array([0, 1, 2], pa.int32()), "item_id": ["a", "b", "c"],
                       "status": ["ok", "missing", "fetch_error"], "error": [None, None, "HTTP 404"],
                       "tags": [[], [], []], "vector": [[0.5, -1.0], None, None]}, schema=IMAGES_SCHEMA)
    storage.write_table(str(tmp_path / "images/images.parquet"), images)
    cfg = EmbedConfig(evidence=("image",), batch_size=2)
    info = embed_stage(cfg, str(tmp_path / "ingest"), str(tmp_path / "embed"), images_dir=str(tmp_path / "images"))
    assert info["stats"] == {"evidence": ["image"], "image_dim": 2, "items_with_image": 1, "items_without_image": 2,
                             "dim": 384 + 2 + 1}
    emb = load_embeddings(str(tmp_path / "embed" / "embeddings"))
    np.testing.assert_allclose(np.linalg.norm(emb[:, :384], axis=1), 1.0, atol=1e-5)
    assert emb[:, 384:].tolist() == [[0.5, -1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]

    none = images.set_column(2, "status", pa.array(["missing"] * 3)).set_column(5, "vector", pa.array(
        [None] * 3, pa.list_(pa.float32())))
    storage.write_table(str(tmp_path / "images/images.parquet"), none)
    with pytest.raises(ValueError, match="no image for any item"):
        embed_stage(cfg, str(tmp_path / "ingest"), str(tmp_path / "embed2"), images_dir=str(tmp_path / "images"))


def test_evidence_switch_names_bad_values() -> None:
    with pytest.raises(ValueError, match="embed.evidence"):
        EmbedConfig(evidence=("image_tags",))
