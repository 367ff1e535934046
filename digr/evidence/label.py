"""Label stage (RLDI, DeepInterestGR): a small classifier labels each mined intent good or bad,
and every item gets an intent quality q_i for the RL reward's bonus.

Where the training labels come from (both reproducible, both recorded per descriptor):
  1. documented rules (`rule_label`): clear-cut cases only, each with a named reason;
  2. optionally an LLM judge (`LabelConfig.judges`, any `digr.evidence.llm` backend) on a seeded sample
     of items (`judge_items`); its label overrides the rules' where both exist.
The classifier (`IntentClassifier`: logistic regression over the descriptor's sentence
embedding, its cosine to the item's title, and a few surface features) learns from those
labels and scores every descriptor, including the ones no rule or judge labelled. A held-out
fifth of the labelled descriptors gives its accuracy, reported in the stage's stats.

q_i = sum_j c_j * p_j / sum_j c_j over the item's descriptors j (c_j the mined confidence,
p_j the classifier's P(good)); null for an item without a usable descriptor (the RL bonus
then pays nothing: an unknown quality is not a good one).

Artifacts: labels.parquet (one row per descriptor: item_idx, item_id, intent, confidence,
rule_label, rule_reason, judge_label, p_good, label), quality.parquet (item_idx, item_id, q,
n_intents), classifier.pt + classifier.json, judge_failures.parquet (item_id, model, raw, reason).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import torch

from digr.evidence.llm import LLMConfig, build_backend
from digr.evidence.mine import ITEM_FIELDS, EmbedFn, embed_unique, item_record, load_prompt, make_embedder
from digr.platform import storage
from digr.platform.config import to_dict

LABELS_SCHEMA = pa.schema([
    ("item_idx", pa.int32()), ("item_id", pa.string()), ("intent", pa.string()), ("confidence", pa.float64()),
    ("rule_label", pa.int8()), ("rule_reason", pa.string()), ("judge_label", pa.int8()),
    ("p_good", pa.float64()), ("label", pa.int8()),
])
QUALITY_SCHEMA = pa.schema([("item_idx", pa.int32()), ("item_id", pa.string()), ("q", pa.float64()),
                            ("n_intents", pa.int32())])
JUDGE_FAILURES_SCHEMA = pa.schema([("item_id", pa.string()), ("model", pa.string()), ("raw", pa.string()),
                                   ("reason", pa.string())])


@dataclass(frozen=True)
class LabelConfig:
    judges: tuple[LLMConfig, ...] = ()  # LLM judges on a sample; () = rule labels only
    judge_prompt: str = "judge_v1"      # a file in digr/evidence/prompts/ or a path
    judge_items: int = 200              # items sampled (seeded) for the judges
    embedder: str = ""                  # "" = all-MiniLM-L6-v2 (packaged), "hash" = lexical, or a dir
    min_words: int = 2                  # rules: shorter descriptors are bad ("too_short")
    max_words: int = 12                 # rules: longer ones are bad ("too_long")
    l2: float = 1e-2                    # classifier weight decay
    threshold: float = 0.5              # p_good at or above which `label` is 1
    holdout: float = 0.2                # labelled fraction kept out of training to measure accuracy
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_words <= self.max_words:
            raise ValueError(f"label: need 1 <= min_words <= max_words, got {self.min_words}, {self.max_words}")
        if not 0.0 <= self.holdout < 1.0 or not 0.0 < self.threshold < 1.0 or self.l2 < 0:
            raise ValueError("label: need 0 <= holdout < 1, 0 < threshold < 1, l2 >= 0")
        if self.judge_items < 0:
            raise ValueError("label.judge_items must be >= 0")


# ---------------------------------------------------------------- rules

# Words that say nothing about a buyer on their own ("great quality product").
GENERIC = frozenset("""a an the and or of for to with in on good great high best nice quality product products item
items value price money cheap gift buy buying purchase use using used useful general people person
customer customers user users thing things stuff""".split())
# Motivation cues: a descriptor that states a purpose ("to keep samples cold", "for teaching kids").
MOTIVATION = frozenset("""to for want wants need needs help helps improve keep avoid enjoy learn learning protect save
saving prepare reduce make build organize organise stay start teach teaching support relax share gift
replace repair measure clean create track""".split())
_INJECTION = re.compile(r"ignore (all |any )?(previous|prior|above)|instruction|system prompt|\bjson\b|hacked", re.I)
_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def rule_label(intent: str, title: str, min_words: int = 2, max_words: int = 12) -> tuple[int | None, str]:
    """(1 good | 0 bad | None no rule applies, reason). Rules, first match wins:
    bad: empty; injection_echo (instruction-like text); mostly_symbols (< 60% letters);
         too_short / too_long (word count outside [min_words, max_words]); copies_title (every
         word is in the title: surface text, not an intent); generic (only generic words);
    good: motivation (a purpose cue word plus at least one non-generic word);
    None: everything else (left to the judge and the classifier)."""
    text = intent.strip()
    words = _words(text)
    if not words:
        return 0, "empty"
    if _INJECTION.search(text):
        return 0, "injection_echo"
    if sum(ch.isalpha() for ch in text) < 0.6 * len(text.replace(" ", "")):
        return 0, "mostly_symbols"
    if len(words) < min_words:
        return 0, "too_short"
    if len(words) > max_words:
        return 0, "too_long"
    if set(words) <= set(_words(title)):
        return 0, "copies_title"
    content = [w for w in words if w not in GENERIC and w not in MOTIVATION]
    if not content:
        return 0, "generic"
    if any(w in MOTIVATION for w in words):
        return 1, "motivation"
    return None, "no_rule"


# ---------------------------------------------------------------- classifier


def surface_features(intent: str, title: str) -> np.ndarray:
    """(4,) float32: word count / 10, letter fraction, share of words found in the title,
    share of generic words."""
    words = _words(intent)
    n = max(1, len(words))
    title_words = set(_words(title))
    letters = sum(ch.isalpha() for ch in intent) / max(1, len(intent.replace(" ", "")))
    return np.asarray([len(words) / 10, letters, sum(w in title_words for w in words) / n,
                       sum(w in GENERIC for w in words) / n], np.float32)


def features(intents: list[str], titles: list[str], embed: EmbedFn) -> np.ndarray:
    """(n, d + 5) float32: [descriptor embedding (d), cosine to its item's title, surface (4)]."""
    if not intents:
        return np.zeros((0, 0), np.float32)
    vec = embed_unique(intents + titles, embed)
    e = np.stack([vec[t] for t in intents])
    cos = np.einsum("nd,nd->n", e, np.stack([vec[t] for t in titles]))[:, None]
    surf = np.stack([surface_features(i, t) for i, t in zip(intents, titles)])
    return np.concatenate([e, cos, surf], axis=1).astype(np.float32)


class IntentClassifier(torch.nn.Module):
    """Logistic regression: (n, f) features -> (n,) logit of P(good). Hand-fitted with full-batch
    L-BFGS, because a linear probe on a few thousand rows needs nothing more."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)

    def prob(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return torch.sigmoid(self(torch.from_numpy(x))).numpy().astype(np.float64)


def fit_classifier(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 100) -> IntentClassifier:
    """x: (n, f) float32, y: (n,) {0, 1} with both classes present -> fitted classifier."""
    if len(set(y.tolist())) < 2:
        raise ValueError(f"label: the classifier needs good and bad examples; all {len(y)} labels are {int(y[0])}")
    clf = IntentClassifier(x.shape[1])
    torch.nn.init.zeros_(clf.linear.weight)  # convex problem: start from zero, no global RNG touched
    torch.nn.init.zeros_(clf.linear.bias)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    pos = float(yt.mean())
    weight = torch.where(yt > 0, 0.5 / pos, 0.5 / (1 - pos))  # balanced classes
    opt = torch.optim.LBFGS(clf.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(clf(xt), yt, reduction="none") * weight).mean()
        loss = loss + l2 * clf.linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def item_quality(confidences: list[float], p_good: list[float]) -> float | None:
    """q_i = sum c_j p_j / sum c_j; None without descriptors (or with zero total confidence)."""
    total = float(sum(confidences))
    if not confidences or total <= 0:
        return None
    return float(sum(c * p for c, p in zip(confidences, p_good)) / total)


# ---------------------------------------------------------------- judge


def judge_messages(template: Any, row: dict[str, Any], intents: list[str]) -> list[dict[str, str]]:
    """Chat messages asking one judge to mark each of `intents` good or bad for the item."""
    from digr.evidence.mine import render_messages

    listed = {**row, "candidate_intents": " | ".join(f"{k + 1}. {t}" for k, t in enumerate(intents))}
    return render_messages(template, listed, (*ITEM_FIELDS, "candidate_intents"))


def parse_judgement(raw: str, n: int) -> tuple[list[int] | None, str]:
    """'{"labels": [1, 0, ...]}' with exactly n entries of 0/1 (or true/false) -> (labels, "")
    or (None, reason)."""
    start, end = raw.find("{"), raw.rfind("}")
    if start < 0 or end < start:
        return None, "no JSON object"
    try:
        obj = json.loads(raw[start:end + 1])
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg}"
    labels = obj.get("labels") if isinstance(obj, dict) else None
    if not isinstance(labels, list):
        return None, "no 'labels' list"
    if len(labels) != n:
        return None, f"{len(labels)} labels for {n} intents"
    out = []
    for v in labels:
        if v in (0, 1, True, False):
            out.append(int(v))
        else:
            return None, f"label {v!r} is not 0/1"
    return out, ""


def run_judges(rows: list[dict[str, Any]], intents: dict[str, list[str]], cfg: LabelConfig,
               log: Callable[[str], None] = print) -> tuple[dict[tuple[str, str], int], list[dict[str, Any]]]:
    """Ask every judge about a seeded sample of `cfg.judge_items` items that have intents.
    -> ({(item_id, intent): 1|0} by majority over judges, ties bad; failure rows)."""
    import ray

    template = load_prompt(cfg.judge_prompt)
    candidates = [r for r in rows if intents.get(str(r["item_id"]))]
    rng = np.random.default_rng(cfg.seed)
    sample = [candidates[i] for i in sorted(rng.permutation(len(candidates))[: cfg.judge_items])]
    votes: dict[tuple[str, str], list[int]] = {}
    failures: list[dict[str, Any]] = []
    for judge in cfg.judges:
        backend = build_backend(judge)
        backend.prepare()
        ids = [str(r["item_id"]) for r in sample]
        msgs = [json.dumps(judge_messages(template, r, intents[i])) for r, i in zip(sample, ids)]
        log(f"[label] judge {judge.display_name()}: {len(ids)} items")
        ds = ray.data.from_arrow(pa.table({"item_id": ids, "messages_json": msgs}))
        for r in backend.map(ds).take_all():
            item_id, raw, err = str(r["item_id"]), r["generated_text"] or "", r["error"] or ""
            labels, reason = (None, err) if err else parse_judgement(raw, len(intents[item_id]))
            if labels is None:
                failures.append({"item_id": item_id, "model": judge.display_name(), "raw": raw, "reason": reason})
                continue
            for text, lab in zip(intents[item_id], labels):
                votes.setdefault((item_id, text), []).append(lab)
    return {k: int(sum(v) * 2 > len(v)) for k, v in votes.items()}, failures


# ---------------------------------------------------------------- stage


def run_label(items: pa.Table, intents_table: pa.Table, cfg: LabelConfig, out_dir: str,
              embed: EmbedFn | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Label every mined descriptor and write the stage's artifacts under `out_dir`; returns stats."""
    items_by_id = {str(r["item_id"]): r for r in items.to_pylist()}
    descs: list[dict[str, Any]] = []
    per_item: dict[str, list[str]] = {}
    for row in intents_table.sort_by("item_idx").to_pylist():
        item_id = str(row["item_id"])
        title = str((items_by_id.get(item_id) or {}).get("title") or "")
        for d in row["intents"] or []:
            lab, reason = rule_label(d["intent"], title, cfg.min_words, cfg.max_words)
            descs.append({"item_idx": row["item_idx"], "item_id": item_id, "intent": d["intent"],
                          "confidence": float(d["confidence"]), "rule_label": lab, "rule_reason": reason,
                          "judge_label": None, "title": title})
            per_item.setdefault(item_id, []).append(d["intent"])

    judge_failures: list[dict[str, Any]] = []
    if cfg.judges and cfg.judge_items:
        judged, judge_failures = run_judges(list(items_by_id.values()), per_item, cfg, log)
        for d in descs:
            d["judge_label"] = judged.get((d["item_id"], d["intent"]))

    target = np.asarray([d["judge_label"] if d["judge_label"] is not None else
                         d["rule_label"] if d["rule_label"] is not None else -1 for d in descs], np.int64)
    stats: dict[str, Any] = {"descriptors": len(descs), "rule_labelled": int(sum(d["rule_label"] is not None for d in descs)),
                             "judge_labelled": int(sum(d["judge_label"] is not None for d in descs)),
                             "judge_failures": len(judge_failures),
                             "rule_reasons": {}}
    for d in descs:
        stats["rule_reasons"][d["rule_reason"]] = stats["rule_reasons"].get(d["rule_reason"], 0) + 1
    labelled = np.flatnonzero(target >= 0)
    stats["labelled_good_share"] = float((target[labelled] == 1).mean()) if len(labelled) else None

    p_good = np.full(len(descs), np.nan)
    if descs:
        x = features([d["intent"] for d in descs], [d["title"] for d in descs], embed or make_embedder(cfg.embedder))
        y = target[labelled]
        if len(set(y.tolist())) == 2:
            rng = np.random.default_rng(cfg.seed)
            order = rng.permutation(labelled)
            n_hold = int(round(len(order) * cfg.holdout))
            hold, train = order[:n_hold], order[n_hold:]
            if len(set(target[train].tolist())) < 2:  # too few to split: train on all, report no held-out figure
                train, hold = order, order[:0]
            clf = fit_classifier(x[train], target[train], cfg.l2)
            p_good = clf.prob(x)
            stats["classifier"] = {
                "train_rows": len(train), "holdout_rows": len(hold),
                "train_accuracy": float(((p_good[train] >= cfg.threshold) == target[train]).mean()),
                "holdout_accuracy": float(((p_good[hold] >= cfg.threshold) == target[hold]).mean()) if len(hold) else None,
            }
            buf = storage_bytes(clf.state_dict())
            storage.write_bytes(storage.join(out_dir, "classifier.pt"), buf)
        else:
            # One class only (or none): no classifier can be fitted. Labelled rows keep their
            # label as the probability; the rest get the labelled share, and the stats say so.
            prior = float(y.mean()) if len(y) else 0.5
            p_good = np.where(target >= 0, target, prior).astype(np.float64)
            stats["classifier"] = {"skipped": f"labels of {len(set(y.tolist()))} class(es) only; "
                                              f"unlabelled descriptors get the prior {prior:.3f}"}
    storage.write_json(storage.join(out_dir, "classifier.json"), {"config": to_dict(cfg), **stats})

    for d, p in zip(descs, p_good):
        d["p_good"] = float(p)
        d["label"] = int(p >= cfg.threshold)
        del d["title"]
    storage.write_table(storage.join(out_dir, "labels.parquet"), pa.Table.from_pylist(descs, schema=LABELS_SCHEMA))

    by_item: dict[str, tuple[list[float], list[float]]] = {}
    for d in descs:
        c, p = by_item.setdefault(d["item_id"], ([], []))
        c.append(d["confidence"])
        p.append(d["p_good"])
    quality = []
    for row in intents_table.sort_by("item_idx").select(["item_idx", "item_id"]).to_pylist():
        c, p = by_item.get(str(row["item_id"]), ([], []))
        quality.append({**row, "q": item_quality(c, p), "n_intents": len(c)})
    storage.write_table(storage.join(out_dir, "quality.parquet"), pa.Table.from_pylist(quality, schema=QUALITY_SCHEMA))
    storage.write_table(storage.join(out_dir, "judge_failures.parquet"),
                        pa.Table.from_pylist(judge_failures, schema=JUDGE_FAILURES_SCHEMA))
    qs = [r["q"] for r in quality if r["q"] is not None]
    stats["items"] = len(quality)
    stats["items_with_q"] = len(qs)
    stats["mean_q"] = float(np.mean(qs)) if qs else None
    return stats


def storage_bytes(state: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_quality(label_dir: str) -> dict[int, float]:
    """item_idx -> q_i for items that have one (quality.parquet of a label stage)."""
    t = storage.read_table(storage.join(label_dir, "quality.parquet"))
    return {int(i): float(q) for i, q in zip(t["item_idx"].to_pylist(), t["q"].to_pylist()) if q is not None}


def label_stage(cfg: LabelConfig, ingest_dir: str, mine_dir: str, out: str) -> dict[str, Any]:
    """Stage body: ingest/items.parquet + mine/intents.parquet -> label/ artifacts."""
    items = storage.read_table(storage.join(ingest_dir, "items.parquet"))
    intents = storage.read_table(storage.join(mine_dir, "intents.parquet"))
    t0 = time.time()
    stats = run_label(items, intents, cfg, out)
    stats["seconds"] = round(time.time() - t0, 2)
    return {"rows": {"descriptors": stats["descriptors"], "items_with_q": stats["items_with_q"]}, "stats": stats}

