"""The Ray Serve recommender: a FastAPI gateway in front of one model deployment per A/B variant.

    serve run serve/recommender.yaml       # one variant, 127.0.0.1:8000
    serve run serve/ab.yaml                # two variants, weights in user_config

`Recommender` (one per variant) loads a saved model and the trie, batches concurrent
requests with `@serve.batch`, and runs the shared constrained beam search
(`digr.rec.decode.recommend`): what it returns equals offline decoding of the same history.
`Gateway` checks the request (`digr.serving.core`), assigns the variant (sticky hash of user_id,
weights changeable in place through `user_config`, forced by the `X-Digr-Variant` header),
resolves item ids, falls back to popular items on a cold start, and tags every response and
metric with the variant. Overload is shed, not queued: each gateway replica admits as many
/recommend requests as keep its latency near `shed_latency_s` (`digr.serving.core.Admission`) and
answers the rest 503 + Retry-After at once; the model's queue is bounded, and the proxy's can be
(`gateway_max_queued`).
With `events_dir` set, every 200 from /recommend is logged as an exposure and POST /feedback
(click / purchase / dismiss on a served item) as feedback (`digr.serving.events`), written off
the request path; `jobs/abtest.py` reads both and says which variant won.
"""


import asyncio
import hashlib
import json
import logging
import os
import time
import uuid
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from digr.serving.core import (
    AdditionConflict,
    AdditionLog,
    Admission,
    Catalogue,
    RequestError,
    ServeConfig,
    Variant,
    assign_variant,
    extend_sids,
    parse_items,
    parse_request,
    popularity_order,
)
from digr.serving.events import EventSink, parse_feedback

logger = logging.getLogger("ray.serve")
VARIANT_HEADER = "x-digr-variant"
api = FastAPI(title="digr recommender", version="1", description=__doc__)


def addition_log(name: str, base: int, journal: str = "") -> Any:
    """The app's `AdditionLog` actor (created by whichever replica asks first). Detached, so
    it outlives any one replica: replicas that die, or that the autoscaler adds later, sync
    from it. It lives as long as the Ray cluster, and with a journal (`additions_dir`) its
    batches outlive the cluster too; it is named after the run directory, so the additions
    belong to that run's codebook. No CPU reserved: it only keeps lists."""
    import ray

    return ray.remote(AdditionLog).options(name=name, get_if_exists=True, lifetime="detached", num_cpus=0,
                                            max_concurrency=1).remote(base, journal)


def model_version(model_dir: str) -> str:
    """A content hash of the saved model's files (names and bytes)."""
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(model_dir)):
        for name in sorted(files):
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, model_dir).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


@serve.deployment(max_ongoing_requests=64, max_queued_requests=128, health_check_period_s=5)
class Recommender:
    """One model version: history item_idx lists -> top-k (item_idx, score) by constrained beam search."""

    def __init__(self, model_dir: str, trie_uri: str, beam_size: int, max_history: int,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005, log_name: str = "",
                 additions_dir: str = "") -> None:
        import ray

        from digr.platform import storage
        from digr.rec.decode import prepare
        from digr.rec.sft import load_model
        from digr.rec.trie import SidTrie

        self.model = load_model(model_dir).eval()
        self.trie = SidTrie.from_bytes(storage.read_bytes(trie_uri))
        self.max_history = max_history
        self.beam_size = beam_size
        self.version = model_version(model_dir)
        self.recommend_batch.set_max_batch_size(max_batch_size)
        self.recommend_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.log = addition_log(log_name, self.model.n_items, additions_dir) if log_name else None
        if self.log is not None:  # a replica started after items were added serves them too
            self._apply(ray.get(self.log.since.remote(self.model.n_items)))
        prepare(self.model, self.trie)  # the decoder's per-trie tables, so that no request builds them

    def info(self) -> dict[str, Any]:
        return {"model_version": self.version, "max_history": self.max_history, "n_items": self.model.n_items,
                "suffix_size": self.model.vocab.suffix_size}

    def _apply(self, batches: list[Any]) -> None:
        """New items (`Addition`s: SIDs from the frozen tokenizer, content vectors) appended as
        the next item_idx values: the trie and the model's item tables grow, no restart."""
        from digr.rec.decode import prepare

        n_items = self.model.n_items
        for b in batches:
            if b.start < self.model.n_items:
                continue  # applied already (batches are whole, so start < n_items means all of it)
            if b.start != self.model.n_items:
                raise RuntimeError(f"addition starts at {b.start}, the model has {self.model.n_items} items")
            codes = torch.tensor(b.sids, dtype=torch.long)
            self.model.add_items(self.model.vocab.encode(codes), torch.tensor(b.vectors, dtype=torch.float32))
            self.trie = self.trie.add(codes.numpy())
        if self.model.n_items > n_items:
            prepare(self.model, self.trie)  # the decoder's tables for the new trie

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def recommend_batch(self, requests: list[tuple[list[int], list[int], int, int]]
                              ) -> list[list[tuple[int, float]]]:
        """requests: (history item_idx cut to the window, items never to return, k, catalogue
        size the gateway knows) each -> per request [(item_idx, score)] best first. One beam
        search for the whole batch, after syncing items added since this replica last looked."""
        from digr.rec.decode import recommend

        need = max(n for *_, n in requests)
        if need > self.model.n_items and self.log is not None:
            self._apply(await self.log.since.remote(self.model.n_items))
        histories = [h for h, *_ in requests]
        top_k = min(self.beam_size, max(k for _, _, k, _ in requests))
        exclude = torch.zeros((len(requests), self.model.n_items), dtype=torch.bool)
        for row, (_, seen, _, _) in enumerate(requests):
            if seen:
                exclude[row, seen] = True
        out = recommend(self.model, self.trie, histories, self.max_history, beam_size=self.beam_size,
                        top_k=top_k, exclude=exclude)
        items, scores = out.items.tolist(), out.scores.tolist()
        return [[(i, s) for i, s in zip(items[r], scores[r]) if i >= 0][:k] for r, (_, _, k, _) in enumerate(requests)]

    async def __call__(self, history: list[int], seen: list[int], k: int, n_items: int = 0) -> list[tuple[int, float]]:
        return await self.recommend_batch((history, seen, k, n_items))


def _metrics() -> dict[str, Any]:
    from ray.serve import metrics

    tags = ("variant",)
    return {
        "requests": metrics.Counter("digr_requests", "Recommendation requests", tag_keys=tags),
        "errors": metrics.Counter("digr_errors", "Requests that failed (5xx)", tag_keys=tags),
        "fallbacks": metrics.Counter("digr_fallbacks", "Responses served from the cold-start list", tag_keys=tags),
        "latency": metrics.Histogram("digr_latency_ms", "Gateway latency (ms)",
                                     boundaries=[5, 10, 20, 50, 100, 200, 500, 1000, 2000], tag_keys=tags),
        "shed": metrics.Counter("digr_shed", "Requests answered 503 at once (the admission limit reached)", tag_keys=tags),
        "events_written": metrics.Counter("digr_events_written", "Exposure / feedback rows written", tag_keys=("kind",)),
        "events_dropped": metrics.Counter("digr_events_dropped", "Exposure / feedback rows dropped (sink slow or down)",
                                          tag_keys=("kind",)),
    }


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class Gateway:
    def __init__(self, cfg: dict[str, Any], variants: dict[str, DeploymentHandle], token: str = "",
                 log_name: str = "") -> None:
        import ray

        from digr.platform import storage
        from digr.platform.config import from_dict

        self.cfg: ServeConfig = from_dict(ServeConfig, cfg)
        self.handles = variants
        self.weights = {v.name: v.weight for v in self.cfg.variants} or {name: 1.0 for name in variants}
        run = self.cfg.run_dir
        items = storage.read_table(storage.join(run, "ingest", "items.parquet")).sort_by("item_idx")
        seqs = storage.read_table(storage.join(run, "ingest", "sequences.parquet"))["item_idx"].to_pylist()
        tok = storage.read_json(storage.join(run, "tokenize", "tokenizer.json"))
        sids = storage.read_table(storage.join(run, "tokenize", "sids.parquet")).sort_by("item_idx")
        intents = [[] for _ in range(items.num_rows)]
        mine = storage.join(run, "mine", "intents.parquet")
        if storage.exists(mine):
            for r in storage.read_table(mine).to_pylist():
                intents[r["item_idx"]] = [d["intent"] for d in r["intents"] or []]
        self.catalogue = Catalogue(item_ids=[str(x) for x in items["item_id"].to_pylist()],
                                   titles=[str(x or "") for x in items["title"].to_pylist()],
                                   sids=np.asarray(sids["sid"].to_pylist(), dtype=np.int64), intents=intents,
                                   popular=popularity_order(seqs, items.num_rows))
        self.codebook_version = str(tok.get("stats", {}).get("codebook_version", ""))
        # The token comes from the environment of whoever deploys (see `build`), or of this replica.
        self.token = token or (os.environ.get(self.cfg.auth_token_env, "") if self.cfg.auth_token_env else "")
        self.info: dict[str, dict[str, Any]] = {}
        self.metrics = _metrics()
        self.tokenizer = None  # the frozen embed + RQ-VAE, loaded on the first POST /items
        self.log = addition_log(log_name, items.num_rows, self.cfg.additions_dir) if log_name else None
        if self.log is not None:
            self._apply(ray.get(self.log.since.remote(len(self.catalogue.item_ids))))
        # /recommend requests this replica serves at once; beyond its limit they are shed.
        self.admission = Admission(self.cfg.shed_latency_s, self.cfg.min_inflight, self.cfg.max_inflight)
        self._install_contract()
        self.sinks = {kind: EventSink(self.cfg.events_dir, kind, self.cfg.events_buffer)
                      for kind in ("exposures", "feedback")} if self.cfg.events_dir else {}
        self._flusher: asyncio.Task | None = None
        self._counted = {kind: (0, 0) for kind in self.sinks}  # (written, dropped) already in the metrics

    def _install_contract(self) -> None:
        """/openapi.json with the request bodies and status codes of `digr.serving.contract`."""
        from fastapi.openapi.utils import get_openapi

        from digr.serving import contract

        def openapi() -> dict[str, Any]:
            if api.openapi_schema is None:
                api.openapi_schema = contract.apply(
                    get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes),
                    self.cfg)
            return api.openapi_schema

        api.openapi_schema = None
        api.openapi = openapi

    def _log_event(self, kind: str, row: dict[str, Any]) -> None:
        """Queue a row (never blocks, never raises); the flusher starts with the first row."""
        if kind in self.sinks:
            self.sinks[kind].record(row)
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())

    async def _flush_once(self) -> None:
        for kind, sink in self.sinks.items():
            await asyncio.to_thread(sink.flush)
            c = sink.counts()
            written, dropped = self._counted[kind]
            if c["written"] > written:
                self.metrics["events_written"].inc(c["written"] - written, tags={"kind": kind})
            if c["dropped"] > dropped:
                self.metrics["events_dropped"].inc(c["dropped"] - dropped, tags={"kind": kind})
                logger.warning("events: %d %s rows dropped so far (sink slow or down)", c["dropped"], kind)
            self._counted[kind] = (c["written"], c["dropped"])

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.events_flush_s)
            try:
                await self._flush_once()
            except Exception:  # noqa: BLE001 - keep flushing; the sink counts its own failures
                logger.exception("events: flush failed")

    def __del__(self) -> None:
        """Graceful shutdown: write what is still buffered (best effort)."""
        for sink in getattr(self, "sinks", {}).values():
            sink.flush()

    def _apply(self, batches: list[Any]) -> None:
        """Idempotent: two coroutines of this replica may fetch the same batches."""
        for b in batches:
            if b.start < len(self.catalogue.item_ids):
                continue
            self.catalogue.add(list(b.item_ids), list(b.titles), np.asarray(b.sids, dtype=np.int64).reshape(
                len(b.item_ids), -1))

    async def _sync(self) -> None:
        """Catch up with items other gateway replicas added (one actor call)."""
        if self.log is not None:
            self._apply(await self.log.since.remote(len(self.catalogue.item_ids)))

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """A/B weights in place: {"weights": {"a": 0.9, "b": 0.1}} (no redeploy)."""
        weights = {str(k): float(v) for k, v in (user_config or {}).get("weights", {}).items()}
        if weights:
            unknown = set(weights) - set(self.handles)
            if unknown or sum(weights.values()) <= 0 or min(weights.values()) < 0:
                raise ValueError(f"user_config.weights: unknown variants {sorted(unknown)} or bad weights {weights}")
            self.weights = weights

    async def _info(self, variant: str) -> dict[str, Any]:
        """The variant's model facts; RequestError 503 while its model is not up (still loading,
        or its replica died and is being replaced) instead of queueing the request behind it."""
        if variant not in self.info:
            try:
                self.info[variant] = await asyncio.wait_for(self.handles[variant].info.remote(), timeout=5.0)
            except asyncio.TimeoutError as e:
                raise RequestError(503, f"model {variant!r} is not ready, retry later") from e
        return self.info[variant]

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Liveness: the gateway process answers."""
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Readiness: every variant's model is loaded and answers."""
        try:
            self.info.clear()  # ask the models afresh: a replaced replica must answer again
            await asyncio.wait_for(asyncio.gather(*(self._info(v) for v in self.handles)), timeout=5)
        except Exception as e:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "not ready", "reason": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ready", "variants": sorted(self.handles)})

    @api.post("/items")
    async def add_items(self, request: Request) -> JSONResponse:
        """New items without retraining: {"items": [{"item_id", "title", ...embed fields}]} ->
        their SIDs from the frozen tokenizer; servable at once by every variant and replica
        (they sync from the app's `AdditionLog`)."""
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                raise RequestError(401, "authorization: missing or wrong bearer token")
            raw = await request.body()
            if len(raw) > self.cfg.max_body_bytes:
                raise RequestError(413, f"body: {len(raw)} bytes is over the limit of {self.cfg.max_body_bytes}")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body: malformed JSON ({e})") from e
            rows = parse_items(body, self.cfg.max_add_items)
            if self.tokenizer is None:
                from digr.serving.core import FrozenTokenizer

                self.tokenizer = FrozenTokenizer(self.cfg.run_dir)
            vectors, codes = self.tokenizer(rows)
            # Every variant was trained on the same SIDs, so they share the suffix range.
            suffix_size = int((await self._info(next(iter(self.handles))))["suffix_size"])
            ids, titles = [r["item_id"] for r in rows], [r["title"] for r in rows]
            for _ in range(8):  # another gateway replica may add items at the same moment
                await self._sync()
                self.catalogue.check_new(ids)
                try:
                    sids = extend_sids(codes, self.catalogue.sids, suffix_size)
                except ValueError as e:
                    raise RequestError(409, f"items: {e}") from e
                if self.log is None:
                    idx = self.catalogue.add(ids, titles, sids)
                    break
                try:
                    start = await self.log.append.remote(len(self.catalogue.item_ids), ids, titles, sids.tolist(),
                                                         vectors.tolist())
                except AdditionConflict:
                    continue
                await self._sync()  # applies this batch (unless a request of ours already synced it)
                idx = list(range(start, start + len(ids)))
                break
            else:
                raise RequestError(503, "items: the catalogue kept changing under this request, retry later")
            self.info.clear()
            out = {"request_id": request_id, "added": [{"item_id": r["item_id"], "item_idx": i, "sid": s}
                                                       for r, i, s in zip(rows, idx, sids.tolist())]}
            return JSONResponse(out)
        except RequestError as e:
            return JSONResponse({"request_id": request_id, "error": str(e)}, status_code=e.status)
        except Exception:  # noqa: BLE001
            logger.exception("request %s failed", request_id)
            return JSONResponse({"request_id": request_id, "error": "internal error"}, status_code=500)

    @api.post("/feedback")
    async def feedback(self, request: Request) -> JSONResponse:
        """What a user did with a served item: {"request_id" (of the /recommend response), "item",
        "event": "click" | "purchase" | "dismiss", "time" (optional, epoch seconds)}."""
        call_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        try:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                raise RequestError(401, "authorization: missing or wrong bearer token")
            raw = await request.body()
            if len(raw) > self.cfg.max_body_bytes:
                raise RequestError(413, f"body: {len(raw)} bytes is over the limit of {self.cfg.max_body_bytes}")
            try:
                row = parse_feedback(json.loads(raw))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body: malformed JSON ({e})") from e
            except ValueError as e:
                raise RequestError(400, str(e)) from e
            if not self.sinks:
                raise RequestError(404, "feedback: this endpoint has no events_dir, so feedback is not collected")
            self._log_event("feedback", {**row, "time": row["time"] if row["time"] is not None else time.time(),
                                         "received": time.time()})
            return JSONResponse({"request_id": call_id, "accepted": True}, headers={"x-request-id": call_id})
        except RequestError as e:
            return JSONResponse({"request_id": call_id, "error": str(e)}, status_code=e.status,
                                headers={"x-request-id": call_id})

    @api.post("/recommend")
    async def recommend(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        variant = "-"
        # Shed, do not queue: beyond the admission limit in this replica the answer is an
        # immediate 503 with Retry-After, so the accepted ones keep their latency.
        if not self.admission.admit():
            self.metrics["shed"].inc(tags={"variant": variant})
            return JSONResponse({"request_id": request_id, "error": "overloaded, retry later"}, status_code=503,
                                headers={"x-request-id": request_id, "retry-after": str(self.cfg.retry_after_s)})
        model_s: list[float] = []  # the model call's latency, when there was one
        try:
            return await self._recommend(request, request_id, t0, model_s)
        finally:
            self.admission.done(model_s[0] if model_s else None)

    async def _recommend(self, request: Request, request_id: str, t0: float, model_s: list[float]) -> JSONResponse:
        variant = "-"
        try:
            if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
                raise RequestError(401, "authorization: missing or wrong bearer token")
            raw = await request.body()
            if len(raw) > self.cfg.max_body_bytes:
                raise RequestError(413, f"body: {len(raw)} bytes is over the limit of {self.cfg.max_body_bytes}")
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(400, f"body: malformed JSON ({e})") from e
            req = parse_request(body, self.cfg.max_k, self.cfg.max_request_items, self.cfg.max_id_length)
            forced = request.headers.get(VARIANT_HEADER)
            if forced is not None and forced not in self.handles:
                raise RequestError(400, f"{VARIANT_HEADER}: unknown variant {forced!r} (known: {sorted(self.handles)})")
            variant = forced or assign_variant(req.user_id or request_id, self.weights, self.cfg.salt)
            self.metrics["requests"].inc(tags={"variant": variant})
            info = await self._info(variant)
            history, unknown, truncated = self.catalogue.resolve(req.history, info["max_history"])
            if unknown and self.log is not None:  # maybe added through another gateway replica
                await self._sync()
                history, unknown, truncated = self.catalogue.resolve(req.history, info["max_history"])
            fallback = None
            if not history:
                fallback = "empty history" if not req.history else "no known item in the history"
                results = self.catalogue.fallback(req.k, set())
                self.metrics["fallbacks"].inc(tags={"variant": variant})
            else:
                # Every known item of the request is "seen", also those before the model's window.
                seen = {self.catalogue.index[i] for i in req.history if i in self.catalogue.index}
                t_model = time.perf_counter()
                try:
                    ranked = await asyncio.wait_for(
                        self.handles[variant].remote(history, sorted(seen) if req.exclude_seen else [], req.k,
                                                     len(self.catalogue.item_ids)), timeout=self.cfg.request_timeout_s)
                except asyncio.TimeoutError as e:
                    raise RequestError(503, f"model {variant!r}: no answer within {self.cfg.request_timeout_s} s "
                                            "(overloaded), retry later") from e
                finally:  # what admission control steers by: the queue behind the model, not our own loop
                    model_s.append(time.perf_counter() - t_model)
                if any(i >= len(self.catalogue.item_ids) for i, _ in ranked):  # the model synced further than us
                    await self._sync()
                results = [self.catalogue.item(i, s) for i, s in ranked]
                if len(results) < req.k:  # a tiny catalogue minus the history: top up from the popular list
                    have = {self.catalogue.index[r["item_id"]] for r in results} | (seen if req.exclude_seen else set())
                    results += self.catalogue.fallback(req.k - len(results), have)
            body_out = {"request_id": request_id, "variant": variant, "model_version": info["model_version"],
                        "codebook_version": self.codebook_version, "fallback": fallback, "items": results,
                        "unknown_items": unknown, "history_truncated": truncated, "history_used": len(history)}
            status = 200
            self._log_event("exposures", {
                # A request without a user_id was assigned by its request id: it is its own user.
                "request_id": request_id, "user_id": req.user_id or f"anon:{request_id}", "variant": variant,
                "model_version": info["model_version"], "codebook_version": self.codebook_version,
                "items": [r["item_id"] for r in results], "fallback": fallback, "time": time.time()})
        except RequestError as e:
            body_out, status = {"request_id": request_id, "error": str(e)}, e.status
        except Exception as e:  # noqa: BLE001 - one bad request must not take the replica down
            from ray.serve.exceptions import BackPressureError

            if isinstance(e, BackPressureError):
                body_out, status = {"request_id": request_id, "error": "overloaded, retry later"}, 503
            else:
                logger.exception("request %s failed", request_id)
                body_out, status = {"request_id": request_id, "error": "internal error"}, 500
            self.metrics["errors"].inc(tags={"variant": variant})
        self.metrics["latency"].observe((time.perf_counter() - t0) * 1000, tags={"variant": variant})
        headers = {"x-request-id": request_id}
        if status == 503:
            headers["retry-after"] = str(self.cfg.retry_after_s)
        return JSONResponse(body_out, status_code=status, headers=headers)


def build(args: dict[str, Any]) -> Any:
    """Application builder for `serve run serve/<file>.yaml` (and `serve.run(build({...}))`).

    args: the `ServeConfig` fields; `run_dir` is required. Each variant becomes one
    `Recommender` deployment named `model_<variant>`."""
    from digr.platform import storage
    from digr.platform.config import from_dict

    cfg = from_dict(ServeConfig, dict(args))
    if not cfg.run_dir:
        raise ValueError("serve: args.run_dir is required (a finished pipeline run directory)")
    variants = cfg.variants or (Variant("sft", storage.join(cfg.run_dir, "sft", "model")),)
    # The window the model was trained with (the run's sft.max_history) unless set.
    max_history = cfg.max_history or int(storage.read_json(storage.join(cfg.run_dir, "manifest.json"))
                                         ["config"]["sft"]["max_history"])
    trie = storage.join(cfg.run_dir, "tokenize", "trie.npz")
    # Items added while serving belong to the run's codebook: one log per run directory.
    log_name = "digr-items-" + hashlib.sha256(storage.absolute(cfg.run_dir).encode()).hexdigest()[:12]
    handles = {
        v.name: Recommender.options(name=f"model_{v.name}", max_queued_requests=cfg.max_queued_requests,
                                    graceful_shutdown_timeout_s=cfg.model_graceful_shutdown_timeout_s,
                                    **({"ray_actor_options": dict(cfg.model_ray_actor_options)}
                                       if cfg.model_ray_actor_options else {})).bind(
            v.model_dir, trie, cfg.beam_size, max_history, cfg.max_batch_size, cfg.batch_wait_timeout_s, log_name,
            cfg.additions_dir)
        for v in variants
    }
    weights = {"weights": {v.name: v.weight for v in variants}}
    # The bearer token is read where the app is deployed (`serve run` / the RayService pod)
    # when that environment has it; replicas on other nodes need not carry the secret.
    token = os.environ.get(cfg.auth_token_env, "") if cfg.auth_token_env else ""
    if cfg.auth_token_env and not token:
        logger.warning("serve: %s is not set where the app is built; replicas will read it from their own env",
                       cfg.auth_token_env)
    # With gateway_max_queued >= 0, a bounded wait in the proxy too: past it, Serve's proxy answers
    # 503 + Retry-After itself (with a plain-text body, so it is off by default).
    return Gateway.options(user_config=weights, max_queued_requests=cfg.gateway_max_queued,
                           backpressure_config=BackpressureConfig(retry_after_s=cfg.retry_after_s)).bind(
        dict(args), handles, token, log_name)
