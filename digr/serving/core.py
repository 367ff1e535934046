"""Serving core: request checks, A/B assignment, the catalogue view and responses.

Pure functions and small classes the Ray Serve application (`serve/app.py`) wraps; nothing
here imports Ray, so every rule below is unit-tested without a cluster.

A/B assignment is sticky and stateless: a user goes to the variant whose cumulative weight
interval holds u = sha256(salt + ":" + user_id) / 2^256 in [0, 1). Changing the weights moves
only the users whose u falls in a changed interval; changing the salt reshuffles everyone.
Requests without a user_id are assigned by their request id (not sticky, by definition).
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RequestError(ValueError):
    """A client error: `status` is the HTTP status, the message names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Variant:
    name: str
    model_dir: str      # a saved SFT/GRPO model (`digr.rec.sft.save_model`)
    weight: float = 1.0


@dataclass(frozen=True)
class ServeConfig:
    run_dir: str = ""                       # a finished pipeline run: ingest/items.parquet, tokenize/trie.npz
    variants: tuple[Variant, ...] = ()      # () = one variant "sft" from <run_dir>/sft/model
    salt: str = "digr-ab-1"
    beam_size: int = 20
    max_k: int = 50
    max_history: int = 0                    # items the model reads; 0 = the model's training window (from its dir)
    max_request_items: int = 1000           # longest history accepted in a request
    max_id_length: int = 128                # characters of an item id in a request (user ids: 256)
    max_add_items: int = 100                # items in one POST /items
    # A transport guard above every body the documented contract allows (serve/README.md, /openapi.json):
    # 1000 ids x 128 characters, each up to 12 bytes as JSON escapes, is 1.5 MB; 100 items to add, 4 MB.
    max_body_bytes: int = 8 * 2**20
    auth_token_env: str = ""                # name of an env var holding a bearer token; "" = no auth
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    max_queued_requests: int = 128         # per model replica; beyond it requests get 503 (no unbounded backlog)
    # Overload is shed, not queued: a gateway replica serving `Admission.limit` /recommend requests
    # answers the next at once with 503 + Retry-After. The limit follows its model calls' latency
    # (p90 above shed_latency_s shrinks it, below lets it grow), between min_inflight and max_inflight;
    # shed_latency_s = 0 keeps it at max_inflight. A model answer slower than request_timeout_s is a
    # 503 too. With gateway_max_queued >= 0, requests beyond it waiting in the proxy get Serve's own 503.
    max_inflight: int = 64
    min_inflight: int = 16                  # one full model batch (max_batch_size): fewer only idles the model
    shed_latency_s: float = 0.2
    # -1 = unbounded: Serve's own 503 has a plain-text body, not the contract's JSON with a request id.
    gateway_max_queued: int = -1
    request_timeout_s: float = 5.0
    retry_after_s: int = 1
    additions_dir: str = ""                 # journal of items added while serving (local or s3://); "" = memory only
    # Ray actor options of every model replica, e.g. {num_gpus: 1} or {resources: {...}}; a Serve
    # config's `deployments: [{name: model_<variant>, ray_actor_options: ...}]` overrides per variant.
    model_ray_actor_options: dict[str, Any] = field(default_factory=dict)
    # How long a model replica that is being stopped (scale-down, update, delete) may finish its
    # requests before it is killed; also how long deleting a replica that never got a node takes.
    model_graceful_shutdown_timeout_s: float = 20.0  # Ray Serve's default
    # Exposure and feedback logs (`digr.serving.events`): JSONL shards under <events_dir>/exposures
    # and /feedback (local or s3://), written off the request path every events_flush_s; at most
    # events_buffer rows wait per log and replica, more are dropped and counted. "" = no logs.
    events_dir: str = ""
    events_flush_s: float = 1.0
    events_buffer: int = 10_000

    def __post_init__(self) -> None:
        if self.max_k < 1 or self.beam_size < 1:
            raise ValueError(f"serve: need max_k >= 1 and beam_size >= 1, got {self.max_k}, {self.beam_size}")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"serve.variants: duplicate names {names}")
        if any(v.weight < 0 for v in self.variants) or (self.variants and sum(v.weight for v in self.variants) <= 0):
            raise ValueError("serve.variants: weights must be >= 0 with a positive sum")
        if self.max_inflight < 1 or not self.request_timeout_s > 0 or self.retry_after_s < 0:
            raise ValueError(f"serve: need max_inflight >= 1, request_timeout_s > 0, retry_after_s >= 0, got "
                             f"{self.max_inflight}, {self.request_timeout_s}, {self.retry_after_s}")
        if not 1 <= self.min_inflight <= self.max_inflight or self.shed_latency_s < 0 or self.gateway_max_queued < -1:
            raise ValueError(f"serve: need 1 <= min_inflight <= max_inflight, shed_latency_s >= 0 and "
                             f"gateway_max_queued >= -1, got {self.min_inflight}, {self.max_inflight}, "
                             f"{self.shed_latency_s}, {self.gateway_max_queued}")
        if not self.events_flush_s > 0 or self.events_buffer < 1:
            raise ValueError(f"serve: need events_flush_s > 0 and events_buffer >= 1, got {self.events_flush_s}, "
                             f"{self.events_buffer}")
        if not self.model_graceful_shutdown_timeout_s >= 0:
            raise ValueError(f"serve.model_graceful_shutdown_timeout_s must be >= 0, "
                             f"got {self.model_graceful_shutdown_timeout_s}")


def unit_hash(salt: str, key: str) -> float:
    """sha256(salt:key) as a float in [0, 1)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_variant(key: str, weights: dict[str, float], salt: str) -> str:
    """The variant for `key` (a user id) under `weights` (name -> weight >= 0, positive sum),
    by cumulative intervals in the order given."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("variant weights must have a positive sum")
    u = unit_hash(salt, key) * total
    acc = 0.0
    name = next(iter(weights))
    for name, w in weights.items():
        acc += w
        if u < acc:
            return name
    return name  # u == total only through rounding: the last variant


class Admission:
    """How many /recommend requests one gateway replica admits at once: the rest are shed.

    A fixed cap cannot be right for every model and machine: 64 in flight is 0.6 s of queue at
    110 requests/s and nothing at 1,000. So the limit follows the latency the replica itself
    sees, as TCP Vegas and Netflix's concurrency-limits do: every `every` completed requests,
    if their p90 latency is above `target_s` the limit shrinks in proportion,
    limit * target_s / p90 (queueing is what pushes latency past the target); at or below it
    the limit grows by one. It stays in [min_limit, max_limit]. `target_s` = 0 keeps it at
    max_limit. The latency is the model call's, not the whole request's: on a saturated machine
    the gateway's own event loop slows with the traffic it sheds, and a limit steered by that
    would fall to min_limit and shed what the model could serve. Written by hand: Ray Serve
    bounds queues by count (max_queued_requests), not by latency.
    """

    def __init__(self, target_s: float, min_limit: int, max_limit: int, every: int = 16) -> None:
        self.target_s, self.min_limit, self.max_limit, self.every = target_s, min_limit, max_limit, every
        self.limit = max_limit
        self.inflight = 0
        self._latencies: list[float] = []

    def admit(self) -> bool:
        """True (and counted in flight) when one more request fits under the limit."""
        if self.inflight >= self.limit:
            return False
        self.inflight += 1
        return True

    def done(self, latency_s: float | None) -> None:
        """An admitted request finished; `latency_s`: its model call's seconds (None: it made none,
        e.g. a bad request or a cold-start fallback, and says nothing about the queue)."""
        self.inflight -= 1
        if self.target_s <= 0 or latency_s is None:
            return
        self._latencies.append(latency_s)
        if len(self._latencies) < self.every:
            return
        p90 = float(np.percentile(self._latencies, 90))
        self._latencies.clear()
        if p90 > self.target_s:
            self.limit = max(self.min_limit, int(self.limit * self.target_s / p90))
        else:
            self.limit = min(self.max_limit, self.limit + 1)


@dataclass(frozen=True)
class Request:
    history: tuple[str, ...]
    k: int = 10
    user_id: str | None = None
    exclude_seen: bool = True


MAX_USER_ID = 256
INT64 = (-(2**63), 2**63 - 1)  # integer item ids are accepted in this range


def parse_request(body: Any, max_k: int, max_items: int, max_id_length: int = 128) -> Request:
    """A decoded JSON body -> Request, or RequestError naming the field (400, or 422 for types)."""
    if not isinstance(body, dict):
        raise RequestError(400, "body: expected a JSON object")
    unknown = sorted(set(body) - {"history", "k", "user_id", "exclude_seen"})
    if unknown:
        raise RequestError(400, f"{unknown[0]}: unknown field (known: history, k, user_id, exclude_seen)")
    if "history" not in body:
        raise RequestError(400, "history: required (a list of item ids, oldest first; may be empty)")
    history = body["history"]
    if not isinstance(history, list):
        raise RequestError(422, "history: expected a list of item ids (strings)")
    # JSON has one number type: 12.0 is the integer 12 (as JSON Schema counts it), so it is id "12".
    history = [int(x) if isinstance(x, float) and x.is_integer() else x for x in history]
    if not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in history):
        raise RequestError(422, "history: expected a list of item ids (strings)")
    if len(history) > max_items:
        raise RequestError(400, f"history: {len(history)} items is over the limit of {max_items}")
    for n, x in enumerate(history):
        if isinstance(x, str) and len(x) > max_id_length:
            raise RequestError(400, f"history[{n}]: {len(x)} characters is over the limit of {max_id_length}")
        if isinstance(x, int) and not INT64[0] <= x <= INT64[1]:
            raise RequestError(422, f"history[{n}]: an integer id must fit in 64 bits")
    k = body.get("k", min(10, max_k))
    k = int(k) if isinstance(k, float) and k.is_integer() else k  # 5.0 is the integer 5 in JSON
    if not isinstance(k, int) or isinstance(k, bool):
        raise RequestError(422, f"k: expected an integer, got {k!r}")
    if not 1 <= k <= max_k:
        raise RequestError(400, f"k: must be between 1 and {max_k}, got {k}")
    user_id = body.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise RequestError(422, "user_id: expected a string")
    if user_id is not None and len(user_id) > MAX_USER_ID:
        raise RequestError(400, f"user_id: {len(user_id)} characters is over the limit of {MAX_USER_ID}")
    exclude = body.get("exclude_seen", True)
    if not isinstance(exclude, bool):
        raise RequestError(422, "exclude_seen: expected true or false")
    return Request(history=tuple(str(x) for x in history), k=k, user_id=user_id, exclude_seen=exclude)


# POST /items: the fields of an item to add and their longest accepted length (characters).
ITEM_FIELDS = {"item_id": 128, "title": 512, "brand": 128, "categories": 512, "description": 2048}


def parse_items(body: Any, max_add_items: int) -> list[dict[str, str]]:
    """A decoded POST /items body -> the item rows, or RequestError naming the field."""
    rows = body.get("items") if isinstance(body, dict) else None
    if not isinstance(body, dict) or set(body) - {"items"}:
        raise RequestError(400, "body: expected {\"items\": [...]} and nothing else")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise RequestError(400, "items: expected a non-empty list of objects")
    if len(rows) > max_add_items:
        raise RequestError(400, f"items: {len(rows)} is over the limit of {max_add_items} a request")
    for n, r in enumerate(rows):
        unknown = sorted(set(r) - set(ITEM_FIELDS))
        if unknown:
            raise RequestError(400, f"items[{n}].{unknown[0]}: unknown field (known: {', '.join(ITEM_FIELDS)})")
        for f, limit in ITEM_FIELDS.items():
            v = r.get(f)
            if v is None and f not in ("item_id", "title"):
                continue
            if not isinstance(v, str):
                raise RequestError(400, f"items[{n}].{f}: {'required, ' if f in ('item_id', 'title') else ''}a string")
            if len(v) > limit:
                raise RequestError(400, f"items[{n}].{f}: {len(v)} characters is over the limit of {limit}")
        if not r["item_id"]:
            raise RequestError(400, f"items[{n}].item_id: required, a non-empty string")
        if not r["title"].strip():
            raise RequestError(400, f"items[{n}].title: required, a non-empty string")
    return rows


@dataclass
class Catalogue:
    """Item ids, titles, SIDs and (optional) mined intents, indexed by item_idx; popularity
    for the cold-start list. Grows only through `add` (items added while serving, frozen tokenizer)."""

    item_ids: list[str]
    titles: list[str]
    sids: np.ndarray                                 # (N, sid_len) int64 codes
    intents: list[list[str]] = field(default_factory=list)
    popular: list[int] = field(default_factory=list)  # item_idx, most popular first
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {i: n for n, i in enumerate(self.item_ids)}
        if not self.intents:
            self.intents = [[] for _ in self.item_ids]

    def resolve(self, history: tuple[str, ...], window: int) -> tuple[list[int], list[str], bool]:
        """-> (item_idx of the known ids, oldest first, cut to the last `window`; the unknown
        ids in request order; whether the known history was longer than the window)."""
        known = [self.index[i] for i in history if i in self.index]
        unknown = [i for i in history if i not in self.index]
        return known[-window:], unknown, len(known) > window

    def item(self, idx: int, score: float | None) -> dict[str, Any]:
        return {"item_id": self.item_ids[idx], "sid": [int(c) for c in self.sids[idx]], "score": score,
                "title": self.titles[idx], "intents": self.intents[idx]}

    def check_new(self, item_ids: list[str]) -> None:
        """RequestError 409 unless every id is new and listed once."""
        clash = [i for i in item_ids if i in self.index] + [i for n, i in enumerate(item_ids) if i in item_ids[:n]]
        if clash:
            raise RequestError(409, f"items: item_id {clash[0]!r} already exists")

    def add(self, item_ids: list[str], titles: list[str], sids: np.ndarray) -> list[int]:
        """Append new items (ids must be new); -> their item_idx."""
        self.check_new(item_ids)
        start = len(self.item_ids)
        self.item_ids += item_ids
        self.titles += titles
        self.intents += [[] for _ in item_ids]
        self.sids = np.concatenate([self.sids, sids])
        self.index.update({i: start + n for n, i in enumerate(item_ids)})
        return list(range(start, start + len(item_ids)))

    def fallback(self, k: int, exclude: set[int]) -> list[dict[str, Any]]:
        """The most popular items not in `exclude` (cold start)."""
        return [self.item(i, None) for i in self.popular if i not in exclude][:k]


@dataclass(frozen=True)
class Addition:
    """One accepted POST /items batch: everything a replica needs to serve the new items."""

    start: int                    # item_idx of the first item
    item_ids: tuple[str, ...]
    titles: tuple[str, ...]
    sids: tuple[tuple[int, ...], ...]          # full SIDs (codes + suffix)
    vectors: tuple[tuple[float, ...], ...]     # content vectors (the model's item features)


class AdditionConflict(RuntimeError):
    """The log grew since the writer last synced: re-sync, recompute the SIDs, try again."""


class AdditionLog:
    """Append-only journal of the items added while serving: the single authority every
    gateway and model replica syncs from, so all replicas (and replicas the autoscaler starts
    later) serve the same catalogue. Optimistic concurrency: `append(..., known)` is refused
    unless `known` is the current size, so two writers can never hand out the same item_idx
    or the same collision suffix. Hosted in a named Ray actor by `serve/app.py`; pure here.

    journal: a folder (local or s3://) where every accepted batch is written, as
    `batch-<start>.json`, before the append is acknowledged; a new log replays it, so added
    items survive a cluster restart. "" keeps the log in memory only."""

    def __init__(self, base: int, journal: str = "") -> None:
        if base < 0:
            raise ValueError(f"AdditionLog: base must be >= 0, got {base}")
        self.base = base              # items in the trained catalogue
        self.journal = journal
        self.batches: list[Addition] = []
        if journal:
            from digr.platform import storage

            for uri in storage.list_files(journal, ".json"):
                d = storage.read_json(uri)
                if d.get("start") != self.size():
                    raise ValueError(f"{uri}: starts at item {d.get('start')}, the journal before it ends at "
                                     f"{self.size()} (a file is missing, or the journal is another run's)")
                self.batches.append(Addition(d["start"], tuple(d["item_ids"]), tuple(d["titles"]),
                                             tuple(tuple(s) for s in d["sids"]), tuple(tuple(v) for v in d["vectors"])))

    def size(self) -> int:
        return self.base + sum(len(b.item_ids) for b in self.batches)

    def append(self, known: int, item_ids: list[str], titles: list[str], sids: list[list[int]],
               vectors: list[list[float]]) -> int:
        """Add one batch computed against a catalogue of `known` items -> its first item_idx."""
        if known != self.size():
            raise AdditionConflict(f"catalogue has {self.size()} items, the writer knew {known}")
        if not (len(item_ids) == len(titles) == len(sids) == len(vectors)) or not item_ids:
            raise ValueError("AdditionLog.append: need equally long, non-empty item_ids, titles, sids, vectors")
        seen = {i for b in self.batches for i in b.item_ids}
        clash = [i for i in item_ids if i in seen]
        if clash:
            raise ValueError(f"item_id {clash[0]!r} was already added")
        batch = Addition(known, tuple(item_ids), tuple(titles), tuple(tuple(map(int, s)) for s in sids),
                         tuple(tuple(map(float, v)) for v in vectors))
        if self.journal:  # written first: an acknowledged batch is never lost
            from digr.platform import storage

            storage.write_json(storage.join(self.journal, f"batch-{known:09d}.json"), dataclasses.asdict(batch))
        self.batches.append(batch)
        return known

    def since(self, known: int) -> list[Addition]:
        """The batches a replica holding `known` items lacks (`known` is a batch boundary,
        since replicas apply whole batches)."""
        if known < self.base:
            raise ValueError(f"AdditionLog.since: a replica cannot know fewer than the {self.base} trained items")
        if known > self.size():
            raise ValueError(f"AdditionLog.since: a replica knows {known} items, the log only {self.size()} "
                             "(the log was lost: restart the application)")
        out = [b for b in self.batches if b.start >= known]
        if known != self.size() and (not out or out[0].start != known):
            raise ValueError(f"AdditionLog.since: {known} is not a batch boundary")
        return out


def popularity_order(sequences: list[list[int]], n_items: int) -> list[int]:
    """item_idx by interaction count (training interactions: all but each user's last two), ties by index."""
    counts = np.zeros(n_items, np.int64)
    for s in sequences:
        for i in s[:-2]:
            counts[i] += 1
    return [int(i) for i in np.lexsort((np.arange(n_items), -counts))]


def extend_sids(new_codes: np.ndarray, existing: np.ndarray, suffix_size: int) -> np.ndarray:
    """New items' RQ-VAE codes (M, levels) -> full SIDs (M, levels + 1): each gets the smallest
    suffix no existing (or earlier new) item with the same codes uses. Raises when a suffix
    would not fit the model's vocabulary (`suffix_size`): that item needs a retrained model.
    existing: (N, levels + 1) SIDs of the catalogue."""
    levels = existing.shape[1] - 1
    if new_codes.ndim != 2 or new_codes.shape[1] != levels:
        raise ValueError(f"new codes must be (M, {levels}), got {new_codes.shape}")
    # Only the existing items that share a new item's codes matter: found with vectorised
    # row comparisons (a few ms at 1M items), so the Python part is O(M + matches), not O(N).
    radix = int(max(existing[:, :levels].max(initial=0), new_codes.max(initial=0))) + 1
    def keys(codes: np.ndarray) -> np.ndarray:
        key = np.zeros(len(codes), np.int64)
        for level in range(levels):
            key = key * radix + codes[:, level]
        return key
    match = np.flatnonzero(np.isin(keys(existing), keys(new_codes)))
    used: dict[tuple[int, ...], set[int]] = {}
    for row in existing[match].tolist():
        used.setdefault(tuple(row[:levels]), set()).add(row[levels])
    out = np.empty((len(new_codes), levels + 1), np.int64)
    for m, row in enumerate(new_codes.tolist()):
        taken = used.setdefault(tuple(row), set())
        suffix = next(s for s in range(len(taken) + 1) if s not in taken)
        if suffix >= suffix_size:
            raise ValueError(f"new item {m}: its codes {row} are already used by {len(taken)} items and the model "
                             f"has {suffix_size} suffix codes; serving it needs a retrained model")
        taken.add(suffix)
        out[m] = [*row, suffix]
    return out


class FrozenTokenizer:
    """The run's embed + tokenize stages, frozen: new item rows -> content vectors and SIDs,
    without training anything. Reads <run>/manifest.json (embed and tokenize configs) and
    <run>/tokenize/rqvae.pt."""

    def __init__(self, run_dir: str) -> None:
        import io

        import torch

        from digr.evidence.embed import EmbedConfig, TextEmbedder, default_model_path
        from digr.platform import storage
        from digr.platform.config import from_dict
        from digr.tokenizer.rqvae import RQVAE, RQVAEConfig

        config = storage.read_json(storage.join(run_dir, "manifest.json"))["config"]
        self.embed_cfg = from_dict(EmbedConfig, config.get("embed", {}))
        if self.embed_cfg.evidence:
            raise ValueError(f"new items: the run embeds evidence {list(self.embed_cfg.evidence)}, which new items do "
                             "not have yet (mine them first); only text-only runs can add items at serving time")
        if config.get("tokenize", {}).get("labels", "residual") != "residual":
            raise ValueError("new items: the run's SIDs use tokenize.labels="
                             f"{config['tokenize']['labels']!r}, where a new item's prefix has no token in the "
                             "trained vocabulary; only runs with tokenize.labels=residual can add items at serving time")
        rq_cfg = from_dict(RQVAEConfig, config.get("tokenize", {}).get("rqvae", {}))
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(run_dir, "tokenize", "rqvae.pt"))),
                           map_location="cpu")
        self.embedder = TextEmbedder(self.embed_cfg.model or default_model_path(), self.embed_cfg.fields,
                                     self.embed_cfg.max_chars, self.embed_cfg.max_tokens, device="cpu")
        self.rqvae = RQVAE(self.embedder.model.get_sentence_embedding_dimension(), rq_cfg)
        self.rqvae.load_state_dict(state)

    def __call__(self, rows: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """rows with the embed fields -> (content vectors (M, D) float32, RQ-VAE codes (M, levels))."""
        from digr.tokenizer.rqvae import assign_codes

        batch = {"item_idx": np.arange(len(rows))}
        for f in self.embed_cfg.fields:
            batch[f] = np.array([str(r.get(f) or "") for r in rows], dtype=object)
        emb = self.embedder(batch)["embedding"]
        return emb, assign_codes(self.rqvae, emb)
