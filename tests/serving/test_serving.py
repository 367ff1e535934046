"""Serving: request checks, A/B assignment (stickiness, split ratios), the catalogue view, and
the Ray Serve application end to end over HTTP on 127.0.0.1 with a tiny saved model."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pyarrow as pa
import pytest
import torch

from digr.serving.core import (
    Admission,
    Catalogue,
    RequestError,
    assign_variant,
    extend_sids,
    parse_request,
    popularity_order,
    unit_hash,
)


def test_assignment_is_sticky_and_splits_within_two_points() -> None:
    users = [f"user-{i}" for i in range(10_000)]
    for weights in ({"a": 0.5, "b": 0.5}, {"a": 0.9, "b": 0.1}, {"a": 1.0, "b": 1.0, "c": 2.0}):
        first = [assign_variant(u, weights, "salt") for u in users]
        assert first == [assign_variant(u, weights, "salt") for u in users]  # same user, same variant
        total = sum(weights.values())
        for name, w in weights.items():
            assert abs(first.count(name) / len(users) - w / total) < 0.02, (weights, name)


def test_changing_weights_moves_only_the_users_in_the_changed_interval() -> None:
    users = [f"u{i}" for i in range(5000)]
    before = {u: assign_variant(u, {"a": 0.5, "b": 0.5}, "s") for u in users}
    after = {u: assign_variant(u, {"a": 0.6, "b": 0.4}, "s") for u in users}
    assert all(after[u] == "a" for u in users if before[u] == "a")  # a grew: nobody leaves a
    assert 0.07 < sum(before[u] != after[u] for u in users) / len(users) < 0.13
    assert unit_hash("s", "u1") != unit_hash("t", "u1")  # the salt reshuffles


@pytest.mark.parametrize("config, match", [
    ({"embed": {"evidence": ["intents"]}}, "only text-only runs"),
    ({"tokenize": {"labels": "prefix"}}, "tokenize.labels='prefix'"),
])
def test_frozen_tokenizer_refuses_runs_it_cannot_extend(tmp_path, config: dict, match: str) -> None:
    """New items need the run's text embedder and residual RQ-VAE codes; the refusal comes
    before any model is loaded and says which setting stands in the way."""
    from digr.serving.core import FrozenTokenizer

    (tmp_path / "manifest.json").write_text(json.dumps({"config": config}))
    with pytest.raises(ValueError, match=match):
        FrozenTokenizer(str(tmp_path))


@pytest.mark.parametrize("body, status, field", [
    ([1, 2], 400, "body"),
    ({}, 400, "history"),
    ({"history": "abc"}, 422, "history"),
    ({"history": [True]}, 422, "history"),
    ({"history": ["1"] * 11}, 400, "history"),
    ({"history": [], "k": 0}, 400, "k"),
    ({"history": [], "k": 51}, 400, "k"),
    ({"history": [], "k": "5"}, 422, "k"),
    ({"history": [], "user_id": 7}, 422, "user_id"),
    ({"history": [], "exclude_seen": "yes"}, 422, "exclude_seen"),
    ({"history": [], "colour": "red"}, 400, "colour"),
])
def test_bad_requests_name_the_field(body, status: int, field: str) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(body, max_k=50, max_items=10)
    assert err.value.status == status and str(err.value).startswith(field)


def test_good_request_and_defaults() -> None:
    r = parse_request({"history": ["a", 5]}, max_k=50, max_items=10)
    assert r.history == ("a", "5") and r.k == 10 and r.user_id is None and r.exclude_seen


def test_catalogue_resolves_drops_unknown_ids_and_truncates() -> None:
    cat = Catalogue(item_ids=["a", "b", "c", "d"], titles=["A", "B", "C", "D"], sids=np.zeros((4, 4), np.int64),
                    popular=[2, 0, 1, 3])
    assert cat.resolve(("a", "x", "b", "c"), window=2) == ([1, 2], ["x"], True)
    assert cat.resolve(("a",), window=2) == ([0], [], False)
    assert [r["item_id"] for r in cat.fallback(2, exclude={2})] == ["a", "b"]
    assert popularity_order([[0, 1, 1, 2, 3], [1, 9 % 4, 0]], 4) == [1, 0, 2, 3]


def test_extend_sids_takes_the_next_free_suffix_and_refuses_beyond_the_vocabulary() -> None:
    existing = np.array([[1, 2, 0], [1, 2, 1], [3, 3, 0]])
    new = np.array([[1, 2], [3, 3], [5, 5], [1, 2]])
    assert extend_sids(new, existing, suffix_size=4).tolist() == [[1, 2, 2], [3, 3, 1], [5, 5, 0], [1, 2, 3]]
    with pytest.raises(ValueError, match="new item 3.*retrained"):
        extend_sids(new, existing, suffix_size=3)


def test_addition_log_is_append_only_with_optimistic_concurrency() -> None:
    from digr.serving.core import AdditionConflict, AdditionLog

    log = AdditionLog(base=3)
    assert log.size() == 3 and log.since(3) == []
    assert log.append(3, ["a", "b"], ["A", "B"], [[0, 1, 0], [0, 1, 1]], [[0.5], [1.5]]) == 3
    with pytest.raises(AdditionConflict, match="has 5 items, the writer knew 3"):
        log.append(3, ["c"], ["C"], [[1, 1, 0]], [[0.0]])  # a writer that had not synced
    assert log.append(5, ["c"], ["C"], [[1, 1, 0]], [[0.0]]) == 5
    assert [b.start for b in log.since(3)] == [3, 5] and [b.item_ids for b in log.since(5)] == [("c",)]
    assert log.since(6) == [] and log.since(3)[0].sids == ((0, 1, 0), (0, 1, 1))
    with pytest.raises(ValueError, match="already added"):
        log.append(6, ["a"], ["A"], [[2, 2, 0]], [[0.0]])
    with pytest.raises(ValueError, match="not a batch boundary"):
        log.since(4)
    with pytest.raises(ValueError, match="log was lost"):
        log.since(9)


def test_addition_log_journal_replays_after_a_restart(tmp_path) -> None:
    from digr.serving.core import AdditionLog

    journal = str(tmp_path / "additions")
    log = AdditionLog(base=3, journal=journal)
    log.append(3, ["a", "b"], ["A", "B"], [[0, 1, 0], [0, 1, 1]], [[0.5], [1.5]])
    log.append(5, ["c"], ["C"], [[1, 1, 0]], [[0.25]])
    again = AdditionLog(base=3, journal=journal)  # a new actor after the cluster restarted
    assert again.size() == 6 and again.since(3) == log.since(3)
    (tmp_path / "additions" / "batch-000000003.json").unlink()
    with pytest.raises(ValueError, match="batch-000000005.json: starts at item 5"):
        AdditionLog(base=3, journal=journal)


def test_model_add_items_makes_a_new_item_reachable() -> None:
    from digr.rec.decode import constrained_logprobs
    from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
    from digr.rec.trie import SidTrie

    vocab = SidVocab(levels=2, codebook_size=4, suffix_size=1)
    codes = np.array([[i // 4, i % 4, 0] for i in range(10)])
    model = SidRecommender(vocab, ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                              num_heads=2, content_features=False), vocab.encode(torch.from_numpy(codes)))
    new = np.array([[3, 1, 0]])
    model.add_items(vocab.encode(torch.from_numpy(new)))
    trie = SidTrie.from_codes(codes, vocab).add(new)
    assert model.n_items == 11 and model.item.weight.shape[0] == 11 and float(model.item.weight[10].detach().abs().sum()) == 0
    lp = constrained_logprobs(model.eval(), trie, *model.batch([[10, 2]], 5), trie.codes.unsqueeze(0)).sum(-1)
    assert float(torch.logsumexp(lp.detach(), -1)) == pytest.approx(0.0, abs=1e-5) and float(lp[0, 10].detach().exp()) > 0


# ---------------------------------------------------------------- the Ray Serve application


def _tiny_run(tmp_path) -> tuple[str, object]:
    """A run directory with what the app reads: items, sequences, SIDs, trie, tokenizer.json,
    manifest.json and a saved (randomly initialised) model."""
    from digr.platform import storage
    from digr.rec.seqmodel import ModelConfig, SidRecommender, SidVocab
    from digr.rec.sft import save_model
    from digr.rec.trie import SidTrie

    n = 12
    vocab = SidVocab(levels=2, codebook_size=4, suffix_size=2)  # room for one collision of a new item
    codes = np.array([[i // 4, i % 4, 0] for i in range(n)])
    torch.manual_seed(0)
    model = SidRecommender(vocab, ModelConfig(d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                              num_heads=2, content_features=False), vocab.encode(torch.from_numpy(codes)))
    run = tmp_path / "run"
    save_model(model, str(run / "sft" / "model"))
    storage.write_table(str(run / "ingest" / "items.parquet"), pa.table({
        "item_idx": pa.array(range(n), pa.int32()), "item_id": [f"i{k}" for k in range(n)],
        "title": [f"Item {k}" for k in range(n)]}))
    storage.write_table(str(run / "ingest" / "sequences.parquet"), pa.table({
        "user_id": ["u0", "u1"], "item_idx": [[0, 1, 2, 3, 4], [1, 1, 5, 6]]}))
    storage.write_table(str(run / "tokenize" / "sids.parquet"), pa.table({
        "item_idx": pa.array(range(n), pa.int32()), "sid": [list(map(int, c)) for c in codes]}))
    storage.write_bytes(str(run / "tokenize" / "trie.npz"), SidTrie.from_codes(codes, vocab).to_bytes())
    storage.write_json(str(run / "tokenize" / "tokenizer.json"), {"stats": {"codebook_version": "cb123"}})
    rq_cfg = {"levels": 2, "codebook_size": 4, "hidden_dims": [16], "latent_dim": 8}
    from digr.tokenizer.rqvae import RQVAE, RQVAEConfig

    buf = __import__("io").BytesIO()
    torch.save(RQVAE(384, RQVAEConfig(**{**rq_cfg, "hidden_dims": (16,)})).state_dict(), buf)
    storage.write_bytes(str(run / "tokenize" / "rqvae.pt"), buf.getvalue())
    storage.write_json(str(run / "manifest.json"), {"config": {"sft": {"max_history": 3}, "embed": {},
                                                               "tokenize": {"rqvae": rq_cfg}}})
    return str(run), model


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_app_over_http(ray_local, tmp_path) -> None:
    from ray import serve

    from digr.rec.decode import recommend
    from digr.rec.trie import SidTrie
    from serve.app import build

    run, model = _tiny_run(tmp_path)
    port = 18123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"run_dir": run, "max_k": 5, "beam_size": 5, "max_body_bytes": 2000, "max_request_items": 50,
            "additions_dir": str(tmp_path / "additions"), "events_dir": str(tmp_path / "events"), "events_flush_s": 0.2,
            "variants": [{"name": "a", "model_dir": f"{run}/sft/model", "weight": 1.0},
                         {"name": "b", "model_dir": f"{run}/sft/model", "weight": 1.0}]}
    serve.run(build(args), name="digr-test", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=60) as r:
            assert json.loads(r.read())["status"] == "ready"
        with urllib.request.urlopen(f"{url}/openapi.json", timeout=60) as r:
            assert "/recommend" in json.loads(r.read())["paths"]

        # served == offline decoding of the same model on the same (window-cut) history
        status, out = _post(f"{url}/recommend", json.dumps({"user_id": "u7", "history": ["i0", "i1", "zz", "i2", "i3"],
                                                             "k": 4}).encode())
        assert status == 200, out
        trie = SidTrie.from_codes(np.array([[i // 4, i % 4, 0] for i in range(12)]), model.vocab)
        exclude = torch.zeros(1, 12, dtype=torch.bool)
        exclude[0, [0, 1, 2, 3]] = True
        offline = recommend(model.eval(), trie, [[1, 2, 3]], 3, beam_size=5, top_k=4, exclude=exclude)
        assert [r["item_id"] for r in out["items"]] == [f"i{i}" for i in offline.items[0].tolist()]
        assert out["unknown_items"] == ["zz"] and out["history_truncated"] and out["history_used"] == 3
        assert out["variant"] in ("a", "b") and out["codebook_version"] == "cb123" and out["fallback"] is None
        assert out["items"][0]["sid"] == [int(c) for c in trie.codes[offline.items[0, 0]]]
        # sticky: the same user gets the same variant; the header forces one
        assert all(_post(f"{url}/recommend", json.dumps({"user_id": "u7", "history": ["i1"]}).encode())[1]["variant"]
                   == out["variant"] for _ in range(3))
        assert _post(f"{url}/recommend", b'{"history": ["i1"]}', {"x-digr-variant": "b"})[1]["variant"] == "b"

        status, cold = _post(f"{url}/recommend", b'{"history": [], "k": 3}')
        assert status == 200 and cold["fallback"] == "empty history" and [r["item_id"] for r in cold["items"]] == \
            ["i1", "i0", "i2"]  # training counts (all but each user's last two): i1 x2, then i0, i2
        status, unknown = _post(f"{url}/recommend", b'{"user_id": "new", "history": ["nope"]}')
        assert status == 200 and unknown["fallback"] == "no known item in the history"

        assert _post(f"{url}/recommend", b"{not json")[0] == 400
        status, err = _post(f"{url}/recommend", b'{"history": ["i1"], "k": 99}')
        assert status == 400 and err["error"].startswith("k:") and err["request_id"]
        assert _post(f"{url}/recommend", b'{"history": ["i1"]}', {"x-digr-variant": "zzz"})[0] == 400
        assert _post(f"{url}/recommend", json.dumps({"history": ["i1"] * 40, "pad": "x" * 3000}).encode())[0] == 413

        # the A/B loop: every 200 is an exposure; feedback on it is logged; the analysis reads both
        status, fb = _post(f"{url}/feedback", json.dumps({"request_id": out["request_id"], "item": out["items"][0]["item_id"],
                                                          "event": "click"}).encode())
        assert status == 200 and fb["accepted"], fb
        status, err = _post(f"{url}/feedback", json.dumps({"request_id": "r", "item": "i1", "event": "like"}).encode())
        assert status == 400 and err["error"].startswith("event:")
        from digr.abtest.analysis import analyse
        from jobs.abtest import read_records

        deadline = time.time() + 30
        while time.time() < deadline and not (list((tmp_path / "events" / "feedback").glob("*.jsonl"))
                                              and len(read_records(str(tmp_path / "events" / "exposures"))) >= 7):
            time.sleep(0.2)
        exposures = read_records(str(tmp_path / "events" / "exposures"))
        assert len(exposures) == 7  # the seven 200s so far; no 4xx is an exposure
        first = next(e for e in exposures if e["request_id"] == out["request_id"])
        assert first["user_id"] == "u7" and first["variant"] == out["variant"] and first["codebook_version"] == "cb123"
        assert first["items"] == [r["item_id"] for r in out["items"]]
        report = analyse(exposures, read_records(str(tmp_path / "events" / "feedback")), {"a": 1.0, "b": 1.0})
        assert report.variants[out["variant"]].ctr.value > 0 and not report.rejected

        # a new item, no retraining: SID from the frozen tokenizer, then known to recommend
        status, added = _post(f"{url}/items", json.dumps({"items": [{"item_id": "new1", "title": "A brand new thing"}]}).encode())
        assert status == 200, added
        assert added["added"][0]["item_idx"] == 12 and len(added["added"][0]["sid"]) == 3
        assert (tmp_path / "additions" / "batch-000000012.json").exists()  # journalled before the 200
        status, out = _post(f"{url}/recommend", b'{"history": ["new1", "i2"], "k": 3}')
        assert status == 200 and out["unknown_items"] == [] and out["history_used"] == 2
        assert _post(f"{url}/items", json.dumps({"items": [{"item_id": "new1", "title": "again"}]}).encode())[0] == 409
        assert _post(f"{url}/items", b'{"items": [{"item_id": "x"}]}')[0] == 400

        # replicas started later (autoscaling, a redeploy) sync the added items from the app's log
        serve.delete("digr-test")
        serve.run(build({**args, "variants": [{"name": "c", "model_dir": f"{run}/sft/model"}]}), name="digr-test2",
                  route_prefix="/", blocking=False)
        status, out = _post(f"{url}/recommend", b'{"history": ["new1"], "k": 3, "exclude_seen": false}')
        assert status == 200 and out["unknown_items"] == [] and out["variant"] == "c", out
        status, err = _post(f"{url}/items", json.dumps({"items": [{"item_id": "new1", "title": "again"}]}).encode())
        assert status == 409 and "already exists" in err["error"], err
    finally:
        import ray

        for app in ("digr-test", "digr-test2"):
            serve.delete(app)
        serve.shutdown()
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("digr-items-"):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))


def test_admission_limit_follows_the_latency() -> None:
    """Every 4 completions: p90 above the 0.1 s target shrinks the limit by target / p90, at or
    below it the limit grows by one; never below min_limit (2) or above max_limit (8)."""
    a = Admission(target_s=0.1, min_limit=2, max_limit=8, every=4)
    assert all(a.admit() for _ in range(8)) and not a.admit()  # starts at max_limit
    for _ in range(4):
        a.done(0.4)  # p90 0.4 s: 8 * 0.1 / 0.4 = 2
    assert a.limit == 2 and a.inflight == 4 and not a.admit()
    for lat in (0.05, 0.05, 0.05, 0.1):  # p90 0.085 s <= target: +1
        a.done(lat)
    assert a.limit == 3 and a.inflight == 0
    for _ in range(4):
        a.admit()
        a.done(10.0)  # far over: 3 * 0.01 -> 0, clamped to 2
    assert a.limit == 2
    for _ in range(6 * 4):
        a.admit()
        a.done(0.01)
    assert a.limit == 8  # +1 per 4 completions, clamped at 8
    fixed = Admission(target_s=0.0, min_limit=2, max_limit=3)
    for _ in range(100):
        fixed.admit()
        fixed.done(9.0)
    assert fixed.limit == 3  # target 0: the static cap
    a.admit()
    a.done(None)  # no model call: released, no sample
    assert a.inflight == 0 and a._latencies == []


@pytest.mark.parametrize("args, match", [
    ({"max_k": 0}, "max_k >= 1"),
    ({"min_inflight": 8, "max_inflight": 4}, "1 <= min_inflight <= max_inflight"),
    ({"variants": [{"name": "a", "model_dir": "x"}, {"name": "a", "model_dir": "y"}]}, "duplicate names"),
    ({"variants": [{"name": "a", "model_dir": "x", "weight": -1}]}, "weights must be >= 0"),
    ({"model_graceful_shutdown_timeout_s": -1}, "model_graceful_shutdown_timeout_s must be >= 0"),
])
def test_serve_config_errors_name_the_setting(args: dict, match: str) -> None:
    from digr.platform.config import from_dict
    from digr.serving.core import ServeConfig

    with pytest.raises(ValueError, match=match):
        from_dict(ServeConfig, {"run_dir": "runs/x", **args})


@pytest.mark.parametrize("path", ["serve/recommender.yaml", "serve/ab.yaml", "cluster/kuberay/rayservice.yaml"])
def test_serve_configs_build_valid_serve_configs(path: str) -> None:
    from pathlib import Path

    import yaml

    from digr.platform.config import from_dict
    from digr.serving.core import ServeConfig

    doc = yaml.safe_load((Path(__file__).resolve().parents[2] / path).read_text())
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"]) if doc.get("kind") == "RayService" else doc
    app = serve_cfg["applications"][0]
    assert app["import_path"] == "serve.app:build"
    cfg = from_dict(ServeConfig, app["args"])
    assert cfg.run_dir
    if doc.get("kind") != "RayService":
        assert serve_cfg["http_options"]["host"] == "127.0.0.1"  # loopback unless deployed on purpose
    weights = next((d["user_config"]["weights"] for d in app.get("deployments", []) if d["name"] == "Gateway"), None)
    if cfg.variants:
        assert weights == {v.name: v.weight for v in cfg.variants}


def test_model_not_ready_fails_readiness_and_requests_get_503_while_liveness_stays_up(ray_local, tmp_path) -> None:
    """The model replicas ask for a resource no node has (a GPU node still being added, say),
    so no model is up: /readyz answers 503, requests 503 naming the model, /healthz 200."""
    from ray import serve

    from serve.app import build

    run, _ = _tiny_run(tmp_path)
    port = 18126
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"run_dir": run, "max_k": 5, "beam_size": 5,
            "model_ray_actor_options": {"num_cpus": 0, "resources": {"digr_test_absent_node": 1}},
            # Deleting a replica that never got a node waits this long (Serve's default: 20 s).
            "model_graceful_shutdown_timeout_s": 1}
    # serve.run waits for every deployment to be RUNNING, which a model that cannot be placed
    # never is; `_run(_blocking=False)` (what serve.run wraps) deploys and returns.
    serve._run(build(args), _blocking=False, name="digr-unready", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:  # the gateway itself comes up; the model never does
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
                    assert r.status == 200 and json.loads(r.read()) == {"status": "alive"}
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "the gateway never answered /healthz"
                time.sleep(1)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{url}/readyz", timeout=60)
        assert e.value.code == 503 and json.loads(e.value.read())["status"] == "not ready"
        status, err = _post(f"{url}/recommend", json.dumps({"user_id": "u1", "history": ["i1"], "k": 3}).encode())
        assert status == 503 and "not ready" in err["error"] and err["request_id"]
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
            assert r.status == 200  # liveness stays up throughout
    finally:
        serve.delete("digr-unready")
        serve.shutdown()


def test_serve_auth_and_overload(ray_local, tmp_path, monkeypatch) -> None:
    """Bearer-token auth (401 without it); a bounded queue: a burst far beyond
    max_queued_requests gets 503s, never 500s, and the app keeps serving after it; an
    internal error answers 500 without a stack trace and the replica keeps serving."""
    import concurrent.futures as cf

    from ray import serve

    from serve.app import build

    run, _ = _tiny_run(tmp_path)
    port = 18124
    monkeypatch.setenv("DIGR_TEST_TOKEN", "s3cret")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"run_dir": run, "max_k": 5, "beam_size": 5, "auth_token_env": "DIGR_TEST_TOKEN",
            "max_queued_requests": 1, "max_batch_size": 1, "batch_wait_timeout_s": 0.0}
    serve.run(build(args), name="digr-auth", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}/recommend"
    good = {"authorization": "Bearer s3cret"}
    try:
        status, err = _post(url, b'{"history": ["i1"]}')
        assert status == 401 and err["error"].startswith("authorization")
        assert _post(url, b'{"history": ["i1"]}', {"authorization": "Bearer wrong"})[0] == 401
        assert _post(url, b'{"history": ["i1"]}', good)[0] == 200
        body = json.dumps({"history": [f"i{k}" for k in range(12)], "k": 5}).encode()
        with cf.ThreadPoolExecutor(96) as pool:
            statuses = list(pool.map(lambda _: _post(url, body, good)[0], range(400)))
        assert set(statuses) <= {200, 503} and 503 in statuses and 200 in statuses, sorted(set(statuses))
        assert _post(url, b'{"history": ["i1"]}', good)[0] == 200  # still serving

        # an internal error (a corrupt tokenizer checkpoint behind POST /items): 500 with the
        # request id and no stack trace, and the replica goes on serving
        (tmp_path / "run" / "tokenize" / "rqvae.pt").write_bytes(b"not a checkpoint")
        status, err = _post(url.replace("/recommend", "/items"),
                            json.dumps({"items": [{"item_id": "n", "title": "New"}]}).encode(), good)
        assert status == 500 and err["error"] == "internal error" and err["request_id"]
        assert "Traceback" not in json.dumps(err)
        assert _post(url, b'{"history": ["i1"]}', good)[0] == 200
    finally:
        serve.delete("digr-auth")
        serve.shutdown()


def _prometheus_totals(metric: str, label: str = "variant") -> dict[str, float]:
    """Sum of `metric` per value of `label` over every series the node's metrics agent exports
    (Ray's Prometheus endpoint; a series per worker process)."""
    import re

    import ray

    node = ray._private.worker._global_node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf'^{metric}\{{(.*)\}} (\S+)$', line)
        lab = re.search(rf'(?:^|,){label}="([^"]*)"', m.group(1)) if m else None
        if lab:
            totals[lab.group(1)] = totals.get(lab.group(1), 0.0) + float(m.group(2))
    return totals


def test_serve_metrics_are_tagged_per_variant(ray_local, tmp_path) -> None:
    """Every request is counted under its variant in Prometheus (requests, fallbacks, latency
    histogram); a request rejected before a variant is chosen is timed under "-"."""
    import time

    from ray import serve

    from serve.app import build

    run, _ = _tiny_run(tmp_path)
    port = 18125
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    model_dir = f"{run}/sft/model"
    args = {"run_dir": run, "max_k": 5, "beam_size": 5,  # variant names unique to this test: counters are per session
            "variants": [{"name": "met-a", "model_dir": model_dir}, {"name": "met-b", "model_dir": model_dir}]}
    serve.run(build(args), name="digr-metrics", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}/recommend"
    try:
        sent: dict[str, int] = {}
        for variant, body in [("met-a", b'{"history": ["i1", "i2"]}')] * 3 + [("met-b", b'{"history": ["i3"]}')] * 2 \
                + [("met-b", b'{"history": []}')]:
            status, out = _post(url, body, {"x-digr-variant": variant})
            assert status == 200 and out["variant"] == variant, out
            sent[variant] = sent.get(variant, 0) + 1
        assert _post(url, b"{broken", {"x-digr-variant": "met-a"})[0] == 400  # no variant chosen yet
        want_requests, want_fallbacks = {"met-a": 3, "met-b": 3}, {"met-b": 1}
        deadline = time.time() + 60  # the agent exports every few seconds
        while True:
            requests = _prometheus_totals("ray_digr_requests_total")
            fallbacks = _prometheus_totals("ray_digr_fallbacks_total")
            timed = _prometheus_totals("ray_digr_latency_ms_count")
            got = ({v: requests.get(v) for v in want_requests}, {v: fallbacks.get(v) for v in want_fallbacks},
                   {v: timed.get(v) for v in want_requests})
            if got == (want_requests, want_fallbacks, want_requests) and timed.get("-", 0) >= 1:
                break
            assert time.time() < deadline, f"Prometheus per variant (requests, fallbacks, latency count): {got}"
            time.sleep(2)
        assert sent == want_requests
    finally:
        serve.delete("digr-metrics")
        serve.shutdown()


def test_the_openapi_contract_holds_under_schemathesis(ray_local, tmp_path) -> None:
    """`st run` against /openapi.json, every check: schema-valid bodies are accepted, invalid ones
    get a 4xx, every status code is documented, no 5xx (digr/serving/contract.py)."""
    import subprocess
    import sys
    from pathlib import Path

    from ray import serve

    from serve.app import build

    run, _ = _tiny_run(tmp_path)
    port = 18125
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"run_dir": run, "max_k": 5, "beam_size": 5, "events_dir": str(tmp_path / "events"),
                     "variants": [{"name": "a", "model_dir": f"{run}/sft/model"}]}),
              name="digr-st", route_prefix="/", blocking=False)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/readyz", timeout=10) as r:
                    if json.loads(r.read())["status"] == "ready":
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline, "the app did not become ready"
            time.sleep(0.5)
        st = Path(sys.executable).with_name("st")
        out = subprocess.run([str(st), "run", f"{url}/openapi.json", "--checks", "all", "-n", "50", "--seed", "0",
                              "--request-timeout", "30"], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
        assert " passed" in out.stdout and "failure" not in out.stdout.split("SUMMARY")[-1].lower(), out.stdout[-3000:]
    finally:
        serve.delete("digr-st")
        serve.shutdown()
        import ray

        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith("digr-items-"):
                ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]))


def test_overload_beyond_max_inflight_is_shed_at_once_with_retry_after(ray_local, tmp_path) -> None:
    """A gateway serving max_inflight requests answers the next with 503 + Retry-After instead
    of queueing it; the accepted ones are served, and the app serves normally afterwards."""
    import concurrent.futures as cf

    from ray import serve

    from serve.app import build

    run, _ = _tiny_run(tmp_path)
    port = 18126
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"run_dir": run, "max_k": 5, "beam_size": 5, "max_inflight": 2, "min_inflight": 2, "retry_after_s": 3,
                     "max_batch_size": 1, "batch_wait_timeout_s": 0.0}), name="digr-shed", route_prefix="/",
              blocking=False)
    url = f"http://127.0.0.1:{port}/recommend"
    body = json.dumps({"history": [f"i{k}" for k in range(12)], "k": 5}).encode()

    def post(_: int) -> tuple[int, str | None, dict]:
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, r.headers.get("retry-after"), json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, e.headers.get("retry-after"), json.loads(e.read())

    try:
        assert post(0)[0] == 200
        with cf.ThreadPoolExecutor(64) as pool:
            out = list(pool.map(post, range(300)))
        statuses = {s for s, _, _ in out}
        assert statuses <= {200, 503} and 503 in statuses and 200 in statuses, statuses
        shed = [(h, b) for s, h, b in out if s == 503]
        assert all(h == "3" and b["error"] == "overloaded, retry later" and b["request_id"] for h, b in shed)
        assert post(0)[0] == 200
    finally:
        serve.delete("digr-shed")
        serve.shutdown()
