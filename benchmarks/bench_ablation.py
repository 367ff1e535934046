"""IEID ablation on the full Amazon Scientific data: the same pipeline with the tokenizer's
evidence switched (text only, TIGER-like, against + mined intents), side by side in one run.

    .venv/bin/python benchmarks/bench_ablation.py [--output runs/ablation] [--variants text,intents]
                                                  [key=value ...]

Each variant is a whole pipeline run in <output>/<variant> (ingest -> [mine -> label] -> embed
-> tokenize -> sft -> evaluate) with `embed.evidence` set for it and every other setting equal
(configs/scientific.yaml plus the overrides). Mining replies are cached in the intents run's
`mine_cache/`, so a re-run, or a run after `python -m jobs.mine` into the same folder, asks the
LLM nothing. Prints HR/NDCG@5/10 of the generative model, the tokenizer's collision rate
before the suffix and its codebook usage, the mining outcome, and the independent scorer's
check of every predictions file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from digr.pipeline.run import PipelineConfig, run_pipeline
from digr.platform import storage
from digr.platform.config import load

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "amazon-scientific"
SCORER = REPO.parent / "shared" / "tools" / "score.py"
EVIDENCE = {"text": "[]", "intents": "[intents]", "caption": "[caption]", "image": "[image]",
            "intents+caption": "[intents, caption]"}


def _stage_info(run_dir: Path, stage: str) -> dict:
    path = run_dir / stage / "_SUCCESS.json"
    return json.loads(path.read_text())["info"] if path.is_file() else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "configs" / "scientific.yaml"))
    ap.add_argument("--output", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--variants", default="text,intents", help=f"comma-separated, from {sorted(EVIDENCE)}")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in EVIDENCE]
    if unknown:
        ap.error(f"--variants: {unknown} not in {sorted(EVIDENCE)}")

    results: dict[str, dict] = {}
    for v in variants:
        cfg = load(PipelineConfig, args.config,
                   [f"ingest.path={DATA}", f"embed.evidence={EVIDENCE[v]}", *args.overrides])
        out = Path(args.output) / v
        t0 = time.time()
        metrics = run_pipeline(cfg, str(out))
        tok = _stage_info(out, "tokenize").get("stats", {})
        mine = _stage_info(out, "mine")
        scored = []
        for model in metrics:
            preds = out / "evaluate" / f"predictions_{model}.jsonl"
            res = subprocess.run([sys.executable, str(SCORER), str(DATA), str(preds)], capture_output=True,
                                 text=True, check=True)
            theirs = json.loads(res.stdout)
            scored.append(abs(theirs["ndcg@10"] - metrics[model]["ndcg@10"]) < 1e-4 and theirs["missing"] == 0)
        results[v] = {"metrics": metrics, "tok": tok, "mine": mine, "agree": all(scored),
                      "minutes": (time.time() - t0) / 60}

    print(f"\nIEID ablation, Amazon Scientific (config {Path(args.config).name}; overrides {args.overrides or '-'})")
    head = f"{'variant':<18}{'HR@5':>8}{'HR@10':>8}{'NDCG@5':>8}{'NDCG@10':>9}{'collisions':>12}{'usage/level':>20}" \
           f"{'SASRec N@10':>13}{'score.py':>10}{'min':>6}"
    print(head)
    for v, r in results.items():
        g = r["metrics"]["generative"]
        usage = "/".join(f"{u:.2f}" for u in r["tok"].get("usage_per_level", []))
        sas = r["metrics"].get("sasrec", {}).get("ndcg@10", float("nan"))
        print(f"{v:<18}{g['hr@5']:>8.4f}{g['hr@10']:>8.4f}{g['ndcg@5']:>8.4f}{g['ndcg@10']:>9.4f}"
              f"{r['tok'].get('collision_rate', float('nan')):>12.4f}{usage:>20}{sas:>13.4f}"
              f"{'agree' if r['agree'] else 'DISAGREE':>10}{r['minutes']:>6.1f}")
    for v, r in results.items():
        if r["mine"]:
            print(f"{v}: mining {json.dumps(r['mine'])}")
    if "text" in results and len(results) > 1:
        base = results["text"]["metrics"]["generative"]["ndcg@10"]
        for v, r in results.items():
            if v != "text":
                d = r["metrics"]["generative"]["ndcg@10"] - base
                print(f"{v} vs text only: NDCG@10 {d:+.4f} ({'better' if d > 0 else 'not better'})")
    storage.write_json(str(Path(args.output) / "ablation.json"), results)
    return 0 if all(r["agree"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
