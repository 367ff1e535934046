"""Stage bodies of the pipeline: each calls its module's core and writes the stage's artifacts.

Artifacts (every path relative to the run directory; local or s3://):
- ingest/   items.parquet, sequences.parquet, examples.parquet, quarantine.parquet (schemas in digr.data.ingest)
- embed/    embeddings/*.parquet: item_idx int32, embedding list<float32>; with evidence also
            items_evidence.parquet (items + caption / intents text), content/, interest/
- tokenize/ sids.parquet (item_idx, sid list<int32>), rqvae.pt (state dict), trie.npz, tokenizer.json
            (stats: collision rate before the suffix, usage per level, codebook_version; loss history;
            labels and the SIDs' codebook_size, > the RQ-VAE's rqvae_codebook_size with labels=prefix)
- sft/      model/ (transformers directory + vocab), history.json, ray/ (Ray Train checkpoints)
- grpo/     model/ (same layout as sft/model), history.json (per step: loss, rewards, kl, valid NDCG@10), ray/
- evaluate/ predictions_<model>.jsonl (top-K per user, source ids, for ../shared/tools/score.py), metrics.json
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from digr.data.ingest import IngestConfig, ingest, input_files
from digr.data.metrics import EMPTY, write_predictions
from digr.eval.baselines import popularity_counts
from digr.eval.evaluate import (
    EvalConfig,
    bucket_scores,
    rank_fused,
    rank_generative,
    rank_popularity,
    score,
    start_sasrec,
    subsample,
    test_rows,
)
from digr.evidence.embed import EmbedConfig, load_embeddings, run_embed, with_evidence
from digr.platform import storage
from digr.rec.sft import SFTConfig, load_model, run_sft, save_model, uses_features
from digr.rec.sft_data import vocab_for
from digr.rec.trie import SidTrie
from digr.rl.grpo import GRPOConfig
from digr.tokenizer.sids import sid_table
from digr.tokenizer.tokenize import TokenizeConfig, run_tokenize


def ingest_inputs(cfg: IngestConfig) -> list[str]:
    return input_files(cfg)


def ingest_stage(cfg: IngestConfig, out: str) -> dict[str, Any]:
    res = ingest(cfg)
    for name in ("items", "sequences", "examples", "quarantine"):
        storage.write_table(storage.join(out, f"{name}.parquet"), getattr(res, name))
    quarantined = res.quarantine.num_rows
    if quarantined:
        reasons = res.quarantine["reason"].value_counts().to_pylist()
        print(f"[ingest] {quarantined} rows quarantined: "
              + ", ".join(f"{r['values']}={r['counts']}" for r in reasons)
              + f" (see {storage.join(out, 'quarantine.parquet')})")
    rows = {"items": res.items.num_rows, "users": res.sequences.num_rows,
            "examples": res.examples.num_rows, "quarantined": quarantined}
    return {"rows": rows, "stats": res.stats}


def embed_stage(cfg: EmbedConfig, ingest_dir: str, out: str, caption_dir: str | None = None,
                mine_dir: str | None = None, label_dir: str | None = None, images_dir: str | None = None
                ) -> dict[str, Any]:
    """Text (+ caption) vectors; with evidence "intents", [content ; w * interest]; with
    "image", the image vector and a has-image flag appended (digr.evidence.embed, digr.tokenizer.fusion)."""
    items_uri = storage.join(ingest_dir, "items.parquet")
    stats: dict[str, Any] = {"evidence": list(cfg.evidence)}
    fields = cfg.fields
    if set(cfg.evidence) & {"caption", "intents"}:
        items = storage.read_table(items_uri)
        captions = storage.read_table(storage.join(caption_dir, "captions.parquet")) if "caption" in cfg.evidence else None
        intents = labels = None
        if "intents" in cfg.evidence:
            intents = storage.read_table(storage.join(mine_dir, "intents.parquet"))
            if label_dir and storage.exists(storage.join(label_dir, "labels.parquet")):
                labels = storage.read_table(storage.join(label_dir, "labels.parquet"))
        items, stats["items_without_intents"] = with_evidence(items, captions, intents, labels, cfg.fields, cfg.max_chars)
        items_uri = storage.join(out, "items_evidence.parquet")
        storage.write_table(items_uri, items)
        fields = (*cfg.fields, "caption") if captions is not None else cfg.fields
    for part in ("embeddings", "content", "interest"):
        storage.delete_dir(storage.join(out, part))  # a killed run's partial files; Ray Data appends
    if not set(cfg.evidence) & {"intents", "image"}:
        emb = run_embed(items_uri, storage.join(out, "embeddings"), cfg, fields)
    else:
        emb = run_embed(items_uri, storage.join(out, "content"), cfg, fields)
        if "intents" in cfg.evidence:
            interest = run_embed(items_uri, storage.join(out, "interest"), cfg, ("intents",))
            emb = np.concatenate([emb, cfg.interest_weight * interest], axis=1).astype(np.float32)
        if "image" in cfg.evidence:
            from digr.evidence.images import load_image_vectors
            from digr.tokenizer.fusion import pack_image

            img, has = load_image_vectors(storage.join(images_dir, "images.parquet"), len(emb))
            if not has.any():
                raise ValueError(f"embed.evidence has 'image' but the images stage under {images_dir} has no image "
                                 "for any item (see its status column); drop 'image' or fix the image source")
            stats.update(image_dim=int(img.shape[1]), items_with_image=int(has.sum()),
                         items_without_image=int((~has).sum()))
            emb = pack_image(emb, img, has)
        storage.write_table(storage.join(out, "embeddings", "part-0.parquet"), pa.table({
            "item_idx": pa.array(np.arange(len(emb)), pa.int32()),
            "embedding": pa.array(list(emb), pa.list_(pa.float32()))}))
    stats["dim"] = int(emb.shape[1])
    return {"rows": {"items": int(emb.shape[0])}, "stats": stats}


def tokenize_stage(cfg: TokenizeConfig, embed_dir: str, out: str, image_dim: int = 0) -> dict[str, Any]:
    """image_dim: the embed stage's image block width (its stats), 0 when it packed no image."""
    emb = load_embeddings(storage.join(embed_dir, "embeddings"))
    res = run_tokenize(emb, cfg, storage_dir=storage.join(out, "ray"), image_dim=image_dim)
    buf = io.BytesIO()
    torch.save(res.model_state, buf)
    storage.write_bytes(storage.join(out, "rqvae.pt"), buf.getvalue())
    storage.write_table(storage.join(out, "sids.parquet"), sid_table(res.sids))
    vocab = vocab_for(res.sids, res.codebook_size)
    storage.write_bytes(storage.join(out, "trie.npz"), SidTrie.from_codes(res.sids, vocab).to_bytes())
    stats = {k: v for k, v in res.stats.items()}
    storage.write_json(storage.join(out, "tokenizer.json"), {
        "levels": cfg.rqvae.levels, "codebook_size": res.codebook_size, "labels": cfg.labels,
        "rqvae_codebook_size": cfg.rqvae.codebook_size, "image_dim": image_dim,
        "stats": stats, "history": res.history,
    })
    return {"rows": {"items": int(res.sids.shape[0])}, "stats": stats}


def load_sids(tokenize_dir: str) -> tuple[np.ndarray, int]:
    """(N, sid_len) int64 SIDs ordered by item_idx, and the codebook size."""
    table = storage.read_table(storage.join(tokenize_dir, "sids.parquet")).sort_by("item_idx")
    meta = storage.read_json(storage.join(tokenize_dir, "tokenizer.json"))
    return np.asarray(table["sid"].to_pylist(), dtype=np.int64), int(meta["codebook_size"])


def sft_stage(cfg: SFTConfig, ingest_dir: str, embed_dir: str, tokenize_dir: str, out: str) -> dict[str, Any]:
    examples = storage.read_table(storage.join(ingest_dir, "examples.parquet"))
    sids, codebook_size = load_sids(tokenize_dir)
    features = load_embeddings(storage.join(embed_dir, "embeddings")) if uses_features(cfg.model) else None
    res = run_sft(examples, sids, codebook_size, cfg, storage_dir=storage.join(out, "ray"), features=features)
    save_model(res, storage.join(out, "model"))
    storage.write_json(storage.join(out, "history.json"), res.history)
    best = next((h for h in res.history if h.get("epoch") == res.best_epoch), {})
    return {"rows": {"train_examples": int(sum(1 for s in examples["split"].to_pylist() if s == "train"))},
            "stats": {"best_epoch": res.best_epoch, "stopped_early": res.stopped_early,
                      "epochs_run": len(res.history),
                      "best_valid_ndcg@10": best.get("valid_ndcg@10")}}


def grpo_stage(cfg: GRPOConfig, ingest_dir: str, sft_dir: str, label_dir: str | None, out: str) -> dict[str, Any]:
    """SFT model + the label stage's q_i (when it ran) -> grpo/model (the best by valid NDCG@10)."""
    from digr.evidence.label import load_quality
    from digr.rl.grpo import run_grpo

    examples = storage.read_table(storage.join(ingest_dir, "examples.parquet"))
    sft_model = load_model(storage.join(sft_dir, "model"))
    quality = np.zeros(sft_model.n_items, np.float32)
    if label_dir is not None:
        for i, q in load_quality(label_dir).items():
            quality[i] = q
    res = run_grpo(examples, sft_model, cfg, storage_dir=storage.join(out, "ray"), quality=quality)
    save_model(res.model, storage.join(out, "model"))
    storage.write_json(storage.join(out, "history.json"), res.history)
    return {"rows": {"steps": len(res.history)},
            "stats": {"best_step": res.best_step, "best_valid_ndcg@10": res.best_valid_ndcg,
                      "items_with_q": int((quality > 0).sum())}}


def evaluate_stage(cfg: EvalConfig, ingest_dir: str, tokenize_dir: str, sft_dir: str, out: str,
                   max_history: int, grpo_dir: str | None = None) -> dict[str, Any]:
    """max_history: the encoder window the model was trained and validated with (sft.max_history).
    grpo_dir: when GRPO ran, its model is ranked too, as "generative_grpo"."""
    items = storage.read_table(storage.join(ingest_dir, "items.parquet")).sort_by("item_idx")
    sequences = storage.read_table(storage.join(ingest_dir, "sequences.parquet"))
    examples = storage.read_table(storage.join(ingest_dir, "examples.parquet"))
    rows = test_rows(examples, sequences, "test")
    seqs = sequences["item_idx"].to_pylist()
    n_items = items.num_rows

    sasrec = start_sasrec(rows, seqs, n_items, cfg) if "sasrec" in cfg.baselines else None
    ranker = {"model_dir": storage.join(sft_dir, "model"), "trie_uri": storage.join(tokenize_dir, "trie.npz"),
              "beam_size": cfg.beam_size, "top_k": cfg.top_k, "exclude_seen": cfg.exclude_seen,
              "max_history": max_history, "dense_weight": cfg.dense_weight}
    ranked = {"generative": rank_generative(rows, ranker, cfg)}
    if grpo_dir is not None:
        ranked["generative_grpo"] = rank_generative(rows, {**ranker, "model_dir": storage.join(grpo_dir, "model")}, cfg)
    if "popularity" in cfg.baselines:
        ranked["popularity"] = rank_popularity(rows, seqs, n_items, cfg)
    extra: dict[str, Any] = {}
    if sasrec is not None:
        import ray

        ranked["sasrec"], extra["sasrec_history"], sasrec_state = ray.get(sasrec)
        if cfg.fusion.enabled:  # the weight is picked on valid; test is ranked once, with it
            valid = subsample(test_rows(examples, sequences, "valid"), cfg.fusion.valid_users, cfg.fusion.seed)
            ranked["fusion"], extra["fusion"] = rank_fused(valid, rows, ranker, cfg, sasrec_state,
                                                           popularity_counts(seqs, n_items))

    item_ids = np.asarray(items["item_id"].to_pylist(), dtype=object)
    counts = popularity_counts(seqs, n_items)
    metrics, buckets = {}, {}
    for name, r in ranked.items():
        metrics[name] = score(r, rows["target"], cfg.ks)
        buckets[name] = bucket_scores(r, rows["target"], counts, cfg.ks)
        lists = [[item_ids[i] for i in row if i != EMPTY] for row in r]
        buf = io.StringIO()
        write_predictions(buf, rows["user_id"], lists)
        storage.write_text(storage.join(out, f"predictions_{name}.jsonl"), buf.getvalue())
    storage.write_json(storage.join(out, "metrics.json"), metrics)
    storage.write_json(storage.join(out, "baseline_history.json"), extra)
    storage.write_json(storage.join(out, "buckets.json"), buckets)
    return {"rows": {"test_users": len(rows["target"])}, "metrics": metrics,
            **({"fusion": {k: extra["fusion"][k] for k in ("method", "weight", "theta", "cv_ndcg@10")
                           if k in extra["fusion"]}} if "fusion" in extra else {})}
