"""End to end on a small slice of the real Amazon Scientific data: every stage on a local
Ray, the generative model beats popularity, and a re-run with nothing changed is a no-op."""

from __future__ import annotations

import json
import time

import pytest

from digr.pipeline.run import PipelineConfig, run_pipeline
from digr.platform.config import load

pytestmark = pytest.mark.slow

SLICE = [
    "ingest.source=inter-json", "ingest.name=Scientific", "ingest.max_users=600",
    "tokenize.rqvae.epochs=50", "tokenize.rqvae.codebook_size=32",
    "sft.epochs=12", "sft.batch_size=64", "sft.lr=0.003", "sft.warmup_steps=20", "sft.patience=12",
    "sft.eval_every=3", "sft.valid_users=300", "sft.model.d_model=64", "sft.model.d_kv=16",
    "sft.model.d_ff=256", "sft.model.num_heads=4", "sft.model.num_layers=2", "sft.model.num_decoder_layers=2",
    "evaluate.sasrec.epochs=20", "evaluate.fusion.enabled=true", "evaluate.fusion.valid_users=300",
]


def test_local_ray_workers_ask_their_own_state_api(ray_local) -> None:
    """Ray Train's placement-group cleaner kills a run whose controller the State API does not
    know. With a second Ray (and its dashboard) on the machine, a worker of our local Ray must
    still reach this Ray's State API (`start_local_ray`)."""
    import subprocess
    import sys

    import ray
    from ray.dashboard.utils import get_address_for_submission_client, ray_address_to_api_server_url

    other = subprocess.Popen(  # lives until its stdin closes
        [sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=True, "
         "dashboard_host='127.0.0.1'); print('up', flush=True); sys.stdin.read(); ray.shutdown()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    @ray.remote(num_cpus=0)
    class Probe:
        def ask(self) -> tuple[str, bool]:
            from ray.util.state import get_actor

            me = ray.get_runtime_context().get_actor_id()
            state = get_actor(me, timeout=30)
            return get_address_for_submission_client(None), state is not None and state.state == "ALIVE"

    probe = None
    try:
        assert other.stdout.readline().strip() == "up", "the second Ray did not start"
        probe = Probe.remote()
        address, alive = ray.get(probe.ask.remote(), timeout=120)
    finally:
        if probe is not None:
            ray.kill(probe)
        other.communicate(timeout=60)
    # what this Ray's GCS says its State API is, asked by address (no auto-detection)
    assert address == ray_address_to_api_server_url(ray.get_runtime_context().gcs_address)
    assert alive


def test_pipeline_end_to_end_on_a_real_slice(ray_local, scientific_dir, tmp_path) -> None:
    cfg = load(PipelineConfig, None, [f"ingest.path={scientific_dir}", *SLICE])
    out = tmp_path / "run"
    logs: list[str] = []
    metrics = run_pipeline(cfg, str(out), log=logs.append)

    gen, pop = metrics["generative"], metrics["popularity"]
    assert set(gen) == {"hr@5", "hr@10", "ndcg@5", "ndcg@10"}
    assert gen["ndcg@10"] > pop["ndcg@10"], metrics
    assert "sasrec" in metrics
    # Fusion: grid or learned, picked by a 2-fold cross-fit on valid; the grid's weight is its valid best.
    fusion = json.loads((out / "evaluate" / "baseline_history.json").read_text())["fusion"]
    assert fusion["valid_users"] == 300 and set(fusion["cv_ndcg@10"]) == {"grid", "learned"}
    assert fusion["method"] == max(("grid", "learned"), key=lambda m: (fusion["cv_ndcg@10"][m], m == "grid"))
    if fusion["method"] == "grid":
        assert max(r["ndcg@10"] for r in fusion["valid_curve"]) == next(
            r["ndcg@10"] for r in fusion["valid_curve"] if r["weight"] == fusion["weight"])
    else:
        assert fusion["weight"] is None and len(fusion["theta"]) == 7
    assert metrics["fusion"]["ndcg@10"] > pop["ndcg@10"]
    buckets = json.loads((out / "evaluate" / "buckets.json").read_text())
    assert set(buckets) == set(metrics) and sum(b["users"] for b in buckets["generative"].values()) == 600

    saved = json.loads((out / "metrics.json").read_text())
    assert saved["ndcg@10"] == gen["ndcg@10"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"ingest", "embed", "tokenize", "sft", "evaluate"}
    assert manifest["stages"]["ingest"]["rows"]["users"] == 600
    assert manifest["input_hashes"]  # the data files' hashes
    assert (out / "report.md").exists() and (out / "plots" / "sft_curves.png").exists()
    for model in ("generative", "fusion"):
        lines = (out / "evaluate" / f"predictions_{model}.jsonl").read_text().splitlines()
        assert len(lines) == 600 and len(json.loads(lines[0])["items"]) == 10

    t0 = time.time()
    again = run_pipeline(cfg, str(out), log=logs.append)
    assert again == metrics
    assert time.time() - t0 < 30
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["skipped"] for s in manifest["stages"].values())


def test_evidence_stages_are_keyed_on_their_prompt_files(ray_local, scientific_dir, tmp_path, monkeypatch) -> None:
    """Prompts are not Python, so not in a stage's code key: the caption stage's prompt content
    is one of its inputs. The stage bodies are stand-ins here (keyed on the real code)."""
    import digr.evidence.caption
    import digr.evidence.images
    from digr.evidence.mine import PROMPT_DIR

    calls: list[str] = []

    def stand_in(module: str, name: str):
        def fn(*args: object) -> dict:
            calls.append(name)
            return {}
        fn.__module__, fn.__qualname__ = module, name  # keyed as the real stage function
        return fn

    monkeypatch.setattr(digr.evidence.images, "images_stage", stand_in("digr.evidence.images", "images_stage"))
    monkeypatch.setattr(digr.evidence.caption, "caption_stage", stand_in("digr.evidence.caption", "caption_stage"))
    prompt = tmp_path / "caption_test.txt"
    prompt.write_text((PROMPT_DIR / "caption_v1.txt").read_text())
    cfg = load(PipelineConfig, None, [f"ingest.path={scientific_dir}", *SLICE[:3], f"caption.prompt={prompt}"])
    out = str(tmp_path / "run")
    for _ in range(2):
        run_pipeline(cfg, out, until="caption", log=lambda _: None)
    assert calls == ["images_stage", "caption_stage"]  # the second run skipped both
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert {"images:imagenet_classes", "caption:prompt", "caption:vlm_prompt"} <= set(manifest["input_hashes"])
    assert all(manifest["stages"][s]["code"] for s in ("ingest", "images", "caption"))

    prompt.write_text(prompt.read_text().replace("\n[user]\n", "\n[user]\nOne more line.\n", 1))
    run_pipeline(cfg, out, until="caption", log=lambda _: None)
    assert calls == ["images_stage", "caption_stage", "caption_stage"]  # edited in place: caption re-runs
