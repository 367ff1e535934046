"""Evaluate stage: HR@K / NDCG@K over the full catalogue on the test split (leave-last-out),
for the generative model and, in the same run on the same rows, popularity and SASRec.

Pure core: `GenerativeRanker` (histories -> top-K item_idx with the shared constrained beam
search) and `digr.data.metrics.hr_ndcg`. Ray wrapper: the test rows stream through an actor pool
(`map_batches(GenerativeRanker, compute=ActorPoolStrategy(...))`); SASRec trains in a Ray task, so on a
cluster it lands on a worker rather than on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from digr.data.metrics import EMPTY, hr_ndcg
from digr.eval.baselines import SASRecConfig, popularity_counts, popularity_rank, sasrec_rank, seen_mask, train_sasrec

BASELINES = ("popularity", "sasrec")


@dataclass(frozen=True)
class EvalConfig:
    beam_size: int = 20             # the papers' beam
    top_k: int = 10
    ks: tuple[int, ...] = (5, 10)
    batch_size: int = 64            # histories per beam-search call
    exclude_seen: bool = True       # never recommend an item already in the history (all models alike)
    # > 0: rank the beam's and the dense head's candidates by (1 - w) log p_gen + w log p_dense
    # (`decode.hybrid_recommend`); needs a model trained with sft.dense_weight > 0. 0 = beam search only.
    dense_weight: float = 0.0
    concurrency: int = 1            # ranker actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    baselines: tuple[str, ...] = BASELINES
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)

    def __post_init__(self) -> None:
        if self.top_k < max(self.ks) or self.beam_size < self.top_k:
            raise ValueError(f"evaluate: need beam_size >= top_k >= max(ks), got {self.beam_size}, {self.top_k}, {self.ks}")
        if not 0 <= self.dense_weight <= 1:
            raise ValueError(f"evaluate.dense_weight must be in [0, 1], got {self.dense_weight}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"evaluate.baselines: unknown {sorted(unknown)}; known: {BASELINES}")


class GenerativeRanker:
    """Ray Data UDF: {"history", "seen"} rows -> {"ranked": (B, top_k) item_idx} by constrained beam search."""

    def __init__(self, model_dir: str, trie_uri: str, beam_size: int, top_k: int, exclude_seen: bool,
                 max_history: int, threads: int = 0, dense_weight: float = 0.0) -> None:
        from digr.platform import storage
        from digr.rec.decode import prepare
        from digr.rec.sft import load_model
        from digr.rec.trie import SidTrie

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = load_model(model_dir).to(self.device).eval()
        self.trie = SidTrie.from_bytes(storage.read_bytes(trie_uri)).to(self.device)
        prepare(self.model, self.trie)  # the decoder's per-trie tables, built once per actor
        self.n_items = self.model.n_items
        self.beam_size, self.top_k, self.exclude_seen, self.max_history = beam_size, top_k, exclude_seen, max_history
        self.dense_weight = dense_weight

    def rank(self, histories: list[list[int]], seen: list[list[int]] | None = None) -> np.ndarray:
        """histories: B item_idx lists (oldest first) -> (B, top_k) int64 item_idx, EMPTY-padded."""
        from digr.rec.decode import hybrid_recommend, recommend

        exclude = None
        if self.exclude_seen:
            exclude = torch.from_numpy(seen_mask(seen if seen is not None else histories, self.n_items)).to(self.device)
        if self.dense_weight:
            out = hybrid_recommend(self.model, self.trie, histories, self.max_history, self.dense_weight,
                                   beam_size=self.beam_size, top_k=self.top_k, exclude=exclude)
        else:
            out = recommend(self.model, self.trie, histories, self.max_history, beam_size=self.beam_size,
                            top_k=self.top_k, exclude=exclude)
        return out.items.cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        histories = [list(map(int, h)) for h in batch["history"]]
        seen = [list(map(int, s)) for s in batch["seen"]]
        return {"row": batch["row"], "ranked": self.rank(histories, seen)}


def test_rows(examples: pa.Table, sequences: pa.Table, split: str = "test") -> dict[str, Any]:
    """The rows to score: user ids, capped histories, targets and all items seen before the target."""
    rows = examples.filter(pa.compute.equal(examples["split"], split))
    full = dict(zip(sequences["user_id"].to_pylist(), sequences["item_idx"].to_pylist()))
    back = 1 if split == "test" else 2
    users = rows["user_id"].to_pylist()
    return {
        "user_id": users,
        "history": rows["history"].to_pylist(),
        "target": np.asarray(rows["target"].to_pylist(), dtype=np.int64),
        "seen": [full[u][:-back] for u in users],
    }


def rank_generative(rows: dict[str, Any], ranker_kwargs: dict[str, Any], cfg: EvalConfig) -> np.ndarray:
    """Stream the rows through a pool of `GenerativeRanker` actors; returns (B, top_k) in row order."""
    import ray

    ds = ray.data.from_items([
        {"row": i, "history": h, "seen": s} for i, (h, s) in enumerate(zip(rows["history"], rows["seen"]))
    ])
    ds = ds.map_batches(
        GenerativeRanker, fn_constructor_kwargs=ranker_kwargs, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
    )
    out = np.full((len(rows["target"]), cfg.top_k), EMPTY, dtype=np.int64)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out[batch["row"]] = np.stack(batch["ranked"])
    return out


def _train_and_rank_sasrec(sequences: list[list[int]], n_items: int, cfg: EvalConfig,
                           histories: list[list[int]], seen: list[list[int]]) -> tuple[np.ndarray, list[dict]]:
    model, history = train_sasrec(sequences, n_items, cfg.sasrec)
    exclude = seen_mask(seen, n_items) if cfg.exclude_seen else None
    return sasrec_rank(model, histories, cfg.top_k, exclude), history


def start_sasrec(rows: dict[str, Any], sequences: list[list[int]], n_items: int, cfg: EvalConfig) -> Any:
    """Train and rank SASRec in a Ray task (it is the slow baseline); returns an ObjectRef of
    ((B, top_k) ranked, per-epoch history)."""
    import ray

    task = ray.remote(num_cpus=1)(_train_and_rank_sasrec)
    # SASRec reads the whole prior sequence, truncated to its own `max_len` window.
    return task.remote(sequences, n_items, cfg, rows["seen"], rows["seen"])


def rank_popularity(rows: dict[str, Any], sequences: list[list[int]], n_items: int, cfg: EvalConfig) -> np.ndarray:
    counts = popularity_counts(sequences, n_items)
    seen = rows["seen"] if cfg.exclude_seen else [[] for _ in rows["seen"]]
    return popularity_rank(counts, seen, cfg.top_k, exclude_seen=cfg.exclude_seen)


def score(ranked: np.ndarray, targets: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    return {k: round(v, 6) for k, v in hr_ndcg(ranked, targets, ks).items()}
