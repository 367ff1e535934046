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
from digr.eval.baselines import (
    SASRec,
    SASRecConfig,
    popularity_counts,
    popularity_rank,
    sasrec_rank,
    sasrec_scores,
    seen_mask,
    train_sasrec,
)
from digr.eval.fusion import FusionConfig, choose, features, union_candidates

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
    # Generative + SASRec, fused at ranking time with a weight picked on valid (`digr.eval.fusion`):
    # the "fusion" row. Needs "sasrec" in baselines.
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        if self.top_k < max(self.ks) or self.beam_size < self.top_k:
            raise ValueError(f"evaluate: need beam_size >= top_k >= max(ks), got {self.beam_size}, {self.top_k}, {self.ks}")
        if not 0 <= self.dense_weight <= 1:
            raise ValueError(f"evaluate.dense_weight must be in [0, 1], got {self.dense_weight}")
        unknown = set(self.baselines) - set(BASELINES)
        if unknown:
            raise ValueError(f"evaluate.baselines: unknown {sorted(unknown)}; known: {BASELINES}")
        if self.fusion.enabled and "sasrec" not in self.baselines:
            raise ValueError("evaluate.fusion.enabled needs 'sasrec' in evaluate.baselines (it fuses with that model)")


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
        return {"row": batch["row"], "ranked": self.rank(*_histories(batch))}


def _histories(batch: dict[str, np.ndarray]) -> tuple[list[list[int]], list[list[int]]]:
    """A Ray Data batch's "history" and "seen" columns as lists of item_idx lists."""
    return ([list(map(int, h)) for h in batch["history"]], [list(map(int, s)) for s in batch["seen"]])


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


class FusionRanker(GenerativeRanker):
    """Ray Data UDF: {"history", "seen"} rows -> each row's fusion candidates (`digr.eval.fusion`):
    {"cand", "keep": (B, C), "gen", "dense": (B, C) log-probs}, C = beam_size + candidates, the
    beam's first. The generative model reads the capped "history", SASRec all of "seen" (its own
    max_len window), as each model alone does. Every combination is ranked from these on the driver."""

    def __init__(self, sasrec_state: dict[str, torch.Tensor], sasrec_cfg: SASRecConfig,
                 candidates: int, **ranker_kwargs: Any) -> None:
        super().__init__(**{**ranker_kwargs, "dense_weight": 0.0})
        self.sasrec = SASRec(self.n_items, sasrec_cfg)
        self.sasrec.load_state_dict(sasrec_state)
        self.sasrec.to(self.device).eval()
        self.candidates = candidates

    @torch.no_grad()
    def candidates_of(self, histories: list[list[int]], seen: list[list[int]] | None = None) -> dict[str, np.ndarray]:
        from digr.rec.decode import recommend, sid_logprobs

        seen = seen if seen is not None else histories
        mask = seen_mask(seen, self.n_items) if self.exclude_seen else None
        exclude = None if mask is None else torch.from_numpy(mask).to(self.device)
        gen = recommend(self.model, self.trie, histories, self.max_history, beam_size=self.beam_size,
                        top_k=self.beam_size, exclude=exclude)
        dense = torch.log_softmax(sasrec_scores(self.sasrec, seen, mask), dim=-1)  # (B, N)
        found = dense.topk(min(self.candidates, self.n_items), dim=1)
        cand, keep = union_candidates(gen.items, found.indices.masked_fill(torch.isinf(found.values), EMPTY),
                                      self.n_items)
        input_ids, attention = (t.to(self.device) for t in self.model.batch(histories, self.max_history))
        gen_logp = sid_logprobs(self.model, input_ids, attention, cand)
        dense_logp = dense.gather(1, cand.clamp(min=0))
        keep &= torch.isfinite(gen_logp) & torch.isfinite(dense_logp)  # an excluded item is never a candidate
        return {"cand": cand.cpu().numpy(), "keep": keep.cpu().numpy(),
                "gen": gen_logp.float().cpu().numpy(), "dense": dense_logp.float().cpu().numpy()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return {"row": batch["row"], **self.candidates_of(*_histories(batch))}


def _batches(rows: dict[str, Any], udf: type, kwargs: dict[str, Any], cfg: EvalConfig) -> Any:
    """The rows streamed through a pool of `udf` actors: an iterator of numpy output batches,
    each with the "row" indices it holds (in no particular order)."""
    import ray

    ds = ray.data.from_items([
        {"row": i, "history": h, "seen": s} for i, (h, s) in enumerate(zip(rows["history"], rows["seen"]))
    ])
    ds = ds.map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
        num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
    )
    return ds.iter_batches(batch_size=None, batch_format="numpy")


def _stream(rows: dict[str, Any], udf: type, kwargs: dict[str, Any], cfg: EvalConfig, shape: tuple[int, ...]) -> np.ndarray:
    """Stream the rows through a pool of `udf` actors; returns (B, *shape) in row order."""
    out = np.full((len(rows["target"]), *shape), EMPTY, dtype=np.int64)
    for batch in _batches(rows, udf, kwargs, cfg):
        out[batch["row"]] = np.stack(batch["ranked"])
    return out


def rank_generative(rows: dict[str, Any], ranker_kwargs: dict[str, Any], cfg: EvalConfig) -> np.ndarray:
    """Stream the rows through a pool of `GenerativeRanker` actors; returns (B, top_k) in row order."""
    return _stream(rows, GenerativeRanker, ranker_kwargs, cfg, (cfg.top_k,))


def fusion_candidates(rows: dict[str, Any], ranker_kwargs: dict[str, Any], cfg: EvalConfig,
                      sasrec_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every row's fusion candidates and both models' log-probs, in row order:
    {"cand", "keep", "gen", "dense"}: (B, beam_size + fusion.candidates) tensors."""
    kwargs = {**ranker_kwargs, "sasrec_state": sasrec_state, "sasrec_cfg": cfg.sasrec,
              "candidates": cfg.fusion.candidates}
    parts: dict[str, list[np.ndarray]] = {"row": [], "cand": [], "keep": [], "gen": [], "dense": []}
    for batch in _batches(rows, FusionRanker, kwargs, cfg):
        for k in parts:
            parts[k].append(batch[k])
    order = np.argsort(np.concatenate(parts.pop("row")))
    return {k: torch.from_numpy(np.concatenate(v)[order]) for k, v in parts.items()}


def rank_fused(valid: dict[str, Any], rows: dict[str, Any], ranker_kwargs: dict[str, Any], cfg: EvalConfig,
               sasrec_state: dict[str, torch.Tensor], counts: np.ndarray) -> tuple[np.ndarray, dict]:
    """Fit the fusion on the valid rows (`digr.eval.fusion.choose`) and rank the test rows once
    with it. counts: (n_items,) training interaction counts. Returns ((B, top_k), report)."""
    log_pop = torch.from_numpy(np.log1p(counts) / max(np.log1p(counts).max(), 1e-9)).float()

    def scored(r: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        c = fusion_candidates(r, ranker_kwargs, cfg, sasrec_state)
        return c, features(c["cand"], c["keep"], c["gen"], c["dense"], cfg.beam_size, log_pop)

    v, v_feats = scored(valid)
    combiner, report = choose(cfg.fusion, v["cand"], v["keep"], v["gen"], v["dense"], v_feats,
                              torch.from_numpy(valid["target"]), cfg.top_k)
    t, t_feats = scored(rows)
    ranked = combiner.rank(t["cand"], t["keep"], t["gen"], t["dense"], t_feats, cfg.top_k)
    return ranked.numpy(), {**report, "valid_users": len(valid["target"])}


def subsample(rows: dict[str, Any], n: int, seed: int) -> dict[str, Any]:
    """n rows drawn without replacement (all when n is 0 or >= the row count), in row order."""
    total = len(rows["target"])
    if n == 0 or n >= total:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    return {k: (v[keep] if isinstance(v, np.ndarray) else [v[i] for i in keep]) for k, v in rows.items()}


def _train_and_rank_sasrec(sequences: list[list[int]], n_items: int, cfg: EvalConfig,
                           histories: list[list[int]], seen: list[list[int]]
                           ) -> tuple[np.ndarray, list[dict], dict[str, torch.Tensor]]:
    model, history = train_sasrec(sequences, n_items, cfg.sasrec)
    exclude = seen_mask(seen, n_items) if cfg.exclude_seen else None
    return sasrec_rank(model, histories, cfg.top_k, exclude), history, model.state_dict()


def start_sasrec(rows: dict[str, Any], sequences: list[list[int]], n_items: int, cfg: EvalConfig) -> Any:
    """Train and rank SASRec in a Ray task (it is the slow baseline); returns an ObjectRef of
    ((B, top_k) ranked, per-epoch history, the trained weights)."""
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


# Target popularity buckets: how often the test target is a training interaction (docs/results.md, "Where").
BUCKETS: tuple[tuple[str, int, float], ...] = (("0", 0, 0), ("1-4", 1, 4), ("5-19", 5, 19), ("20+", 20, float("inf")))


def bucket_scores(ranked: np.ndarray, targets: np.ndarray, counts: np.ndarray, ks: tuple[int, ...]) -> dict[str, dict]:
    """ranked: (B, K); targets: (B,); counts: (n_items,) training counts (`popularity_counts`).
    Returns {bucket: {"users", "share", "hr@K", "ndcg@K"...}} for the buckets that hold users."""
    c = counts[targets]
    out = {}
    for name, lo, hi in BUCKETS:
        sel = (c >= lo) & (c <= hi)
        if sel.any():
            out[name] = {"users": int(sel.sum()), "share": round(float(sel.mean()), 4),
                         **score(ranked[sel], targets[sel], ks)}
    return out
