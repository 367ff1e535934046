"""The tokenize stage on a local Ray: two gloo DDP workers (digr/tokenizer/tokenize.py)."""

from __future__ import annotations

import numpy as np
import pytest

from digr.platform.scaling import ScalingConfig
from digr.tokenizer.rqvae import RQVAEConfig
from digr.tokenizer.sids import collision_rate
from digr.tokenizer.tokenize import TokenizeConfig, run_tokenize

CFG = TokenizeConfig(
    rqvae=RQVAEConfig(levels=3, codebook_size=8, hidden_dims=(32,), latent_dim=8, epochs=3, batch_size=64,
                      kmeans_iters=5, dead_code_window=4),
    scaling=ScalingConfig(num_workers=2),
    report_every=2,
)


def test_run_tokenize_two_workers(ray_local, tmp_path):
    emb = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    res = run_tokenize(emb, CFG, storage_dir=str(tmp_path))

    assert res.sids.shape == (200, 4) and res.sids.dtype == np.int64
    assert len(np.unique(res.sids, axis=0)) == 200  # unique after the suffix
    assert res.sids[:, :3].max() < 8 and res.sids.min() >= 0
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.model_state["codebooks"].shape == (3, 8, 8)
    s = res.stats
    assert s["collision_rate"] == pytest.approx(collision_rate(res.sids[:, :3]))
    assert s["max_suffix"] == res.sids[:, -1].max() and s["suffix_size"] == s["max_suffix"] + 1
    assert s["unique_sids"] == 200 and len(s["usage_per_level"]) == 3
    assert all(0 < u <= 1 for u in s["usage_per_level"])
    assert len(s["codebook_version"]) == 12

    # The checkpoint holds the model rank 0 trained: its last epoch's SID uniqueness, measured
    # inside the worker, matches the driver's assignment from the checkpointed state.
    assert res.history[-1]["unique_sid_rate"] == pytest.approx(s["unique_prefixes"] / 200)
    # Determinism for a seed is checked without Ray in tests/tokenizer/test_rqvae.py (a second Ray
    # run here would double this file's time).


def test_run_tokenize_rqkmeans(ray_local, tmp_path):
    # Residual k-means through the same stage: codebooks in the embedding space (no encoder),
    # one history record, and the driver's codes from the checkpoint match the worker's fit.
    import dataclasses

    cfg = dataclasses.replace(CFG, rqvae=RQVAEConfig(method="rqkmeans", levels=3, codebook_size=8, kmeans_iters=5),
                              scaling=ScalingConfig(num_workers=1))
    emb = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    res = run_tokenize(emb, cfg, storage_dir=str(tmp_path))
    assert res.model_state["codebooks"].shape == (3, 8, 16)
    assert [h["epoch"] for h in res.history] == [1]
    assert res.history[0]["unique_sid_rate"] == pytest.approx(res.stats["unique_prefixes"] / 200)
    assert len(np.unique(res.sids, axis=0)) == 200 and res.sids[:, :3].max() < 8


def test_run_tokenize_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        run_tokenize(np.full((4, 2), np.nan, dtype=np.float32), CFG, storage_dir="/tmp/unused")
    with pytest.raises(ValueError, match="num_workers=2 exceeds"):
        run_tokenize(np.zeros((1, 2), dtype=np.float32), CFG, storage_dir="/tmp/unused")


def test_run_tokenize_with_image_fusion(ray_local, tmp_path):
    """IEID "+ image": packed rows go through W_v / W_f inside the Ray Train worker, and the
    driver rebuilds the same fused model from the checkpoint."""
    from digr.tokenizer.fusion import pack_image

    rng = np.random.default_rng(0)
    img = rng.normal(size=(120, 5)).astype(np.float32)
    has = rng.random(120) > 0.3
    img[~has] = np.nan
    emb = pack_image(rng.normal(size=(120, 16)).astype(np.float32), img, has)
    cfg = TokenizeConfig(rqvae=CFG.rqvae, scaling=ScalingConfig(num_workers=1), report_every=0)
    res = run_tokenize(emb, cfg, storage_dir=str(tmp_path), image_dim=5)
    assert res.sids.shape == (120, 4) and len(np.unique(res.sids, axis=0)) == 120
    assert res.model_state["fusion.vis.weight"].shape == (16, 5)
    assert res.model_state["fusion.fuse.weight"].shape == (16, 32)
    assert res.history[-1]["unique_sid_rate"] == pytest.approx(res.stats["unique_prefixes"] / 120)


def test_tokenize_stage_prefix_labels(ray_local, tmp_path):
    """tokenize.labels=prefix: the stage writes relabelled SIDs, a trie and a codebook size
    that agree, so the sft stage's vocabulary (`vocab_for`) accepts them."""
    import dataclasses

    import pyarrow as pa

    from digr.pipeline.stages import load_sids, tokenize_stage
    from digr.platform import storage
    from digr.rec.sft_data import vocab_for
    from digr.rec.trie import SidTrie
    from digr.tokenizer.sids import prefix_labels

    emb = np.random.default_rng(1).normal(size=(150, 16)).astype(np.float32)
    storage.write_table(str(tmp_path / "embed" / "embeddings" / "part-0.parquet"), pa.table({
        "item_idx": pa.array(np.arange(150), pa.int32()), "embedding": pa.array(list(emb), pa.list_(pa.float32()))}))
    cfg = dataclasses.replace(CFG, scaling=ScalingConfig(num_workers=1), report_every=0, labels="prefix")
    tokenize_stage(cfg, str(tmp_path / "embed"), str(tmp_path / "tok"))
    sids, size = load_sids(str(tmp_path / "tok"))
    meta = storage.read_json(str(tmp_path / "tok" / "tokenizer.json"))
    assert meta["labels"] == "prefix" and meta["rqvae_codebook_size"] == 8 and meta["codebook_size"] == size
    assert size == sids[:, :3].max() + 1 and size > 8  # more distinct deep prefixes than codes
    again, again_size = prefix_labels(sids)  # relabelling is idempotent: labels already name prefixes
    assert np.array_equal(again, sids) and again_size == size
    trie = SidTrie.from_bytes(storage.read_bytes(str(tmp_path / "tok" / "trie.npz")))
    assert trie.vocab == vocab_for(sids, size) and trie.num_items == 150
    with pytest.raises(ValueError, match="tokenize.labels must be one of"):
        TokenizeConfig(labels="atomic")
