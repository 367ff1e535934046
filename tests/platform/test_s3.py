"""s3:// run directories against a local S3 (moto's server on 127.0.0.1): the storage layer,
and the main job writing every stage's artifacts, Ray Train checkpoints included, to a bucket,
then a re-run that skips every stage. pyarrow and boto3 find the server through
AWS_ENDPOINT_URL, so no code path differs from real S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.pipeline.test_pipeline import SLICE

moto_server = pytest.importorskip("moto.server", reason="moto is in the test extra")


@pytest.fixture(scope="module")
def s3_env():
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3").create_bucket(Bucket="digr-test")
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    srv.stop()


def test_storage_on_s3(s3_env) -> None:
    import pyarrow as pa

    from digr.platform import storage

    base = "s3://digr-test/unit"
    storage.write_json(storage.join(base, "a.json"), {"x": 1})
    storage.write_table(storage.join(base, "t.parquet"), pa.table({"a": [1, 2, 3]}))
    assert storage.read_json(f"{base}/a.json") == {"x": 1} and storage.read_table(f"{base}/t.parquet").num_rows == 3
    assert storage.list_files(base, ".json") == [f"{base}/a.json"] and storage.exists(f"{base}/t.parquet")
    storage.delete_dir(base)
    assert not storage.exists(f"{base}/a.json") and storage.list_files(base) == []


@pytest.mark.slow
def test_main_job_writes_its_run_directory_to_s3(s3_env, scientific_dir) -> None:
    """`python -m jobs.pipeline --output s3://...` in a child process with its own local Ray
    (whose workers inherit the endpoint), on a 150-user slice sized for speed."""
    import boto3

    run = "s3://digr-test/runs/slice"
    small = [o for o in SLICE if not o.startswith(("ingest.max_users", "sft.epochs", "evaluate.sasrec.epochs"))]
    cmd = [sys.executable, "-m", "jobs.pipeline", "--output", run, f"ingest.path={scientific_dir}",
           "ingest.max_users=150", "sft.epochs=3", "evaluate.sasrec.epochs=3", "ray.num_cpus=4", *small]
    env = {**os.environ, **s3_env, "RAY_ADDRESS": "", "RAY_TRAIN_ENABLE_STATE_TRACKING": "0"}
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    keys = {o["Key"] for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(
        Bucket="digr-test", Prefix="runs/slice/") for o in page.get("Contents", [])}
    for want in ("manifest.json", "metrics.json", "ingest/items.parquet", "tokenize/sids.parquet",
                 "tokenize/trie.npz", "sft/model/vocab.json", "evaluate/predictions_generative.jsonl"):
        assert f"runs/slice/{want}" in keys, want
    assert any(k.startswith("runs/slice/sft/ray/") and "checkpoint_" in k for k in keys)  # Ray Train on s3
    body = boto3.client("s3").get_object(Bucket="digr-test", Key="runs/slice/metrics.json")["Body"].read()
    assert set(json.loads(body)) >= {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[{s}] up to date" in again.stdout for s in ("ingest", "embed", "tokenize", "sft", "evaluate"))
