"""Embed stage: the text the encoder reads, and the Ray Data actor-pool path with the real
packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from digr import storage
from digr.embed import EmbedConfig, TextEmbedder, default_model_path, item_text, run_embed


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
